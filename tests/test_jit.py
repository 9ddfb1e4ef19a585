"""The JIT path (kestrel/_jit.py): kestrel's CUDA kernels compiled at run time by NVRTC through CuPy.

Without a GPU (CI): every kernel family and template instance compiles under NVRTC for sm_80 and sm_90 with no
warnings; the launches the JIT path records (kestrel._C.jit_<op>: kernel, grid, block, shared memory, argument
struct) equal those the native launchers make, as the CUDA-on-CPU build (tests/cuda_sim) logs them (kernel symbols
compared as mangled names: NVRTC's lowered names); the argument struct holds the call's pointers and sizes; the
host half refuses bad input as the native op does; the disk cache is reused across processes and invalidated by a
header change; backend selection, `info` and the errors without CuPy.
With a GPU (marked gpu): every op through the JIT path gives the CPU kernels' bits (and the native CUDA kernels',
where kestrel._C has them); first-call compile time and cached-call overhead are printed.

The NVRTC tests need CuPy (cupy-cuda13x), the NVRTC wheel and the CUDA headers (kestrel[jit], installed by the
README's test command and CI); without CuPy they are skipped (unless KESTREL_REQUIRE_JIT=1, which CI sets); with CuPy
but no NVRTC or CUDA headers they fail."""

import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cuda_sim import clone, optimizer_inputs, random_trees, special_values, tensors_mapped

import kestrel
from kestrel import _ext, _jit
from kestrel.ops import quantize as Q

pytestmark = pytest.mark.skipif(not _ext.available(), reason="kestrel._C is not built")
ROOT = Path(__file__).resolve().parents[1]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ARCHS = ["sm_80", "sm_90"]


def jit_ready():
    """None when NVRTC, CuPy and the CUDA headers are all there, else why not."""
    try:
        _jit.nvrtc_version()
        _jit.cuda_include_dirs()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def need_jit():
    """Skip without CuPy (the jit extra not installed), unless KESTREL_REQUIRE_JIT=1; with CuPy installed, a missing
    NVRTC or CUDA header is a failure."""
    why = jit_ready()
    if why is None:
        return
    try:
        import cupy_backends  # noqa: F401
    except ImportError:
        if os.environ.get("KESTREL_REQUIRE_JIT") != "1":
            pytest.skip(f"CuPy is not installed (pip install 'kestrel[jit]'): {why}")
    pytest.fail(f"the JIT path cannot compile here: {why}")


@pytest.fixture(scope="module")
def compiled():
    """{family: (cubin, lowered names, log)} for sm_90."""
    need_jit()
    return {family: _jit.compile_family(family, "sm_90") for family in _jit.FAMILIES}


# ------------------------------------------------------------------------------------------------- compiling
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", list(_jit.FAMILIES))
def test_every_kernel_compiles_under_nvrtc_without_warnings(family, arch):
    need_jit()
    cubin, lowered, log = _jit.compile_family(family, arch)
    assert log == "", log
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000
    names = kestrel._C.jit_kernel_names(family)
    assert sorted(lowered) == sorted(names) and all(v.startswith("_ZN7kestrel4cuda") for v in lowered.values())


def test_kernel_names_cover_every_instance():
    """The instances the plans can ask for: 3 dtypes x (7 powers of two + 2 groups) quantize kernels + 3
    dequantize; 3 x 2 x (2 two-state + 5 one-state, Muon's momentum the fifth) steps + 3 4-bit Adam steps + 3 x 4
    norm kernels + the reduction; 4 tree kernels
    (compaction: 4 element sizes)."""
    names = {family: kestrel._C.jit_kernel_names(family) for family in _jit.FAMILIES}
    assert len(names["quantize"]) == 3 * 9 + 3
    assert len(names["optim"]) == 3 * 2 * 7 + 3 + 3 * 4 + 1  # + Adam with 4-bit states, per dtype
    assert "kestrel::cuda::one_state_kernel<__half, (kestrel::optim::OneState)4, true>" in names["optim"]
    assert len(names["tree_verify"]) == 3 + 4
    assert "kestrel::cuda::quantize_blockwise_kernel<__nv_bfloat16, 4096>" in names["quantize"]
    assert "kestrel::cuda::two_state_kernel<float, (kestrel::optim::TwoState)1, true>" in names["optim"]


