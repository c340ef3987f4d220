"""Neural-network modules: ``attnc.nn.PatternAttention``."""
from .runtime.module import PatternAttention

__all__ = ["PatternAttention"]
