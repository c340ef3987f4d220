"""Triton emission of the backward kernels: the chain rule through a pattern's score statements.

`emit_backward(ir, specialization, wrt)` fills `skeletons/backward.py.in`. The derivatives are
not written per pattern: `lowering.derivative` differentiates every score statement (and the
sigmoid bias) symbolically, and this module prints the results. For statements s_1..s_n with
s_0 = q·k·scale, the generated `_score_grad` recomputes s_1..s_{n-1} in the tile, then walks
back: with g the gradient w.r.t. s_i, it adds each float tensor read of statement i (seeded
with g, evaluated at s_{i-1}, once per unrolled `sum` iteration) into that tensor's gradient
buffer and sets g to d_score_i(g) — zero wherever the tile's element is not kept.
"""
from __future__ import annotations

import itertools

from ..dsl.diagnostics import SpecError
from ..dsl.source import Span
from .derivative import SEED, LoadGrad, StatementGrad, pattern_grads, statement_grad
from .emit import (Kernel, common_holes, constraints, fill, kernel_closed_form, line_spans,
                   pattern_code, pattern_key, prepare, range_lines, reads_score, render,
                   signature_holes, skeleton, transposed_closed_form)
from .emit_expr import ExprPrinter, Line, nonnegative
from .ir import Node, PatternIR, const, uses, walk
from .signature import backward_signatures, dim_name, grad_name
from .simplify import simplify, substitute
from .triton_forms import ATOM


def _reads_volatile(n: Node) -> bool:
    return any(m.op == "score" or (m.op == "param" and m.value == SEED.value) for m in walk(n))


class _GradPrinter(ExprPrinter):
    """The expression printer with the adjoint seed printed as the tile variable `g`."""

    def expr(self, n: Node) -> tuple[str, int]:
        if n.op == "param" and n.value == SEED.value:
            return "g", ATOM
        return super().expr(n)

    def forget(self) -> None:
        """Drop temporaries that read `score` or `g` (both are about to be reassigned)."""
        self.temps = {n: t for n, t in self.temps.items() if not _reads_volatile(n)}

    def line(self, text: str, span: Span | None = None) -> None:
        self.lines.append(Line(text, span))


def _is_zero(n: Node) -> bool:
    return n.op == "const" and n.value == 0


def unrolled(lg: LoadGrad) -> list[tuple[Node, Node]]:
    """(load, adjoint) once per iteration of the enclosing sums, loop variables substituted."""
    ranges = []
    for var, count in lg.loops:
        c = simplify(count)
        if c.op != "const":
            raise SpecError(count.span, "the range of `sum` must be known when the kernel is compiled",
                            "use a constant or an int parameter for the count")
        ranges.append([(var, i) for i in range(max(int(c.value), 0))])
    out = []
    for combo in itertools.product(*ranges):
        table = {("loopvar", var): const(i) for var, i in combo}
        out.append((simplify(substitute(lg.load, table)), simplify(substitute(lg.adjoint, table))))
    return out


def _accumulate(pr: _GradPrinter, lg: LoadGrad) -> None:
    """Lines adding one tensor read's adjoint into its gradient buffer at its (clamped) index."""
    for load, adjoint in unrolled(lg):
        name, args = load.value, load.args
        pr.operands.tensors[name] = len(args)
        pr.statement("g_adj", adjoint, load.span)
        pr.line("g_adj = tl.where(keep, g_adj, 0.0)", load.span)
        flat = "0"
        for i, a in enumerate(args):
            idx = pr.expr(a)[0]
            if not nonnegative(a, pr.signs):
                idx = f"tl.maximum({idx}, 0)"
            term = f"tl.minimum({idx}, {dim_name(name, i)} - 1)"
            flat = term if i == 0 else f"({flat}) * {dim_name(name, i)} + {term}"
        dep_q = any(uses(a, "index", "q") for a in args)
        dep_k = any(uses(a, "index", "k") for a in args)
        if dep_q or dep_k:
            pr.line(f"_grad_tile({grad_name(name)}, {flat}, g_adj, keep, {dep_q}, {dep_k}, BLOCK_M, BLOCK_N, "
                    f"DETERMINISTIC)", load.span)
        else:
            pr.line(f"_grad_scalar({grad_name(name)} + {flat}, g_adj, DETERMINISTIC)", load.span)


