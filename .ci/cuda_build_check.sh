#!/usr/bin/env bash
# Build kestrel._C with its CUDA part (FORCE_CUDA=1, sm_80 and sm_90a) against torch 2.14.1 + CUDA 13 on a machine
# without a GPU, install it into its own venv, check build_info and rerun the CPU tests against it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ] && ! command -v nvcc >/dev/null; then
  echo "cuda_build_check: no CUDA toolkit (nvcc) here, so the CUDA part cannot be compiled" >&2
  exit 1
fi
venv="$root/.venv-cuda"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.14.1 ninja setuptools wheel pytest numpy cupy-cuda13x
# A copy of the working tree, so this build never touches the in-place CPU build of step 1.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -co --exclude-standard -z | grep -zv '^\.venv' | tar --null -T - -cf - | tar -xf - -C "$work"
(cd "$work" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0a" "$venv/bin/python" -m pip install -q \
  --no-build-isolation --no-deps .)
cd "$work/tests"  # not the source tree: import the installed build
"$venv/bin/python" - <<'PY'
import kestrel
info = kestrel._ext.build_info()
print("cuda build:", info)
assert info["cuda"] and info["cuda_archs"] == ["sm_80", "sm_90a"], info
PY
"$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$work" -m "not slow" \
  "$work/tests/test_quantize.py" "$work/tests/test_optim.py" "$work/tests/test_optim_one_state.py" \
  "$work/tests/test_optim_ademamix.py" "$work/tests/test_optim_manager.py" \
  "$work/tests/test_optim_stochastic_round.py" "$work/tests/test_op_registration.py"
# The JIT path from the installed package, as on a GPU machine without a toolkit: kestrel's headers from
# kestrel/_include, NVRTC and the CUDA headers from torch's nvidia wheels. Every kernel compiles under NVRTC; the
# cache, the backend selection, import kestrel without CuPy.
"$venv/bin/python" - <<'PY'
from kestrel import _jit
headers = _jit.kestrel_include_dir()
assert "site-packages" in str(headers), headers
print("JIT: kestrel headers", headers, "| CUDA headers", _jit.cuda_include_dirs(), "| NVRTC", _jit.nvrtc_version())
PY
KESTREL_REQUIRE_JIT=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$work" "$work/tests/test_jit.py" \
  -k "nvrtc or cache or backend or import_kestrel or kernel_names"
