#!/usr/bin/env bash
# The one GPU check: on a machine with a CUDA GPU, build the CUDA extension, run the GPU tests, the demo with its
# GPU defaults and the benchmarks, and write every log under $OUT (default /tmp/kestrel-gpu). Peers (bitsandbytes)
# come as wheels in .whl/ when the machine has no network (see README.md, "GPU check").
#   bash benchmarks/gpu_check.sh            # everything
#   KESTREL_GPU_CHECK_SKIP_BENCH=1 ...       # no benchmarks
#   KESTREL_GPU_CHECK_SKIP_DEMO=1 ...        # no demo
#   KESTREL_GPU_CHECK_BENCH_ONLY="vq_topk tree_attention" ...   # only these benchmarks
#   KESTREL_GPU_CHECK_SKIP_JIT=1 ...         # no JIT-path stage (the C++ ops' CUDA kernels compiled by NVRTC)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kestrel-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
status=0

{
  date -u; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
} > "$OUT/env.log"

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >> "$OUT/env.log" 2>&1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== build" | tee "$OUT/build.log"
( time "$PY" -m pip install --no-build-isolation --no-deps -e . ) >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
"$PY" -m kestrel info 2>&1 | tee -a "$OUT/env.log"

echo "== GPU tests"
"$PY" -m pytest -m "gpu or triton" -q -ra tests 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -z "${KESTREL_GPU_CHECK_SKIP_JIT:-}" ]; then
  # The JIT path (kestrel/_jit.py, needs CuPy): its op-by-op comparison with the CPU and native kernels (in the GPU
  # tests above), then the optimizer, quantization and verification GPU tests with every C++ op on the JIT kernels
  echo "== GPU tests on the JIT path (KESTREL_CUDA_BACKEND=jit)"
  KESTREL_CUDA_BACKEND=jit KESTREL_CACHE_DIR="$OUT/jit-cache" "$PY" -m pytest -m gpu -q -ra tests/test_quantize.py \
    tests/test_optim.py tests/test_optim_one_state.py tests/test_optim_ademamix.py tests/test_tree_verify.py \
    tests/test_generate.py 2>&1 | tee "$OUT/tests-jit.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ -z "${KESTREL_GPU_CHECK_SKIP_DEMO:-}" ]; then
  echo "== demo on the GPU"
  "$PY" -m kestrel demo --device cuda --out "$OUT/demo" 2>&1 | tee "$OUT/demo.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ -z "${KESTREL_GPU_CHECK_SKIP_BENCH:-}" ]; then
  echo "== benchmarks"
  # shellcheck disable=SC2086  (a list of names, split on purpose)
  "$PY" -m kestrel bench --device cuda ${KESTREL_GPU_CHECK_BENCH_ONLY:+--only $KESTREL_GPU_CHECK_BENCH_ONLY} \
    --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "logs in $OUT"
exit $status
