"""The JIT path: kestrel's CUDA kernels compiled at first use by NVRTC, through CuPy, when kestrel._C has no CUDA
part (docs/architecture.md, "The JIT path").

A kestrel._C built without nvcc (a CPU-built wheel, or a GPU machine with torch's pip wheels and no toolkit) still
carries the host half of every CUDA op (csrc/jit_ops.cpp): the same checks, outputs, per-parameter metadata and
kernel argument structs as the native registrations, and the launches kestrel/launch_plan.h plans. This module
registers Python CUDA kernels for those ops with PyTorch's dispatcher (`kestrel::quantize_blockwise`, the optimizer
steps, `update_norms`, tree verification, KV-cache compaction: the same ops, so the optimizers, the decoding stack,
torch.compile and CUDA graphs see no difference) which

1. call kestrel._C.jit_<op>(...), which returns the launches: (family, kernel name expression, grid, block, shared
   memory, argument-struct bytes);
2. compile the family's kernels (every template instance, by NVRTC name expressions) from the installed headers
   for the device's architecture with CuPy's NVRTC binding (cupy_backends.cuda.libs.nvrtc), caching the cubin on
   disk, keyed by the headers' and the CUDA headers' contents, the options, the architecture and the NVRTC version
   (KESTREL_CACHE_DIR, default ~/.cache/kestrel/jit);
3. load the cubin (cupy.cuda.function.Module) and launch each kernel with cuLaunchKernel on torch's current stream,
   its argument struct as the parameter buffer (torch owns every tensor: no copies, no CuPy allocations).

KESTREL_CUDA_BACKEND=native|jit|auto (default auto: native when kestrel._C has its CUDA part, else jit). CuPy is
optional (`pip install 'kestrel[jit]'`: cupy-cuda13x, the NVRTC and CUDA runtime-header wheels) and imported only
when a kernel is first compiled or launched: `import kestrel` never imports it.
"""

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from . import _ext

FAMILIES = {"quantize": "kestrel/quantize.cuh", "optim": "kestrel/optim.cuh", "tree_verify": "kestrel/tree_verify.cuh"}
# NVRTC options of every family: those of csrc/sources.txt's [nvcc_flags] (no fused multiply-add: the CUDA kernels
# round as the CPU kernels do; tests/test_jit.py checks the two lists agree) and the C++ standard of the headers
OPTIONS = ["--fmad=false", "-lineinfo", "-std=c++17"]
BACKENDS = ("auto", "native", "jit")
# the ops the JIT path runs (paged-optimizer memory, managed_zeros / prefetch, needs the native part)
OPS = (
    "quantize_blockwise",
    "dequantize_blockwise",
    "two_state8bit_step_",
    "two_state4bit_step_",
    "two_state32bit_step_",
    "one_state8bit_step_",
    "one_state32bit_step_",
    "update_norms",
    "verify_tree_greedy",
    "verify_tree_sample",
    "compact_kv_cache",
)

NO_KERNELS = (
    "kestrel._C was built without its CUDA kernels and {why}. Two ways to get them: install CuPy for the JIT path, "
    "which compiles them at first use (pip install 'kestrel[jit]': cupy-cuda13x matching torch's CUDA 13, the "
    "nvidia-cuda-nvrtc and nvidia-cuda-runtime wheels), or rebuild kestrel where nvcc and a CUDA build of torch are "
    "present (pip install --no-build-isolation -e . with FORCE_CUDA=1 when no GPU is visible; see README.md)"
)


class JitUnavailable(RuntimeError):
    """A CUDA tensor reached a kestrel C++ op, kestrel._C has no CUDA part, and the JIT path cannot run."""


