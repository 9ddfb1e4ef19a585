"""Build csrc's CUDA code path for the CPU: the torch-facing CUDA launchers (csrc/cuda/*_ops.cpp, unchanged) and the
device code (csrc/cuda/*.cu and the kernels in csrc/include/kestrel/*.cuh, unchanged) compiled as host C++ against
kestrel_sim (tests/cuda_sim/include), registered as torch.ops.kestrel_sim.<op> on CPU tensors with kestrel's own
schemas (csrc/ops.cpp). torch.ops.kestrel.<op> on the same CPU tensors runs the CPU kernels: the tests compare the two
bit for bit."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIM = ROOT / "tests" / "cuda_sim"
KERNEL_UNITS = ["quantize_kernels.cpp", "optim_kernels.cpp", "tree_verify_kernels.cpp", "launch_log.cpp"]
# ops.cpp's module also binds the JIT path's host half (jit_ops.cpp), which tests/test_jit.py compares with these
LAUNCHERS = [
    "csrc/ops.cpp",
    "csrc/jit_ops.cpp",
    "csrc/cuda/quantize_ops.cpp",
    "csrc/cuda/optim_ops.cpp",
    "csrc/cuda/tree_verify_ops.cpp",
]
FLAGS = [
    "-O2",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-pthread",
    "-DKESTREL_WITH_CUDA",
    "-DKESTREL_CUDA_VERSION=kestrel_sim",
    "-DKESTREL_CUDA_ARCHS=kestrel_sim",
    "-DKESTREL_VERSION=kestrel_sim",
]


def load(verbose=False):
    """The extension module (it registers torch.ops.kestrel_sim.*); built once into build/cuda_sim."""
    from torch.utils.cpp_extension import load as load_extension

    build = ROOT / "build" / "cuda_sim"
    build.mkdir(parents=True, exist_ok=True)
    sources = [str(ROOT / s) for s in LAUNCHERS] + [str(SIM / s) for s in KERNEL_UNITS]
    return load_extension(
        name="kestrel_cuda_sim",
        sources=sources,
        build_directory=str(build),
        verbose=verbose,
        extra_include_paths=[str(SIM / "include"), str(ROOT / "csrc" / "include"), str(ROOT / "csrc")],
        extra_cflags=FLAGS + ["-include", str(SIM / "prelude.h")],
        extra_ldflags=["-pthread"],
        with_cuda=False,
    )


if __name__ == "__main__":  # python tests/cuda_sim/build.py: build verbosely
    os.environ.setdefault("MAX_JOBS", "2")
    load(verbose=True)
