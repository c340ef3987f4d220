"""Call-time checks: q/k/v and pattern arguments are validated and bound to concrete values."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dsl.diagnostics import SpecError, closest
from ..lowering.ir import Node, PatternIR
from ..lowering.simplify import constant_table, static_value

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentError(SpecError, TypeError):
    """A pattern was called with a missing, unknown or wrongly typed parameter."""


@dataclass
class Bound:
    """Everything a backend needs besides q, k, v: sizes, parameter values, tensors, and the
    count of `select topk` (None without one), evaluated once by `select_count`."""

    sizes: dict[str, int]
    params: dict[str, object]
    tensors: dict[str, torch.Tensor]
    topk: int | None = None

    def table(self) -> dict[tuple[str, str], Node]:
        """Substitution table for sizes and parameters, for specializing IR."""
        return constant_table(self.sizes, self.params)


def tensor_shapes(ir: PatternIR, sizes: dict[str, int], params: dict) -> dict[str, list[int]]:
    """The concrete shape of every tensor argument for these sizes and parameter values."""
    table = constant_table(sizes, params)
    return {t.name: [int(static_value(d, table)) for d in t.dims] for t in ir.tensors}


def sizes_for(q_shape, k_shape, v_shape=None) -> dict[str, int]:
    B, H, Lq, D = q_shape
    return {"batch": B, "heads": H, "kv_heads": k_shape[1], "q_len": Lq, "k_len": k_shape[2],
            "head_dim": D}


def check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
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
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
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


def bind(ir: PatternIR, sizes: dict[str, int], arguments: dict, device=None, where: str = "") -> Bound:
    """Check `arguments` against the pattern's parameters and tensors; fill in defaults."""
    known = {p.name for p in ir.params} | {t.name for t in ir.tensors}
    for key in arguments:
        if key not in known:
            near = closest(key, known)
            hint = f"did you mean `{near}`?" if near else \
                ("it takes: " + ", ".join(sorted(known)) if known else "it takes no arguments")
            raise ArgumentError(ir.span, f"pattern `{ir.name}` has no parameter or tensor `{key}`", hint)
    params: dict[str, object] = {}
    for p in ir.params:
        if p.name in arguments:
            value = arguments[p.name]
            params[p.name] = check_scalar(ir, p, value)
        elif p.default is not None:
            params[p.name] = p.default
        else:
            raise ArgumentError(p.span, f"pattern `{ir.name}` needs a value for parameter `{p.name}`",
                                f"pass it as a keyword: `{p.name}=...`")
    shapes = tensor_shapes(ir, sizes, params)
    tensors: dict[str, torch.Tensor] = {}
    for t in ir.tensors:
        if t.name not in arguments:
            dims = ", ".join(_dim_text(d) for d in t.dims)
            raise ArgumentError(t.span, f"pattern `{ir.name}` needs the tensor `{t.name}` "
                                        f"({t.elem}[{dims}])", f"pass it as a keyword: `{t.name}=...`")
        tensors[t.name] = _check_tensor(t, arguments[t.name], shapes[t.name], device)
    return Bound(dict(sizes), params, tensors, select_count(ir, sizes, params))


def specialization_of(ir: PatternIR, arguments: dict) -> dict[str, object]:
    """The int and bool parameter values a kernel is compiled for, from call-style `arguments`
    (defaults filled in). Float parameters and tensors may be given too and are ignored: they
    are runtime kernel arguments."""
    known = {p.name for p in ir.params} | {t.name for t in ir.tensors}
    for key in arguments:
        if key not in known:
            raise ArgumentError(None, f"pattern `{ir.name}` has no parameter or tensor `{key}`",
                                "it takes: " + ", ".join(sorted(known)) if known else
                                "it takes no arguments")
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


def _check_tensor(t, value, shape, device):
    dims = ", ".join(_dim_text(d) for d in t.dims)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"tensor argument `{t.name}` must be a torch.Tensor of shape [{dims}] = {shape}, "
                         f"got {type(value).__name__}")
    if list(value.shape) != shape:
        raise ValueError(f"tensor argument `{t.name}` must have shape [{dims}] = {shape}, "
                         f"got {list(value.shape)}")
    ok = {"float": value.dtype.is_floating_point,
          "int": not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool,
          "bool": value.dtype == torch.bool}[t.elem]
    if not ok:
        raise ValueError(f"tensor argument `{t.name}` must have {t.elem} elements, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"tensor argument `{t.name}` is on {value.device}, but q is on {device}")
    return value