def requested_backend():
    value = os.environ.get("KESTREL_CUDA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"KESTREL_CUDA_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def native_available():
    info = _ext.build_info()
    return bool(info and info["cuda"])


def active_backend():
    """'native', 'jit' or 'none': what runs kestrel's C++ ops on CUDA tensors in this process."""
    backend = requested_backend()
    if backend == "native" or (backend == "auto" and native_available()):
        return "native" if native_available() else "none"
    return "jit" if _ext.available() else "none"


def cache_dir():
    """Where compiled modules are kept: KESTREL_CACHE_DIR, else $XDG_CACHE_HOME/kestrel/jit or ~/.cache/kestrel/jit."""
    if os.environ.get("KESTREL_CACHE_DIR"):
        return Path(os.environ["KESTREL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kestrel" / "jit"


def kestrel_include_dir():
    """The directory holding kestrel/*.h and kestrel/*.cuh: the installed package's _include (a wheel) or the source
    tree's csrc/include (an editable install)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_include", package.parents[1] / "csrc" / "include"):
        if (candidate / "kestrel" / "common.h").is_file():
            return candidate
    raise JitUnavailable(f"kestrel JIT: kestrel's kernel headers are not installed (looked in {package / '_include'})")


def cuda_include_dirs():
    """Directories with the CUDA headers the kernels include under NVRTC (cuda_fp16.h, cuda_bf16.h):
    KESTREL_CUDA_INCLUDE, the nvidia-cuda-runtime wheel (site-packages/nvidia/cu*/include), CUDA_HOME / CUDA_PATH,
    /usr/local/cuda."""
    candidates = []
    if os.environ.get("KESTREL_CUDA_INCLUDE"):
        candidates.append(Path(os.environ["KESTREL_CUDA_INCLUDE"]))
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            candidates += sorted(nvidia.glob("*/include"), reverse=True)
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append(Path(os.environ[variable]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for candidate in candidates:
        if (candidate / "cuda_fp16.h").is_file() and (candidate / "cuda_bf16.h").is_file():
            return [candidate]
    raise JitUnavailable(
        "kestrel JIT: the CUDA headers cuda_fp16.h / cuda_bf16.h were not found (looked in KESTREL_CUDA_INCLUDE, "
        "site-packages/nvidia/*/include, CUDA_HOME, CUDA_PATH, /usr/local/cuda/include): pip install "
        "nvidia-cuda-runtime (part of kestrel[jit]) or set KESTREL_CUDA_INCLUDE"
    )


def _nvrtc():
    """CuPy's NVRTC binding (imported here, never by `import kestrel`)."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as error:
        raise JitUnavailable(NO_KERNELS.format(why=f"CuPy is not installed ({error})")) from error
    return nvrtc


def nvrtc_version():
    major, minor = _nvrtc().getVersion()
    return f"{major}.{minor}"


def _source_digest(family, arch, include_dirs, names):
    """The cache key's hash: kestrel's headers, the CUDA fp16/bf16 headers, the translation unit, the options, the
    kernel names, the architecture and the NVRTC version."""
    digest = hashlib.sha256()
    kestrel_dir = kestrel_include_dir()
    for path in sorted((kestrel_dir / "kestrel").glob("*")):
        if path.suffix in (".h", ".cuh"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for directory in include_dirs:
        for name in ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp"):
            path = Path(directory) / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps([FAMILIES[family], OPTIONS, names, arch, nvrtc_version()]).encode())
    return digest.hexdigest()


def compile_family(family, arch):
    """NVRTC-compile every kernel of `family` for `arch` (e.g. "sm_90", no device needed): (cubin bytes,
    {name expression: lowered name}, compiler log). Raises RuntimeError with NVRTC's log on an error."""
    nvrtc = _nvrtc()
    names = list(_ext._C.jit_kernel_names(family))
    include_dirs = [kestrel_include_dir(), *cuda_include_dirs()]
    source = f'#include "{FAMILIES[family]}"\n'
    program = nvrtc.createProgram(source, f"kestrel_{family}.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        options = [f"-arch={arch}", *OPTIONS, *[f"-I{d}" for d in include_dirs]]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            log = nvrtc.getProgramLog(program)
            raise RuntimeError(f"kestrel JIT: NVRTC failed to compile {family} for {arch} ({error}):\n{log}") from None
        log = nvrtc.getProgramLog(program).strip()
        cubin = bytes(nvrtc.getCUBIN(program))
        lowered = {name: nvrtc.getLoweredName(program, name) for name in names}
    finally:
        nvrtc.destroyProgram(program)
    return cubin, lowered, log


_LOCK = threading.Lock()


def cached_family(family, arch):
    """(cubin, lowered names, path): from the disk cache, or compiled and stored there (written atomically, so
    processes that compile at once each leave a whole file)."""
    include_dirs = cuda_include_dirs()
    names = list(_ext._C.jit_kernel_names(family))
    key = _source_digest(family, arch, include_dirs, names)[:20]
    directory = cache_dir()
    stem = f"{family}-{arch}-nvrtc{nvrtc_version()}-{key}"
    cubin_path, names_path = directory / f"{stem}.cubin", directory / f"{stem}.json"
    with _LOCK:
        if cubin_path.is_file() and names_path.is_file():
            return cubin_path.read_bytes(), json.loads(names_path.read_text()), cubin_path
        cubin, lowered, _ = compile_family(family, arch)
        directory.mkdir(parents=True, exist_ok=True)
        for path, data in ((names_path, json.dumps(lowered).encode()), (cubin_path, cubin)):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return cubin, lowered, cubin_path


def device_arch(index):
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


class _Module:
    """One family's cubin loaded on one device, its kernels by name expression."""

    def __init__(self, family, index):
        import cupy

        cubin, self.lowered, self.path = cached_family(family, device_arch(index))
        with cupy.cuda.Device(index):
            self.module = cupy.cuda.function.Module()
            self.module.load(cubin)
        self.functions = {}

    def function(self, kernel):
        if kernel not in self.functions:
            self.functions[kernel] = self.module.get_function(self.lowered[kernel])
        return self.functions[kernel]


@functools.cache
def _module(family, index):
    return _Module(family, index)


# cuLaunchKernel's `extra` markers: the parameter buffer, its size, the end of the list
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0


def run_launches(launches, device):
    """Launch the recorded launches (kestrel._C.jit_<op>'s) in order on torch's current stream of `device`."""
    if not launches:
        return
    try:
        import cupy
        from cupy_backends.cuda.api import driver
    except ImportError as error:
        raise JitUnavailable(NO_KERNELS.format(why=f"CuPy is not installed ({error})")) from error
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    with cupy.cuda.Device(index):
        for family, kernel, grid, block, shared_bytes, args in launches:
            function = _module(family, index).function(kernel)
            buffer = ctypes.create_string_buffer(args, len(args))
            size = ctypes.c_size_t(len(args))
            extra = (ctypes.c_void_p * 5)(
                _PARAM_BUFFER_POINTER, ctypes.addressof(buffer), _PARAM_BUFFER_SIZE, ctypes.addressof(size), _PARAM_END
            )
            driver.launchKernel(function.ptr, *grid, *block, shared_bytes, stream, 0, ctypes.addressof(extra))


@contextlib.contextmanager
def _relaxed_capture(capturing):
    """During a CUDA graph capture, the calling thread in relaxed capture mode (cudaThreadExchangeStreamCaptureMode),
    so that the step's pinned metadata buffer can be allocated, as the native path does."""
    if not capturing:
        yield
        return
    cudart = ctypes.CDLL(f"libcudart.so.{(torch.version.cuda or '13').split('.')[0]}")
    mode = ctypes.c_int(2)  # cudaStreamCaptureModeRelaxed
    cudart.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode))
    try:
        yield
    finally:
        cudart.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode))


