"""Loading the native extension kestrel._C, which registers the kestrel:: ops with PyTorch's dispatcher.

Importing kestrel without a built extension warns once; calling an op that needs it raises `ExtensionMissing`,
which says how to build it.
"""

import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which kestrel._C links against)

BUILD_HINT = (
    "build it from the kestrel checkout with `pip install --no-build-isolation -e .` (CPU always; the CUDA part "
    "when torch has CUDA, a toolkit is found and a GPU is present or FORCE_CUDA=1; see README.md)"
)


class ExtensionMissing(RuntimeError):
    """The native extension kestrel._C is not built (or was built without the part this call needs)."""


try:
    from . import _C

    _IMPORT_ERROR = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = error
    warnings.warn(
        f"kestrel: the native extension kestrel._C could not be imported ({error}); ops that need it will raise. "
        f"To fix, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def available():
    return _C is not None


_BUILD_INFO = None


def build_info():
    """A dict describing how kestrel._C was built (cuda_archs as a list), or None when it is not built."""
    global _BUILD_INFO
    if _C is None:
        return None
    if _BUILD_INFO is None:
        info = dict(_C.build_info())
        info["cuda_archs"] = [arch for arch in info["cuda_archs"].split("/") if arch]
        _BUILD_INFO = info
    return dict(_BUILD_INFO)


def require(op, device=None, native_only=False):
    """Raise a clear error if `op` cannot run on `device` with the extension as built. On CUDA without kestrel._C's
    CUDA part, the JIT path (kestrel._jit) runs the C++ ops when it is the active backend; native_only: an op the
    JIT path does not run (the paged optimizers' managed memory)."""
    if _C is None:
        raise ExtensionMissing(
            f"kestrel.{op} needs the native extension kestrel._C, which could not be imported "
            f"({_IMPORT_ERROR}). To fix, {BUILD_HINT}."
        )
    if device is None or device.type == "cpu":
        return
    if device.type == "cuda" and not build_info()["cuda"]:
        from . import _jit

        if native_only:
            raise ExtensionMissing(
                f"kestrel.{op}: the input is on {device}; this needs kestrel._C's CUDA part (the JIT path does not "
                "run it), and kestrel._C was built without it. Rebuild on a machine with torch+CUDA and a CUDA "
                "toolkit (FORCE_CUDA=1 builds without a GPU present)."
            )
        if _jit.active_backend() != "jit":
            raise ExtensionMissing(
                f"kestrel.{op}: the input is on {device}, but "
                + _jit.NO_KERNELS.format(why="KESTREL_CUDA_BACKEND=native asks for them")
            )
    if device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"kestrel.{op}: no kernel for device {device}; kestrel has kernels for cpu and cuda")
