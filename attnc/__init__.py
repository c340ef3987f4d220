"""attnc — a compiler for attention patterns.

    import attnc
    p = attnc.load("streaming.attn")          # parse + check
    p = attnc.compile("pattern c:\\n    mask q >= k\\n")
    p = attnc.std("sliding_window")
    out = p(q, k, v, window=2048)
    attnc.kernel_options_for(p, q, k, v, window=2048)   # tiles, warps, stages it launches with
"""
from __future__ import annotations

from .api import (ArgumentError, Pattern, SpecError, compile, kernel_options_for, load, std,
                  std_names)

__all__ = ["ArgumentError", "Pattern", "SpecError", "compile", "kernel_options_for", "load", "std",
           "std_names"]
__version__ = "0.1.0"
