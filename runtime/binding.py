"""Call-time checks: q/k/v and pattern arguments are validated and bound to concrete values."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..dsl.diagnostics import SpecError, closest
from ..lowering.ir import Node, PatternIR, walk
from ..lowering.simplify import constant_table, simplify, static_value, substitute, unroll_loops
from .paging import Pages
from .positions import Positions

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentError(SpecError, TypeError):
    """A pattern was called with a missing, unknown or wrongly typed parameter."""


#: call keywords a pattern does not take (SDPA's, FlexAttention's, paged KV's), and what to do instead
FOREIGN_KEYWORDS = {
    "is_causal": "causality is part of a pattern: use attnc.std(\"causal\") or a `mask q >= k`",
    "enable_gqa": "GQA is automatic: pass k and v with fewer heads than q (heads % kv_heads == 0)",
    "attn_mask": "a mask is part of the pattern: write it as `mask ...` (or a bool tensor argument)",
    "mask_mod": "write the mask as `mask ...` statements in the pattern",
    "score_mod": "write the score change as `score = ...` statements in the pattern",
    "block_mask": "attnc derives the block structure from the pattern's masks (p.layout(...))",
    "dropout_p": "attnc has no attention dropout",
}


@dataclass
class Bound:
    """Everything a backend needs besides q, k, v: sizes, parameter values, tensors, and the
    count of `select topk` (None without one), evaluated once by `select_count`, and where
    the call's queries and keys sit (`runtime.positions.Positions`, None: rows from 0, every
    key valid).

    A tensor argument may have size 1 in a dimension declared `batch` or `heads` (broadcast,
    as FlexAttention's captured tensors are): `tensors` holds it as given (kernels clamp every
    index into its dims, so they broadcast by themselves); `expanded()` gives the views of the
    declared shapes that dense evaluation needs."""

    sizes: dict[str, int]
    params: dict[str, object]
    tensors: dict[str, torch.Tensor]
    topk: int | None = None
    positions: Positions | None = None
    pages: Pages | None = None   # a paged call's block table (runtime/paging.py)

    def table(self) -> dict[tuple[str, str], Node]:
        """Substitution table for sizes and parameters, for specializing IR."""
        return constant_table(self.sizes, self.params)

    def expanded(self, ir: PatternIR) -> dict[str, torch.Tensor]:
        """The tensors at their declared shapes (size-1 broadcast dims expanded, no copy)."""
        if not self.tensors:
            return {}
        shapes = tensor_shapes(ir, self.sizes, self.params)
        out = {}
        for n, t in self.tensors.items():
            if list(t.shape) != shapes[n]:  # size-1 broadcast dims grow; longer placed ones stay
                t = t.expand([s if g == 1 else g for g, s in zip(t.shape, shapes[n])])
            out[n] = t
        return out


def tensor_shapes(ir: PatternIR, sizes: dict[str, int], params: dict) -> dict[str, list[int]]:
    """The concrete shape of every tensor argument for these sizes and parameter values."""
    table = constant_table(sizes, params)
    return {t.name: [int(static_value(d, table)) for d in t.dims] for t in ir.tensors}


def sizes_for(q_shape, k_shape, v_shape=None) -> dict[str, int]:
    B, H, Lq, D = q_shape
    return {"batch": B, "heads": H, "kv_heads": k_shape[1], "q_len": Lq, "k_len": k_shape[2],
            "head_dim": D}


def broadcast_kv(q, k, v):
    """`k` and `v` at q's batch size: as given, or (batch 1, shared by every query batch)
    expanded without a copy."""
    B = q.shape[0]
    if k.shape[0] == B:
        return k, v
    return k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])


def check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested or t.layout != torch.strided:
            raise ValueError(f"`{name}` must be a dense [batch, heads, length, head_dim] tensor, got a "
                             f"{'nested (jagged)' if t.is_nested else str(t.layout)} tensor; pad the "
                             f"sequences and mark the padding with a pattern (e.g. a document-id "
                             f"tensor, see attnc.std(\"document\"))")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must have 4 dimensions [batch, heads, length, head_dim], "
                             f"got shape {list(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"`q`, `k` and `v` must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"`q`, `k` and `v` must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Lq, D = q.shape
    if k.shape[0] != v.shape[0] or k.shape[0] not in (B, 1):
        raise ValueError(f"batch sizes differ: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}; "
                         f"`k` and `v` have q's batch, or batch 1 to serve every query batch (a "
                         f"shared prefix)")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"`k` and `v` must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"`k` and `v` must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"`q` and `k` must have the same head_dim, got {D} and {k.shape[3]}")


def select_count(ir: PatternIR, sizes: dict[str, int], params: dict) -> int | None:
    """The count of the pattern's `select topk(n)` for these sizes and parameters (None without
    a `select`); a count below 1 is a ValueError."""
    if ir.topk is None:
        return None
    n = static_value(ir.topk, constant_table(sizes, params))
    if n < 1:
        raise ValueError(f"`select topk({n})` must keep at least one key per row")
    return int(n)


def unknown_keyword(ir: PatternIR, key: str) -> ArgumentError:
    known = ir.argument_names()
    near = closest(key, known)
    if key in FOREIGN_KEYWORDS:
        hint = FOREIGN_KEYWORDS[key]
    elif near:
        hint = f"did you mean `{near}`?"
    else:
        hint = "it takes: " + ", ".join(sorted(known)) if known else "it takes no arguments"
    return ArgumentError(ir.span, f"pattern `{ir.name}` has no parameter or tensor `{key}`", hint)


def bind_params(ir: PatternIR, arguments: dict) -> dict[str, object]:
    """The parameter values of a call (defaults filled in, types checked); every key of
    `arguments` must name a parameter or tensor of the pattern, and every tensor be given."""
    known = ir.argument_names()
    for key in arguments:
        if key not in known:
            raise unknown_keyword(ir, key)
    params: dict[str, object] = {}
    for p in ir.params:
        if p.name in arguments:
            params[p.name] = check_scalar(ir, p, arguments[p.name])
        elif p.default is not None:
            params[p.name] = p.default
        else:
            raise ArgumentError(p.span, f"pattern `{ir.name}` needs a value for parameter `{p.name}`",
                                f"pass it as a keyword: `{p.name}=...`")
    for t in ir.tensors:
        if t.name not in arguments:
            dims = ", ".join(_dim_text(d) for d in t.dims)
            raise ArgumentError(t.span, f"pattern `{ir.name}` needs the tensor `{t.name}` "
                                        f"({t.elem}[{dims}])", f"pass it as a keyword: `{t.name}=...`")
    return params


def check_requires(ir: PatternIR, sizes: dict[str, int], params: dict) -> None:
    """Raise the SpecError of the first `require` of the pattern that these sizes and parameter
    values break (at its statement, with the values of the names it reads), or of a shift whose
    count is outside 0..62."""
    shifts = _shifts(ir)
    if not ir.requires and not shifts:
        return
    table = constant_table(sizes, params)
    for r in ir.requires:
        if not static_value(r.cond, table):
            raise r.failure({n: static_value(v, table) for n, v in r.names})
    for root in shifts:  # counts are static: constants once sizes, parameters and loops are
        for n in walk(unroll_loops(simplify(substitute(root, table)))):
            if n.op in ("lshift", "rshift") and n.args[1].op == "const" and not 0 <= n.args[1].value <= 62:
                raise SpecError(n.span, f"shift count {n.args[1].value} is outside 0..62",
                                "a shift moves an int by 0 to 62 bits")


@functools.lru_cache(maxsize=256)
def _shifts(ir: PatternIR) -> tuple[Node, ...]:
    """The expressions of the pattern that shift."""
    return tuple(r for r in ir.nodes() if any(n.op in ("lshift", "rshift") for n in walk(r)))


def bind(ir: PatternIR, sizes: dict[str, int], arguments: dict, device=None,
         placed: bool = False) -> Bound:
    """Check `arguments` against the pattern's parameters, requires and tensors; fill in
    defaults. `placed`: the call has positions, so a tensor dimension declared with `q_len` or
    `k_len` may be longer (it is indexed by positions, which may pass the lengths)."""
    params = bind_params(ir, arguments)
    check_requires(ir, sizes, params)
    shapes = tensor_shapes(ir, sizes, params)
    tensors = {t.name: _check_tensor(t, arguments[t.name], shapes[t.name], device, placed)
               for t in ir.tensors}
    return Bound(dict(sizes), params, tensors, select_count(ir, sizes, params))


def specialization_of(ir: PatternIR, arguments: dict) -> dict[str, object]:
    """The int and bool parameter values a kernel is compiled for, from call-style `arguments`
    (defaults filled in). Float parameters and tensors may be given too and are ignored: they
    are runtime kernel arguments."""
    known = ir.argument_names()
    for key in arguments:
        if key not in known:
            raise unknown_keyword(ir, key)
    out = {}
    for p in ir.params:
        if p.type not in ("int", "bool"):
            continue
        if p.name in arguments:
            out[p.name] = check_scalar(ir, p, arguments[p.name])
        elif p.default is not None:
            out[p.name] = p.default
        else:
            raise ArgumentError(p.span, f"the kernel of `{ir.name}` is specialized on `{p.name}`; "
                                        f"give it a value", f"e.g. `{p.name}=...`")
    return out


def _dim_text(d: Node) -> str:
    from ..lowering.printer import format_expr
    return format_expr(d).replace("$", "")


def check_scalar(ir, p, value):
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if p.type == "bool":
        if isinstance(value, bool):
            return value
    elif p.type == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ArgumentError(p.span, f"parameter `{p.name}` of `{ir.name}` is {p.type}, "
                                f"got {type(value).__name__} {value!r}")


def _broadcastable(t, got, shape, placed: bool) -> bool:
    """`got` is `shape`, or has size 1 where `t` declares `batch` or `heads`, or (`placed`) is
    longer where `t` declares a length."""
    if len(got) != len(shape):
        return False
    return all(g == s or (g == 1 and d.op == "size" and d.value in ("batch", "heads"))
               or (placed and g > s and _reads_length(d))
               for g, s, d in zip(got, shape, t.dims))


def _reads_length(d: Node) -> bool:
    return any(n.op == "size" and n.value in ("q_len", "k_len") for n in walk(d))


def _check_tensor(t, value, shape, device, placed: bool = False):
    dims = ", ".join(_dim_text(d) for d in t.dims)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"tensor argument `{t.name}` must be a torch.Tensor of shape [{dims}] = {shape}, "
                         f"got {type(value).__name__}")
    if value.is_nested or value.layout != torch.strided:
        raise ValueError(f"tensor argument `{t.name}` must be a dense (strided) tensor, got a "
                         f"{'nested' if value.is_nested else str(value.layout)} tensor")
    if not _broadcastable(t, list(value.shape), shape, placed):
        broadcast = [i for i, d in enumerate(t.dims) if d.op == "size" and d.value in ("batch", "heads")]
        longer = [i for i, d in enumerate(t.dims) if placed and _reads_length(d)]
        accepted = ([f"size 1 is accepted in dimension {', '.join(map(str, broadcast))}"]
                    if broadcast else []) + (
            [f"dimension {', '.join(map(str, longer))} may be longer: it is indexed by positions"]
            if longer else [])
        hint = f" ({'; '.join(accepted)})" if accepted else ""
        raise ValueError(f"tensor argument `{t.name}` must have shape [{dims}] = {shape}{hint}, "
                         f"got {list(value.shape)}")
    ok = {"float": value.dtype.is_floating_point,
          "int": not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool,
          "bool": value.dtype == torch.bool}[t.elem]
    if not ok:
        raise ValueError(f"tensor argument `{t.name}` must have {t.elem} elements, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"tensor argument `{t.name}` is on {value.device}, but q is on {device}")
    return value
