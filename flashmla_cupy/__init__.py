"""FlashMLA-compatible MLA decode attention for Hopper GPUs, compiled at run time with NVRTC.

Inputs may be torch, JAX or CuPy CUDA arrays; outputs come back in the caller's framework.
"""
from .api import flash_mla_with_kvcache, get_mla_metadata

__version__ = "0.1.0"

__all__ = ["__version__", "flash_mla_with_kvcache", "get_mla_metadata"]
