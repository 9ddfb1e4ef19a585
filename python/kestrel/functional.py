"""bitsandbytes-style functional API (bnb.functional users find the same names here)."""

from .ops.quantize import create_dynamic_map, dequantize_blockwise, quantize_blockwise

__all__ = ["create_dynamic_map", "quantize_blockwise", "dequantize_blockwise"]
