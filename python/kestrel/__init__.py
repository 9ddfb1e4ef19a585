"""kestrel: PyTorch kernels for memory-lean training and fast decoding.

The native ops live in the extension kestrel._C (registered as torch.ops.kestrel.*); the Triton kernels in
kestrel.kernels; the public functions in kestrel.functional and kestrel.ops.
"""

from ._version import __version__
from . import _ext
from . import ops
from . import functional
from . import optim
from . import nn

__all__ = ["__version__", "functional", "nn", "ops", "optim"]