def _first_device(tensors, fallback):
    return tensors[0].device if len(tensors) else fallback.device


# The Python CUDA kernels of the ops (their schemas: csrc/ops.cpp). Each runs the op's host half in kestrel._C and
# launches what it recorded; outputs come back from the host half.


def quantize_blockwise(x, code, blocksize):
    outputs, (launches, keep) = _ext._C.jit_quantize_blockwise(x, code, blocksize)
    run_launches(launches, x.device)
    return outputs


def dequantize_blockwise(codes, absmax, code, blocksize, dtype):
    name = str(dtype).replace("torch.", "")
    out, (launches, keep) = _ext._C.jit_dequantize_blockwise(codes, absmax, code, blocksize, name)
    run_launches(launches, codes.device)
    return out


def schema_values(op, args, kwargs):
    """An op call's arguments in its schema's order, defaults filled in (the dispatcher may leave trailing defaults
    out of a Python kernel's call)."""
    values = []
    for i, argument in enumerate(getattr(torch.ops.kestrel, op).default._schema.arguments):
        if i < len(args):
            values.append(args[i])
        elif argument.name in kwargs:
            values.append(kwargs[argument.name])
        else:
            values.append(argument.default_value)
    return values


def _capturing(params):
    return len(params) > 0 and params[0].is_cuda and torch.cuda.is_current_stream_capturing()


