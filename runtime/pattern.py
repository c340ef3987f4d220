"""`Pattern`: a checked, lowered pattern that can be called like an attention function."""
from __future__ import annotations

import math

import torch

from ..lowering.ir import PatternIR
from ..lowering.printer import format_pattern
from .binding import Bound, bind, check_qkv, sizes_for
from .reference import reference_attention

BACKENDS = ("auto", "reference", "triton")


class Pattern:
    """A compiled attention pattern. Call it as ``p(q, k, v, **arguments)``.

    q is [batch, heads, q_len, head_dim]; k and v are [batch, kv_heads, k_len, head_dim] (v may
    have its own head_dim). Returns the output [batch, heads, q_len, v_head_dim] in q's dtype,
    and with ``return_lse=True`` also the row log-sum-exp [batch, heads, q_len] in fp32.
    """

    def __init__(self, ir: PatternIR, source: str):
        self.ir = ir
        self.source = source

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def params(self):
        return self.ir.params

    @property
    def tensors(self):
        return self.ir.tensors

    def __repr__(self) -> str:
        sig = ", ".join(f"{p.name}: {p.type}" + (f" = {p.default!r}" if p.default is not None else "")
                        for p in self.ir.params)
        ts = "".join(f", {t.name}=<{t.elem} tensor>" for t in self.ir.tensors)
        return f"<attnc.Pattern {self.ir.name}({sig}{ts}) from {self.ir.path}>"

    def ir_text(self) -> str:
        return format_pattern(self.ir)

    def bind(self, q, k, v, arguments: dict) -> Bound:
        check_qkv(q, k, v)
        return bind(self.ir, sizes_for(q.shape, k.shape), arguments, q.device)

    def __call__(self, q, k, v, *, scale: float | None = None, backend: str = "auto",
                 return_lse: bool = False, **arguments):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        bound = self.bind(q, k, v, arguments)
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
        if return_lse and self.ir.normalizer != "softmax":
            raise ValueError(f"return_lse=True needs the softmax normalizer; `{self.name}` uses "
                             f"{self.ir.normalizer}")
        if self.ir.topk is not None:
            from .binding import static_value
            n = static_value(self.ir.topk, bound.table())
            if n < 1:
                raise ValueError(f"`select topk({n})` must keep at least one key per row")
        if backend == "auto":
            backend = self._auto_backend(q)
        if backend == "triton":
            from .dispatch import triton_attention
            out, lse = triton_attention(self, q, k, v, bound, float(scale), return_lse)
        else:
            out, lse = reference_attention(self.ir, q, k, v, scale=float(scale), sizes=bound.sizes,
                                           params=bound.params, tensors=bound.tensors, return_lse=return_lse)
        return (out, lse) if return_lse else out

    def _auto_backend(self, q: torch.Tensor) -> str:
        if q.is_cuda:
            from .dispatch import triton_available
            if triton_available():
                return "triton"
        return "reference"
