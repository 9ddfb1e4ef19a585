"""Public ops: argument checks, backend choice, fake (meta) kernels. One module per op family."""

from .. import _jit
from . import optim as _optim_fakes  # noqa: F401  (registers the fakes)
from .kv_bottleneck import kv_bottleneck_lookup
from .plga_attention import plga_attention
from .quantize import create_dynamic_map, dequantize_blockwise, quantize_blockwise
from .softplus_attention import softplus_attention
from .tree_attention import tree_attention
from .tree_verify import compact_kv_cache, sampling_probs, verify_tree_greedy, verify_tree_sample
from .vq_topk import vq_topk

_jit.install()  # CUDA kernels of the C++ ops from the JIT path, when kestrel._C has no CUDA part (kestrel/_jit.py)

__all__ = [
    "create_dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "kv_bottleneck_lookup",
    "plga_attention",
    "softplus_attention",
    "tree_attention",
    "vq_topk",
    "compact_kv_cache",
    "sampling_probs",
    "verify_tree_greedy",
    "verify_tree_sample",
]