def _step_kernel(op):
    """The Python CUDA kernel of a step op: kestrel._C.jit_<op>(capturing, *schema arguments), then the launches.
    The schemas list (optimizer, params, ...) first and take the step counts as `steps`."""

    def kernel(*args, **kwargs):  # kestrel._C and the schemas are looked up at the call (kestrel._C may be absent)
        arguments = getattr(torch.ops.kestrel, op).default._schema.arguments
        values = schema_values(op, args, kwargs)
        params = values[1]
        capturing = _capturing(params)
        with _relaxed_capture(capturing):
            launches, keep = getattr(_ext._C, "jit_" + op)(capturing, *values)
        run_launches(launches, _first_device(params, values[[a.name for a in arguments].index("steps")]))

    kernel.__name__ = op
    return kernel


two_state8bit_step_ = _step_kernel("two_state8bit_step_")
two_state4bit_step_ = _step_kernel("two_state4bit_step_")
two_state32bit_step_ = _step_kernel("two_state32bit_step_")
one_state8bit_step_ = _step_kernel("one_state8bit_step_")
one_state32bit_step_ = _step_kernel("one_state32bit_step_")


def update_norms(*args, **kwargs):
    values = schema_values("update_norms", args, kwargs)
    capturing = _capturing(values[1])
    norms, (launches, keep) = _ext._C.jit_update_norms(capturing, *values)
    run_launches(launches, _first_device(values[1], values[9]))
    return norms


def verify_tree_greedy(candidates, target_ids, first_child, next_sibling, max_depth):
    outputs, (launches, keep) = _ext._C.jit_verify_tree_greedy(
        candidates, target_ids, first_child, next_sibling, max_depth
    )
    run_launches(launches, candidates.device)
    return outputs


def verify_tree_sample(
    candidates, target_probs, first_child, next_sibling, uniform, uniform_final, draft_probs, max_depth
):
    outputs, (launches, keep) = _ext._C.jit_verify_tree_sample(
        candidates, target_probs, first_child, next_sibling, uniform, uniform_final, draft_probs, max_depth
    )
    run_launches(launches, candidates.device)
    return outputs


def compact_kv_cache(k_cache, v_cache, cache_seqlens, accept_index):
    launches, keep = _ext._C.jit_compact_kv_cache(k_cache, v_cache, cache_seqlens, accept_index)
    run_launches(launches, k_cache.device)


def _unavailable(op, why):
    def kernel(*args, **kwargs):
        raise JitUnavailable(f"kestrel.ops.{op}: " + NO_KERNELS.format(why=why))

    return kernel


_LIBRARY = None


def install():
    """Register the JIT path's CUDA kernels for OPS when it is the active backend (see the module docstring); with
    KESTREL_CUDA_BACKEND=native and no native part, register kernels that raise JitUnavailable instead (a clear
    error in place of the dispatcher's "no kernel for CUDA"). Called once, when kestrel.ops is imported."""
    global _LIBRARY
    if _LIBRARY is not None or not _ext.available():
        return
    backend, native = requested_backend(), native_available()
    if native and backend != "jit":
        return
    library = torch.library.Library("kestrel", "IMPL")
    module = sys.modules[__name__]
    with warnings.catch_warnings():  # KESTREL_CUDA_BACKEND=jit over a native part: the override is the point
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        for op in OPS:
            if backend == "native":
                kernel = _unavailable(op, "KESTREL_CUDA_BACKEND=native asks for them")
            else:
                kernel = getattr(module, op)
            library.impl(op, kernel, "CUDA")
    _LIBRARY = library


def describe():
    """One line for `python -m kestrel info`: the active CUDA backend and, for the JIT path, CuPy, NVRTC and the
    cache directory (CuPy is imported here only when the JIT path is active)."""
    backend = active_backend()
    requested = requested_backend()
    if backend == "native":
        return f"native (kestrel._C's CUDA part; KESTREL_CUDA_BACKEND={requested})"
    if backend == "none":
        return f"none (KESTREL_CUDA_BACKEND={requested}, and kestrel._C has no CUDA part)"
    try:
        import cupy

        where = f"CuPy {cupy.__version__}, NVRTC {nvrtc_version()}"
    except Exception as error:
        where = f"CuPy not usable ({error.__class__.__name__}: {error}); pip install 'kestrel[jit]'"
    return f"jit (kernels compiled at first use: {where}; cache {cache_dir()}; KESTREL_CUDA_BACKEND={requested})"
