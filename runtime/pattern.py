"""`Pattern`: a checked, lowered pattern that can be called like an attention function."""
from __future__ import annotations

import functools
import hashlib
import math

import torch

from ..dsl.checker import check_library
from ..dsl.diagnostics import SpecError, closest
from ..dsl.loader import Library, PatternRef, build_library
from ..lowering.ir import PatternIR
from ..lowering.lower import lower_pattern
from ..lowering.printer import canonical_text, format_pattern
from .autograd import attention_op, pack_params, track
from .binding import Bound, bind, check_qkv, sizes_for, specialization_of

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

    @classmethod
    def from_source(cls, source: str, name: str | None = None, path: str = "<string>") -> "Pattern":
        """Parse, check and lower the pattern `name` of `source` (the only one if None)."""
        lib = build_library(source, path)
        check_library(lib)
        return cls(lower_pattern(_pick(lib, name)), source)

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

    @functools.cached_property
    def digest(self) -> str:
        """A content hash of the pattern's IR: equal for structurally equal patterns."""
        return hashlib.sha256(canonical_text(self.ir).encode()).hexdigest()

    def triton_source(self, **arguments) -> str:
        """The generated forward Triton kernel, specialized on the int/bool parameters given here
        (or their defaults); float parameters and tensors are runtime arguments of the kernel."""
        from ..lowering.emit import emit_forward
        return emit_forward(self.ir, specialization_of(self.ir, arguments)).source

    def ir_text(self) -> str:
        return format_pattern(self.ir)

    def layout(self, q_len: int, k_len: int | None = None, *, block=(128, 128), batch: int | None = None,
               heads: int | None = None, kv_heads: int | None = None, head_dim: int = 64, device=None,
               **arguments):
        """The block layout (`runtime.layout.BlockLayout`) for these lengths, tile shape and
        arguments. batch / heads default to 1, or to what tensor arguments' shapes say."""
        from .layout import layout_for
        return layout_for(self.ir, q_len, q_len if k_len is None else k_len, block, batch, heads,
                          kv_heads, head_dim, device, arguments)

    def bind(self, q, k, v, arguments: dict) -> Bound:
        check_qkv(q, k, v)
        return bind(self.ir, sizes_for(q.shape, k.shape), arguments, q.device)

    def __call__(self, q, k, v, *, scale: float | None = None, backend: str = "auto",
                 return_lse: bool = False, **arguments):
        tensors = {n: t for n, t in arguments.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
        scalars = tuple(sorted((n, x.item() if isinstance(x, torch.Tensor) else x)
                               for n, x in arguments.items() if n not in tensors))
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        ints, floats, scale, backend = _plan(
            self, _meta(q), _meta(k), _meta(v), scalars,
            tuple([(n, _meta(tensors[n])) for n in sorted(tensors)]), scale, backend, return_lse)
        out, lse = attention_op(self, q, k, v, [tensors[t.name] for t in self.ir.tensors], ints,
                                floats, scale, backend)
        return (out, lse) if return_lse else out

    def _auto_backend(self, device: torch.device) -> str:
        if device.type == "cuda":
            from .dispatch import triton_available
            if triton_available():
                return "triton"
        return "reference"


def _pick(lib: Library, name: str | None) -> PatternRef:
    refs = lib.local_patterns()
    if name is None:
        if len(refs) == 1:
            return refs[0]
        names = ", ".join(r.pattern.name for r in refs)
        raise SpecError(refs[0].pattern.span if refs else None,
                        f"{lib.root.source.path} defines {len(refs)} patterns ({names}); choose one with name=...")
    for r in refs:
        if r.pattern.name == name:
            return r
    near = closest(name, [r.pattern.name for r in refs])
    raise SpecError(None, f"no pattern `{name}` in {lib.root.source.path}",
                    f"did you mean `{near}`?" if near else
                    "it defines: " + ", ".join(r.pattern.name for r in refs))


def _meta(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, str(t.device)


@torch.compiler.assume_constant_result
def _plan(pattern: Pattern, qm, km, vm, scalars, tensor_metas, scale, backend, return_lse):
    """Validate a call from tensor metadata and choose the kernel; under torch.compile this runs
    once at trace time and its result is a constant, so the traced graph is one custom op."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(qm[2])
    fake = {name: torch.empty(m[0], dtype=m[1], device="meta") for name, m in (("q", qm), ("k", km), ("v", vm))}
    check_qkv(fake["q"], fake["k"], fake["v"])
    for name, m in (("k", km), ("v", vm)):
        if torch.device(m[2]) != device:
            raise ValueError(f"`q`, `k` and `v` must be on one device, got {qm[2]}, {km[2]}, {vm[2]}")
    arguments = dict(scalars)
    for name, m in tensor_metas:
        if torch.device(m[2]) != device:
            raise ValueError(f"tensor argument `{name}` is on {m[2]}, but q is on {qm[2]}")
        arguments[name] = torch.empty(m[0], dtype=m[1], device="meta")
    bound = bind(pattern.ir, sizes_for(qm[0], km[0]), arguments, None)
    if scale is None:
        scale = 1.0 / math.sqrt(qm[0][-1]) if qm[0][-1] > 0 else 1.0
    if return_lse and pattern.ir.normalizer != "softmax":
        raise ValueError(f"return_lse=True needs the softmax normalizer; `{pattern.name}` uses "
                         f"{pattern.ir.normalizer}")
    if backend == "auto":
        backend = pattern._auto_backend(device)
    track(pattern)
    ints, floats = pack_params(pattern.ir, bound.params)
    return ints, floats, float(scale), backend