def test_nvrtc_options_match_the_native_build():
    """The JIT path compiles with the native build's nvcc flags (csrc/sources.txt [nvcc_flags]): no fused
    multiply-add, so JIT kernels round as the native and CPU kernels do."""
    text = (ROOT / "csrc" / "sources.txt").read_text()
    section = text.split("[nvcc_flags]", 1)[1].split("[", 1)[0]
    flags = [line.split("#")[0].strip() for line in section.splitlines() if line.split("#")[0].strip()]
    assert all(flag in _jit.OPTIONS for flag in flags), (flags, _jit.OPTIONS)


# ------------------------------------------------------------------------------------------------- launches
@pytest.fixture(scope="module")
def sim():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_sim"))
    import build

    module = build.load()
    log = ctypes.CDLL(module.__file__)
    log.kestrel_sim_log_read.restype = ctypes.c_char_p
    return torch.ops.kestrel_sim, log


def native_launches(sim, op, *args):
    """The native launchers' launches for op(*args) (run on the CPU by tests/cuda_sim): (symbol, grid, block,
    shared)."""
    ops, log = sim
    args = [getattr(torch, a) if a in ("float32", "float16", "bfloat16") else a for a in args]  # the schema's dtype
    log.kestrel_sim_log_start()
    getattr(ops, op)(*clone(args))
    records = []
    for line in log.kestrel_sim_log_read().decode().splitlines():
        symbol, *numbers = line.split()
        numbers = [int(v) for v in numbers]
        records.append((symbol, tuple(numbers[0:3]), tuple(numbers[3:6]), numbers[6]))
    return records


def jit_launches(compiled, result):
    """A kestrel._C.jit_<op> result's launches as (lowered symbol, grid, block, shared)."""
    launches, _keep = result
    return [(compiled[family][1][kernel], grid, block, shared) for family, kernel, grid, block, shared, _ in launches]


def host_half(op, *args):
    """kestrel._C.jit_<op>(*args)'s (launches, keep) (the step ops take the capture flag first)."""
    fn = getattr(kestrel._C, "jit_" + op)
    if op.endswith("_step_") or op == "update_norms":
        result = fn(False, *clone(args))
        return result[1] if op == "update_norms" else result
    if op == "compact_kv_cache":  # no outputs: the result is (launches, keep)
        return fn(*clone(args))
    return fn(*clone(args))[1]


def assert_same_launches(sim, compiled, op, *args):
    native = native_launches(sim, op, *args)
    jit = jit_launches(compiled, host_half(op, *args))
    assert jit == native, f"{op}: JIT {jit} != native {native}"
    return native


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_launches_equal_the_native_launchers(sim, compiled, dtype):
    g = torch.Generator().manual_seed(0)
    seen = set()
    for blocksize in (64, 128, 256, 512, 1024, 2048, 4096, 1, 100, 3000, 5000):
        for n in (1, 3 * min(blocksize, 4096) + 7):
            x = special_values(n, g).to(dtype)
            code = Q.create_dynamic_map(True)
            launches = assert_same_launches(sim, compiled, "quantize_blockwise", x, code, blocksize)
            codes, absmax = torch.ops.kestrel.quantize_blockwise(x, code, blocksize)
            launches += assert_same_launches(
                sim, compiled, "dequantize_blockwise", codes, absmax, code, blocksize, str(dtype)[6:]
            )
            seen.update(symbol for symbol, *_ in launches)
    assert len(seen) == 9 + 1  # every quantize instance of this dtype, and the dequantize kernel


