"""kestrel: PyTorch kernels for memory-lean training and fast decoding.

The native ops live in the extension kestrel._C (registered as torch.ops.kestrel.*); the Triton kernels in
kestrel.kernels; the public functions in kestrel.functional and kestrel.ops.

`import kestrel` imports only the version: each subpackage (and torch with it) is imported on first use,
`kestrel.optim` or `from kestrel import optim` alike (PEP 562), so `python -m kestrel --help` does not pay for torch.
Every module that calls torch.ops.kestrel.* imports kestrel._ext, which loads the extension.
"""

import importlib as _importlib

from ._version import __version__

# the subpackages and modules reachable as attributes of kestrel, imported on first access
_LAZY = ("_ext", "decoding", "functional", "kernels", "models", "nn", "ops", "optim", "reference")

__all__ = ["__version__", "decoding", "functional", "models", "nn", "ops", "optim"]


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f".{name}", __name__)  # also binds it as an attribute: called once per name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
