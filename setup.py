"""Build kestrel: the C++ extension kestrel._C (CPU always; CUDA when asked for and possible) and the Python
packages (python/kestrel, kernels/ as kestrel.kernels, benchmarks/ as kestrel.benchmarks).

Environment variables (also listed in README.md):
  USE_CUDA=0              build the CPU extension only
  FORCE_CUDA=1            build the CUDA part without a GPU present (needs torch with CUDA and a toolkit)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default: [cuda_archs] of csrc/sources.txt, "8.0;9.0a"); setting it also
                          turns the CUDA part on
  MAX_JOBS                parallel compile jobs (read by torch's BuildExtension)
  KESTREL_DEBUG=1         -O0 -g instead of -O3
"""

import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def read_version():
    text = (ROOT / "python" / "kestrel" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def read_sources(section):
    """The lines under `[section]` in csrc/sources.txt: source paths (relative to the repository root), flags or
    CUDA archs; CMakeLists.txt reads the same file."""
    current, paths = None, []
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section:
            paths.append(line)
    return paths


def cuda_decision(torch):
    """(build_cuda, reason) following the rules in the module docstring."""
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False, "USE_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if torch.cuda.is_available():
        return True, "GPU present"
    if os.environ.get("FORCE_CUDA", "").strip() == "1":
        return True, "FORCE_CUDA=1"
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return True, "TORCH_CUDA_ARCH_LIST set"
    return False, "no GPU, and neither FORCE_CUDA=1 nor TORCH_CUDA_ARCH_LIST is set"


def arch_names(arch_list):
    """'8.0;9.0a' -> 'sm_80/sm_90a' (the form kestrel._C.build_info() reports)."""
    names = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if item:
            ptx = item.endswith("+PTX")
            names.append("sm_" + item.replace("+PTX", "").replace(".", "") + ("+PTX" if ptx else ""))
    return "/".join(names)  # nvcc splits -D values at commas


def extra_cuda_include_dirs(cuda_home):
    """torch's CUDA headers may include cusparse.h/cublas*.h; pip's nvidia wheels carry them when the toolkit
    doesn't."""
    if (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            hits = sorted(p.parent for p in nvidia.glob("*/include/cusparse.h"))
            if hits:
                return [str(hits[0])]
    return []


def make_extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = os.environ.get("KESTREL_DEBUG", "") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    version = read_version()
    # the flags of csrc/sources.txt (no floating-point contraction: see there); the C++ standard is the one torch's
    # cpp_extension picks
    cxx = opt + read_sources("cxx_flags") + [f"-DKESTREL_VERSION={version}"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc")]
    sources = read_sources("cpu")

    build_cuda, reason = cuda_decision(torch)
    print(f"kestrel: CUDA part {'on' if build_cuda else 'off'} ({reason})")
    if not build_cuda:
        return [
            CppExtension(
                "kestrel._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
            )
        ]

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(read_sources("cuda_archs")))
    archs = arch_names(os.environ["TORCH_CUDA_ARCH_LIST"])
    print(f"kestrel: CUDA archs {archs}")
    cuda_macros = [
        "-DKESTREL_WITH_CUDA",
        f"-DKESTREL_CUDA_VERSION={torch.version.cuda}",
        f"-DKESTREL_CUDA_ARCHS={archs}",
    ]
    nvcc = opt + read_sources("nvcc_flags") + cuda_macros
    return [
        CUDAExtension(
            "kestrel._C",
            sources + read_sources("cuda"),
            include_dirs=include_dirs + extra_cuda_include_dirs(CUDA_HOME),
            extra_compile_args={"cxx": cxx + cuda_macros, "nvcc": nvcc},
            extra_link_args=link,
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        version=read_version(),
        # kestrel._include: the framework-free kernel headers, which the JIT path compiles at run time (an editable
        # install reads them from csrc/include instead)
        package_dir={
            "": "python",
            "kestrel.kernels": "kernels",
            "kestrel.benchmarks": "benchmarks",
            "kestrel._include": "csrc/include",
        },
        packages=[
            "kestrel",
            "kestrel.nn",
            "kestrel.ops",
            "kestrel.optim",
            "kestrel.reference",
            "kestrel.models",
            "kestrel.decoding",
            "kestrel.kernels",
            "kestrel.benchmarks",
            "kestrel._include",
        ],
        package_data={"kestrel._include": ["kestrel/*.h", "kestrel/*.cuh"]},
        ext_modules=make_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