def _chain(pr: _GradPrinter, ir: PatternIR, grads: tuple[StatementGrad, ...],
           bias: StatementGrad | None, wrt: tuple[str, ...] | None) -> None:
    """The body of `_score_grad` (wrt None) or `_score_grad_acc` (tensor gradients for `wrt`)."""
    n = len(ir.scores)
    bias_d = bias.d_score if bias is not None else const(0.0)
    bias_loads = [lg for lg in bias.loads if lg.load.value in wrt] if bias is not None and wrt else []
    last = n if (bias_loads or not _is_zero(bias_d)) else n - 1
    # the per-program values of everything below, once, before the first atomic
    roots = list(ir.scores[:last]) + ([bias_d] if not _is_zero(bias_d) else [])
    for lg in bias_loads + [lg for sg in grads for lg in sg.loads if wrt and lg.load.value in wrt]:
        roots += [adjoint for _, adjoint in unrolled(lg)]
    roots += [sg.d_score for sg in grads if sg.d_score != SEED and not _is_zero(sg.d_score)]
    pr.hoist(roots)
    if n:
        pr.line("score_0 = score")
    for i in range(1, last + 1):
        stmt = ir.scores[i - 1]
        pr.statement("score", stmt)
        pr.forget()
        if i < n:
            pr.line(f"score_{i} = score")
    for lg in bias_loads:  # the sigmoid bias reads the final score
        _accumulate(pr, lg)
    if not _is_zero(bias_d):
        pr.statement("g_bias", bias_d, ir.bias.span)
        pr.line("g = g + tl.where(keep, g_bias, 0.0)", ir.bias.span)
        pr.forget()
    current = last
    for i in range(n, 0, -1):
        if current != i - 1:
            pr.line(f"score = score_{i - 1}")
            pr.forget()
            current = i - 1
        sg = grads[i - 1]
        for lg in sg.loads:
            if wrt and lg.load.value in wrt:
                _accumulate(pr, lg)
        d = sg.d_score
        if d == SEED:
            continue
        span = ir.scores[i - 1].span
        if _is_zero(d):
            pr.line("g = tl.zeros_like(g)", span)
        else:
            pr.statement("g", d, span)
            pr.line("g = tl.where(keep, g, 0.0)", span)
        pr.forget()
    if not pr.lines:
        pr.line("pass")


def emit_backward(ir: PatternIR, specialization: dict[str, object],
                  wrt: tuple[str, ...] = (), wide: bool = False, positions: bool = False) -> Kernel:
    """Generate the backward module for `ir` with int/bool parameters fixed; `wrt` names the float
    tensor arguments whose gradients it accumulates; `wide`: int64 index arithmetic;
    `positions`: for calls with positions."""
    ir, operands = prepare(ir, specialization, positions)
    wrt = tuple(sorted(wrt))
    comments: dict[str, Span] = {}

    code = pattern_code(ir, operands)  # the forward's score, mask and bias code, printed alike
    sigmoid = ir.normalizer == "sigmoid"
    topk = code.topk

    grads = pattern_grads(ir)
    bias_grad = statement_grad(ir.bias) if sigmoid and ir.bias is not None else None
    plain = _GradPrinter(operands, "t")
    _chain(plain, ir, grads, bias_grad, None)
    acc = _GradPrinter(operands, "t")
    _chain(acc, ir, grads, bias_grad, wrt)
    for name in wrt:
        if name not in operands.tensors:
            raise ValueError(f"internal: tensor `{name}` does not reach the score of `{ir.name}`")

    setup = []
    if wrt:
        setup.append("if DETERMINISTIC:  # this program's own slice of each [programs, numel] buffer")
        for name in wrt:
            numel = " * ".join(dim_name(name, i) for i in range(operands.tensors[name])) or "1"
            setup.append(f"    {grad_name(name)} += slot * ({numel})")
    closed = kernel_closed_form(ir.masks)
    closed_t = transposed_closed_form(ir.masks)
    signatures = backward_signatures(operands.operands(), wrt, topk > 0, closed is not None,
                                     closed_t is not None)
    holes = {
        **common_holes(ir, specialization, code, operands, closed, wide, comments),
        "WRT": ", ".join(wrt) or "none",
        "HAS_GRADS": repr(bool(wrt)),
        "SHARED_DECISIONS": repr(reads_score(ir)),
        "SCORE_GRAD": render(plain.lines, comments),
        "SCORE_GRAD_ACC": render(acc.lines, comments),
        "GRAD_ARGS": "".join(", " + grad_name(name) for name in wrt),
        "GRAD_SETUP": "\n".join(setup),
        "CLOSED_FORM_T": repr(closed_t is not None),
        "N_COVER_T": str(len(closed_t.intervals) if closed_t else 0),
        "N_RUNS_T": str(len(closed_t.intervals) if closed_t else 1),
        "QUERY_RANGES": render(range_lines(closed_t, "k_lo", "k_hi", swap=True), comments),
        **signature_holes(signatures, {"attn_kth": "KTH", "attn_bwd_dq": "DQ",
                                       "attn_bwd_dkdv": "DKDV"}),
    }
    source = fill(skeleton("backward"), holes, "backward.py.in")
    return Kernel(source, line_spans(source, comments), signatures, constraints(ir, topk), topk,
                  closed, wrt, pattern_key(ir, specialization, wide, positions))
