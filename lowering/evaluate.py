"""Dense evaluation of IR expressions with torch: the meaning of every op (its `torch` entry in
the op table, lowering/ops.py), shared by the reference interpreter (`runtime/reference.py`),
the block-sparsity analysis (single-axis subexpressions evaluated per position), the mask
pictures and the tests.

`Env` holds index grids, sizes, parameter values and tensors for one chunk of query rows;
`Evaluator.eval(node)` gives a tensor broadcastable to [B, H, chunk, k_len]. Integer `//` and
`%` round toward -inf (Python) and are total (`x // 0 == 0`, `x % 0 == x`); a tensor index out
of range is a SpecError at the expression's span.
"""
from __future__ import annotations

import torch

from ..dsl.diagnostics import SpecError
from .ir import Node, walk
from .ops import rule
from .simplify import LOOPS, constant_table, static_value


class Env:
    """Index grids, sizes, parameter values and tensors for one chunk of query rows.

    `positions` (int [B, 3]: q_start, k_start, k_len per batch element, or None) places the
    rows: `q` is q_start + row, `k` is k_start + column, and the size `k_len` is the batch
    element's own (a [B, 1, 1, 1] tensor) wherever an expression reads it per element."""

    def __init__(self, sizes, params, tensors, fdtype, device, q0, q1, B, H, Lk, positions=None):
        self.sizes, self.params, self.tensors = sizes, params, tensors
        self.fdtype, self.device = fdtype, device
        i64 = dict(dtype=torch.int64, device=device)
        self.index = {
            "b": torch.arange(B, **i64).view(B, 1, 1, 1),
            "h": torch.arange(H, **i64).view(1, H, 1, 1),
            "q": torch.arange(q0, q1, **i64).view(1, 1, q1 - q0, 1),
            "k": torch.arange(Lk, **i64).view(1, 1, 1, Lk),
        }
        #: sizes that vary per batch element, as [B, 1, 1, 1] tensors
        self.per_batch: dict[str, torch.Tensor] = {}
        if positions is not None:
            at = positions.to(device=device, dtype=torch.int64).view(B, 3, 1, 1)
            self.index["q"] = self.index["q"] + at[:, 0:1]
            self.index["k"] = self.index["k"] + at[:, 1:2]
            self.per_batch["k_len"] = at[:, 2:3]


class Evaluator:
    """Evaluates IR nodes to tensors broadcastable to [B, H, chunk, k_len], sharing results.

    Nodes that read a `volatile` leaf (the running score, a loop variable) are cached in
    `local`, which the caller resets whenever such a leaf changes value."""

    def __init__(self, env: Env):
        self.env = env
        self.memo: dict[int, torch.Tensor] = {}
        self.local: dict[int, torch.Tensor] = {}
        self.volatile: dict[tuple, torch.Tensor] = {}
        self._deps: dict[int, bool] = {}

    def _is_volatile(self, n: Node) -> bool:
        key = id(n)
        if key not in self._deps:
            for m in walk(n):
                if id(m) not in self._deps:
                    self._deps[id(m)] = m.op in ("score", "loopvar") or any(self._deps[id(a)] for a in m.args)
        return self._deps[key]

    def eval(self, n: Node) -> torch.Tensor:
        table = self.local if self._is_volatile(n) else self.memo
        out = table.get(id(n))
        if out is None:
            out = self._compute(n)
            table[id(n)] = out
        return out

    def static(self, n: Node):
        """The Python value of an expression over sizes and parameters (sum ranges, topk)."""
        return static_value(n, constant_table(self.env.sizes, self.env.params))

    def _const(self, value, dtype):
        return torch.tensor(value, dtype=dtype, device=self.env.device)

    def _dtype(self, n: Node):
        return {"int": torch.int64, "float": self.env.fdtype, "bool": torch.bool}[n.dtype]

    def _compute(self, n: Node) -> torch.Tensor:
        env, op = self.env, n.op
        if op == "const":
            return self._const(n.value, self._dtype(n))
        if op == "index":
            return env.index[n.value]
        if op == "size":
            if n.value in env.per_batch:
                return env.per_batch[n.value]
            return self._const(env.sizes[n.value], torch.int64)
        if op == "param":
            return self._const(env.params[n.value], self._dtype(n))
        if op in ("score", "loopvar"):
            return self.volatile[(op, n.value)]
        if op == "load":
            return self._load(n)
        if op in LOOPS:
            return self._loop(n)
        a = [self.eval(x) for x in n.args]
        if op == "cast":  # to the float type of this evaluation (fp32, or fp64 for fp64 inputs)
            return a[0].to(env.fdtype)
        return rule(n, "torch")(*a)

    def _load(self, n: Node) -> torch.Tensor:
        t = self.env.tensors[n.value]
        idx = [self.eval(i) for i in n.args]
        for d, (i, size) in enumerate(zip(idx, t.shape)):
            if torch.compiler.is_compiling():
                break  # values are unknown while tracing; the eager call has checked them
            lo, hi = int(i.min()), int(i.max())
            if lo < 0 or hi >= size:
                bad = lo if lo < 0 else hi
                raise SpecError(n.args[d].span or n.span,
                                f"index {bad} is out of range for dimension {d} of tensor `{n.value}` "
                                f"(size {size})",
                                "clamp the index, e.g. `clamp(i, 0, n - 1)`")
        idx = list(torch.broadcast_tensors(*idx))
        out = t[tuple(idx)]
        if n.dtype == "float":
            return out.to(self.env.fdtype)
        return out.to(torch.int64) if n.dtype == "int" else out.to(torch.bool)

    def _loop(self, n: Node) -> torch.Tensor:
        """`sum` (+), `any` (or) or `all` (and) of the body over range(count)."""
        count_node, body = n.args
        count = self.static(count_node)
        key = ("loopvar", n.value)
        combine = {"sum": torch.add, "any": torch.logical_or, "all": torch.logical_and}[n.op]
        saved_local, saved_var = self.local, self.volatile.get(key)
        total = None
        for i in range(max(count, 0)):
            self.volatile[key] = self._const(i, torch.int64)
            self.local = dict(saved_local)
            term = self.eval(body)
            total = term if total is None else combine(total, term)
        self.local = saved_local
        if saved_var is not None:
            self.volatile[key] = saved_var
        if total is None:
            return self._const(n.op == "all", torch.bool) if n.op != "sum" else self._const(0, self._dtype(n))
        return total