def step_args(dtype, eight_bit, optimizer, g):
    two_state = optimizer in ("adam", "ademamix")
    moments1 = 2 if optimizer == "ademamix" else 1
    params, grads, s1, s2, a1, a2 = optimizer_inputs(dtype, eight_bit, two_state, moments1, g)
    steps = torch.tensor([1, 7, 2, 30, 5])
    if two_state:
        scalars = (1e-3, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.01, 1.0, -1, None, 0.0, None, False)
        if eight_bit:
            maps = (Q.create_dynamic_map(True), Q.create_dynamic_map(False))
            return "two_state8bit_step_", (optimizer, params, grads, s1, s2, a1, a2, *maps, steps) + scalars
        return "two_state32bit_step_", (optimizer, params, grads, s1, s2, steps) + scalars
    scalars = (1e-3, 0.9, 0.99, 1e-8, 0.01, 1.0, -1, None, 0.0, None, False)
    if eight_bit:
        return "one_state8bit_step_", (optimizer, params, grads, s1, a1, Q.create_dynamic_map(True), steps) + scalars
    return "one_state32bit_step_", (optimizer, params, grads, s1, steps) + scalars


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("eight_bit", [True, False])
def test_optimizer_launches_equal_the_native_launchers(sim, compiled, dtype, eight_bit):
    g = torch.Generator().manual_seed(1)
    for optimizer in ("adam", "ademamix", "momentum", "rmsprop", "adagrad", "lion", "muon"):
        op, args = step_args(dtype, eight_bit, optimizer, g)
        (launch,) = assert_same_launches(sim, compiled, op, *args)
        assert launch[1] == ((sum((p.numel() + 255) // 256 for p in args[1]) + 7) // 8, 1, 1)
        two = optimizer in ("adam", "ademamix")
        params, grads, s1, s2, a1, a2 = optimizer_inputs(dtype, eight_bit, two, 1, g)
        q1, q2 = (Q.create_dynamic_map(True), Q.create_dynamic_map(False)) if eight_bit else (None, None)
        if optimizer in ("adam", "momentum"):
            norm_args = (
                (optimizer, params, grads, s1, s2, a1, a2, q1, q2)
                if two
                else (optimizer, params, grads, s1, s1, a1, a1, q1, None)
            )
            norm_args += (torch.tensor([1, 7, 2, 30, 5]), 0.9, 0.999, 1e-8, 0.01, 1.0)
            launches = assert_same_launches(sim, compiled, "update_norms", *norm_args)
            assert len(launches) == 2 and launches[1][1] == (5, 1, 1)  # the reduction: a CTA per parameter


def test_tree_launches_equal_the_native_launchers(sim, compiled):
    g = torch.Generator().manual_seed(2)
    for B, T, V in ((1, 1, 5), (130, 16, 12), (2, 9, 300)):
        tree = random_trees(B, T, g)
        candidates = torch.randint(0, V, (B, T), generator=g)
        target = torch.randint(0, V, (B, T), generator=g)
        greedy = (candidates, target, tree.first_child, tree.next_sibling, tree.max_depth)
        assert_same_launches(sim, compiled, "verify_tree_greedy", *greedy)
        probs = torch.rand(B, T, V, generator=g)
        for draft in (None, torch.softmax(torch.randn(B, T, V, generator=g), -1)):
            sample = (candidates, probs, tree.first_child, tree.next_sibling, torch.rand(B, T), torch.rand(B), draft)
            assert_same_launches(sim, compiled, "verify_tree_sample", *sample, tree.max_depth)
    for dtype in (torch.uint8, torch.float16, torch.float32, torch.float64):
        for layers in (0, 3):
            lead = (layers,) if layers else ()
            k = torch.randn(lead + (3, 2, 24, 8), generator=g).to(dtype)
            v = torch.randn(lead + (3, 2, 24, 5), generator=g).to(dtype)
            lens = torch.tensor([0, 5, 11], dtype=torch.int32)
            accept = torch.tensor([[0, 2, 3, -1], [0, 1, -1, -1], [0, 4, 7, 9]], dtype=torch.int32)
            launches = assert_same_launches(sim, compiled, "compact_kv_cache", k, v, lens, accept)
            assert [launch[1] for launch in launches] == [((layers or 1) * 3 * 2, 2, 1), (1, 1, 1)]


def test_an_empty_call_launches_nothing(sim, compiled):
    assert assert_same_launches(sim, compiled, "quantize_blockwise", torch.zeros(0), Q.create_dynamic_map(), 64) == []
    empty = torch.zeros(0)
    args = ("adam", [empty], [empty], [empty], [empty], torch.tensor([1]))
    args += (1e-3, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.0, 1.0, -1, None, 0.0, None, False)
    assert assert_same_launches(sim, compiled, "two_state32bit_step_", *args) == []


def test_the_argument_struct_holds_the_call():
    """quantize_blockwise's QuantizeArgs, as the JIT path passes it to cuLaunchKernel: x, code, codes, absmax, n,
    blocksize, ceil(n / blocksize), in kestrel/kernel_args.h's order; a step's StepArgs points at its metadata."""
    x, code = torch.randn(1000), Q.create_dynamic_map(True)
    (codes, absmax), (launches, keep) = kestrel._C.jit_quantize_blockwise(x, code, 256)
    assert [t.data_ptr() for t in keep] == [x.data_ptr(), code.data_ptr()]  # alive until the launch is queued
    ((_, kernel, grid, block, shared, args),) = launches
    assert kernel == "kestrel::cuda::quantize_blockwise_kernel<float, 256>" and block == (256, 1, 1) and shared == 0
    assert struct.unpack("<4Q3q", args) == (
        x.data_ptr(), code.data_ptr(), codes.data_ptr(), absmax.data_ptr(), 1000, 256, 4
    )  # fmt: skip
    op, step = step_args(torch.float32, True, "adam", torch.Generator().manual_seed(0))
    launches, keep = kestrel._C.jit_two_state8bit_step_(False, *step)
    meta_bytes = kestrel._C.jit_meta_bytes()
    assert len(keep) == 1 and keep[0].numel() == 5 * meta_bytes  # the metadata of the 5 parameters
    _, (norm_launches, norm_keep) = kestrel._C.jit_update_norms(
        False, "adam", *step[1:9], step[9], 0.9, 0.999, 1e-8, 0.0, 1.0
    )
    assert len(norm_launches) == 2 and len(norm_keep) == 2  # the metadata and the block sums (scratch)
    meta, num_tensors, total_blocks, qmap1, qmap2, block_sums = struct.unpack("<Qi4xqQQQ", launches[0][5])
    assert (meta, num_tensors, qmap1, qmap2) == (keep[0].data_ptr(), 5, step[7].data_ptr(), step[8].data_ptr())
    assert block_sums == 0  # the norm pass's scratch: unused by a step
    assert total_blocks == sum((p.numel() + 255) // 256 for p in step[1])


def test_the_host_half_refuses_bad_input_as_the_native_op_does(sim):
    """The checks are the native op's (csrc/*_op.h): the same message, and nothing written."""
    ops, _ = sim
    code = Q.create_dynamic_map(True)
    cases = [
        ("quantize_blockwise", (torch.randn(10), code, 0)),
        ("quantize_blockwise", (torch.randn(10, dtype=torch.float64), code, 64)),
        ("dequantize_blockwise", (torch.zeros(10, dtype=torch.uint8), torch.ones(3), code, 64, "float32")),
    ]
    for op, args in cases:
        with pytest.raises(RuntimeError) as native:
            getattr(ops, op)(*(a if a != "float32" else torch.float32 for a in args))
        with pytest.raises(RuntimeError) as jit:
            getattr(kestrel._C, "jit_" + op)(*args)
        assert str(jit.value).split("\n")[0] == str(native.value).split("\n")[0]
    op, args = step_args(torch.float32, True, "adam", torch.Generator().manual_seed(0))
    bad = list(args)
    bad[9] = torch.tensor([1, 2])  # steps for 2 of the 5 parameters
    before = [p.clone() for p in bad[1]]
    with pytest.raises(RuntimeError, match="steps must be a 1-D CPU int64 tensor of 5 step counts"):
        kestrel._C.jit_two_state8bit_step_(False, *bad)
    assert all(torch.equal(a, b) for a, b in zip(before, bad[1]))


# ------------------------------------------------------------------------------------------------- the cache
CACHE_PROBE = """
import json, sys, time
from kestrel import _jit
compiled = []
real = _jit.compile_family
def counting(*args):
    compiled.append(args)
    return real(*args)
_jit.compile_family = counting
began = time.perf_counter()
cubin, lowered, path = _jit.cached_family("tree_verify", "sm_90")
print(json.dumps(dict(compiled=len(compiled), path=str(path), seconds=time.perf_counter() - began)))
"""


def test_the_cache_is_reused_across_processes_and_invalidated_by_a_header_change(tmp_path, monkeypatch):
    need_jit()
    env = dict(os.environ, KESTREL_CACHE_DIR=str(tmp_path / "cache"))

    def probe():
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = probe(), probe()
    assert first["compiled"] == 1 and second["compiled"] == 0 and first["path"] == second["path"]
    assert Path(first["path"]).is_file() and Path(first["path"]).parent == tmp_path / "cache"
    # the same family from an edited copy of the headers: another key, compiled again
    headers = tmp_path / "include"
    shutil.copytree(_jit.kestrel_include_dir(), headers)
    with open(headers / "kestrel" / "tree_verify.h", "a") as f:
        f.write("\n// an edit\n")
    monkeypatch.setenv("KESTREL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_jit, "kestrel_include_dir", lambda: headers)
    _, _, path = _jit.cached_family("tree_verify", "sm_90")
    assert path != Path(first["path"]) and path.is_file()
    assert len(list((tmp_path / "cache").glob("tree_verify-sm_90-*.cubin"))) == 2


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KESTREL_CACHE_DIR", str(tmp_path / "x"))
    assert _jit.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("KESTREL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _jit.cache_dir() == tmp_path / "xdg" / "kestrel" / "jit"


# ------------------------------------------------------------------------------------------------- backends
def test_backend_selection(monkeypatch):
    native = _jit.native_available()
    for value, expected in (
        ("auto", "native" if native else "jit"),
        ("jit", "jit"),
        ("native", "native" if native else "none"),
    ):
        monkeypatch.setenv("KESTREL_CUDA_BACKEND", value)
        assert _jit.active_backend() == expected
        assert _jit.describe().startswith(expected)
    monkeypatch.setenv("KESTREL_CUDA_BACKEND", "cupy")
    with pytest.raises(ValueError, match="KESTREL_CUDA_BACKEND must be one of auto, native, jit, got 'cupy'"):
        _jit.active_backend()


def test_info_names_the_backend_and_the_cache(tmp_path):
    env = dict(os.environ, KESTREL_CACHE_DIR=str(tmp_path), KESTREL_CUDA_BACKEND="jit")
    out = subprocess.run([sys.executable, "-m", "kestrel", "info"], env=env, capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("CUDA kernels of the C++ ops:"))
    assert "jit (kernels compiled at first use" in line and str(tmp_path) in line


def test_import_kestrel_never_imports_cupy():
    probe = (
        "import sys, kestrel, kestrel.ops, kestrel.optim, kestrel.decoding, kestrel.models; "
        "print(any(m.split('.')[0] in ('cupy', 'cupy_backends') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_clear_errors_without_cupy_or_without_a_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy_backends", None)  # import cupy_backends... raises ImportError
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", None)
    with pytest.raises(_jit.JitUnavailable, match=r"CuPy is not installed.*pip install 'kestrel\[jit\]'.*rebuild"):
        _jit.compile_family("quantize", "sm_90")
    if not _jit.native_available():
        monkeypatch.setenv("KESTREL_CUDA_BACKEND", "native")
        with pytest.raises(_ext.ExtensionMissing, match=r"KESTREL_CUDA_BACKEND=native.*kestrel\[jit\].*FORCE_CUDA"):
            _ext.require("quantize_blockwise", torch.device("cuda"))
        monkeypatch.setenv("KESTREL_CUDA_BACKEND", "auto")
        _ext.require("quantize_blockwise", torch.device("cuda"))  # the JIT path takes it
        with pytest.raises(_ext.ExtensionMissing, match="the JIT path does not run it"):
            _ext.require("PagedAdamW8bit (paged state)", torch.device("cuda"), native_only=True)


def test_the_jit_kernels_are_registered_for_cuda_when_native_is_absent():
    if _jit.native_available():
        pytest.skip("kestrel._C has its CUDA part: the JIT path is not registered by default")
    for op in _jit.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kestrel::{op}", "CUDA"), op


# ------------------------------------------------------------------------------------------------- on a GPU
def _cuda(a):
    return tensors_mapped(torch.Tensor.cuda, a)


def _cpu(a):
    return tensors_mapped(torch.Tensor.cpu, a)


def _same(a, b):
    if torch.is_tensor(a):
        a, b = a.cpu(), b.cpu()
        if a.dtype.is_floating_point:
            assert torch.equal(torch.isnan(a), torch.isnan(b))
            a, b = a.nan_to_num(0.0).view(torch.uint8), b.nan_to_num(0.0).view(torch.uint8)
        assert torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b):
            _same(x, y)


@pytest.mark.gpu
def test_jit_kernels_equal_the_cpu_and_native_kernels_bit_for_bit(tmp_path, monkeypatch):
    """Every op through the JIT path on the GPU against the CPU kernels (and the native CUDA kernels when built);
    the first call's compile time and a cached call's overhead are printed for benchmarks/RESULTS.md."""
    need_jit()
    monkeypatch.setenv("KESTREL_CACHE_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(5)
    native = _jit.native_available()
    began = time.perf_counter()
    x = special_values(10_000, g)
    code = Q.create_dynamic_map(True)
    jit_q = _jit.quantize_blockwise(x.cuda(), code.cuda(), 256)
    torch.cuda.synchronize()
    first = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(20):
        _jit.quantize_blockwise(x.cuda(), code.cuda(), 256)
    torch.cuda.synchronize()
    cached = (time.perf_counter() - began) / 20
    print(f"\nJIT quantize: first call {first:.2f} s (compile + load), cached call {cached * 1e6:.0f} us")
    for dtype in FLOATS:
        for blocksize in (64, 256, 4096, 100, 3000):
            xd = x.to(dtype)
            cpu = torch.ops.kestrel.quantize_blockwise(xd, code, blocksize)
            jit = _jit.quantize_blockwise(xd.cuda(), code.cuda(), blocksize)
            _same(cpu, jit)
            if native:
                _same(torch.ops.kestrel.quantize_blockwise(xd.cuda(), code.cuda(), blocksize), jit)
            _same(
                torch.ops.kestrel.dequantize_blockwise(*cpu, code, blocksize, dtype),
                _jit.dequantize_blockwise(*_cuda(cpu), code.cuda(), blocksize, dtype),
            )
        for eight_bit in (True, False):
            for optimizer in ("adam", "ademamix", "momentum", "rmsprop", "adagrad", "lion", "muon"):
                op, args = step_args(dtype, eight_bit, optimizer, g)
                cpu_args, gpu_args = clone(args), list(_cuda(clone(args)))
                steps_at = {"two_state8bit_step_": 9, "two_state32bit_step_": 5, "one_state8bit_step_": 6}.get(op, 4)
                gpu_args[steps_at] = args[steps_at]  # the step counts stay on the CPU
                getattr(torch.ops.kestrel, op)(*cpu_args)
                getattr(_jit, op)(*gpu_args)
                _same(cpu_args[1:5], gpu_args[1:5])
    assert jit_q is not None


@pytest.mark.gpu
def test_jit_tree_verification_and_compaction_equal_the_cpu_kernels(tmp_path, monkeypatch):
    need_jit()
    monkeypatch.setenv("KESTREL_CACHE_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(6)
    B, T, V = 3, 9, 300
    tree = random_trees(B, T, g)
    candidates = torch.randint(0, V, (B, T), generator=g)
    target = torch.randint(0, V, (B, T), generator=g)
    greedy = (candidates, target, tree.first_child, tree.next_sibling, tree.max_depth)
    _same(torch.ops.kestrel.verify_tree_greedy(*greedy), _jit.verify_tree_greedy(*_cuda(greedy)))
    probs = torch.rand(B, T, V, generator=g)
    for draft in (None, torch.softmax(torch.randn(B, T, V, generator=g), -1)):
        sample = (candidates, probs, tree.first_child, tree.next_sibling, torch.rand(B, T), torch.rand(B), draft)
        sample += (tree.max_depth,)
        _same(torch.ops.kestrel.verify_tree_sample(*sample), _jit.verify_tree_sample(*_cuda(sample)))
    k, v = torch.randn(2, 3, 2, 24, 8, generator=g), torch.randn(2, 3, 2, 24, 5, generator=g)
    lens = torch.tensor([0, 5, 11], dtype=torch.int32)
    accept = torch.tensor([[0, 2, 3, -1], [0, 1, -1, -1], [0, 4, 7, 9]], dtype=torch.int32)
    cpu = clone((k, v, lens, accept))
    gpu = _cuda(clone((k, v, lens, accept)))
    torch.ops.kestrel.compact_kv_cache(*cpu)
    _jit.compact_kv_cache(*gpu)
    _same(cpu, _cpu(gpu))


def test_run_launches_passes_the_argument_struct_to_cuLaunchKernel(monkeypatch):
    """The Python launch (kestrel._jit.run_launches) with CuPy's driver call recorded instead of made: the recorded
    launch's function (by lowered name), grid, block, shared memory and torch's current stream, and the `extra`
    list cuLaunchKernel reads: {BUFFER_POINTER, the argument struct's bytes, BUFFER_SIZE, its size, END}."""
    pytest.importorskip("cupy")
    import cupy
    from cupy_backends.cuda.api import driver

    x, code = torch.randn(1000), Q.create_dynamic_map(True)
    (codes, absmax), (launches, keep) = kestrel._C.jit_quantize_blockwise(x, code, 256)
    calls = []

    def record(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        words = (ctypes.c_void_p * 5).from_address(extra)
        assert (words[0], words[2], words[4]) == (1, 2, None)  # CU_LAUNCH_PARAM_BUFFER_POINTER / _SIZE / _END
        size = ctypes.c_size_t.from_address(words[3]).value
        calls.append((function, (gx, gy, gz), (bx, by, bz), shared, stream, params, ctypes.string_at(words[1], size)))

    class Function:
        def __init__(self, name):
            self.ptr = hash(name) & 0xFFFF

    class Module:
        def function(self, kernel):
            return Function(kernel)

    class Stream:
        cuda_stream = 1234

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(driver, "launchKernel", record)
    monkeypatch.setattr(cupy.cuda, "Device", Device)
    monkeypatch.setattr(_jit, "_module", lambda family, index: Module())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: Stream())
    _jit.run_launches(launches, torch.device("cuda", 0))
    ((family, kernel, grid, block, shared, args),) = launches
    assert calls == [(Function(kernel).ptr, grid, block, shared, 1234, 0, args)]
    assert len(args) == 56 and struct.unpack("<4Q3q", args)[4:] == (1000, 256, 4)


def test_the_python_cuda_kernels_run_the_host_half_and_launch(monkeypatch):
    """Every Python CUDA kernel the JIT path registers, called on CPU tensors with the launch recorded instead of
    made: the schema's arguments reach the host half (trailing defaults filled in when the call leaves them out),
    and its launches go to run_launches on the inputs' device."""
    recorded = []
    monkeypatch.setattr(_jit, "run_launches", lambda launches, device: recorded.append((launches, device)))
    g = torch.Generator().manual_seed(3)
    x, code = torch.randn(3000, generator=g), Q.create_dynamic_map(True)
    codes, absmax = _jit.quantize_blockwise(x, code, 256)
    assert codes.shape == x.shape and absmax.shape == (12,)
    _jit.dequantize_blockwise(codes, absmax, code, 256, torch.bfloat16)
    for dtype, eight_bit, optimizer in ((torch.float32, True, "adam"), (torch.bfloat16, False, "lion")):
        op, args = step_args(dtype, eight_bit, optimizer, g)
        getattr(_jit, op)(*args)
        required = args[: len(args) - 5]  # round_seed, norms, max_unorm, lr_tensor, robust_rounding: defaults
        getattr(_jit, op)(*required)
        assert recorded[-1][0][0][1] == recorded[-2][0][0][1]  # the same kernel either way
    op, args = step_args(torch.float32, True, "adam", g)
    norms = _jit.update_norms("adam", *args[1:10], 0.9, 0.999, 1e-8, 0.0, 1.0)
    assert norms.shape == (5, 2)
    tree = random_trees(2, 5, g)
    candidates = torch.randint(0, 20, (2, 5), generator=g)
    _jit.verify_tree_greedy(candidates, candidates.clone(), tree.first_child, tree.next_sibling, tree.max_depth)
    probs = torch.rand(2, 5, 20, generator=g)
    _jit.verify_tree_sample(
        candidates, probs, tree.first_child, tree.next_sibling, torch.rand(2, 5), torch.rand(2), None, tree.max_depth
    )
    k = torch.randn(2, 2, 16, 4)
    _jit.compact_kv_cache(k, k.clone(), torch.tensor([0, 3], dtype=torch.int32), torch.tensor([[0, 1], [0, -1]]).int())
    kernels = [launches[0][1].split("<")[0].split("::")[-1] for launches, _ in recorded]
    assert kernels == [
        "quantize_blockwise_kernel",
        "dequantize_blockwise_kernel",
        "two_state_kernel",
        "two_state_kernel",
        "one_state_kernel",
        "one_state_kernel",
        "norm_kernel",
        "verify_greedy_kernel",
        "verify_sample_kernel",
        "compact_kernel",
    ]
    assert all(device.type == "cpu" for _, device in recorded)
