"""Triton emission: fill a hand-written kernel skeleton's named holes from a pattern's IR.

`emit_forward(ir, specialization)` returns the generated module text and the map from its lines
back to spec spans. Skeletons live in `lowering/skeletons/*.py.in`; a hole is `{{NAME}}`, and
`fill` refuses a skeleton hole without a value and a value without a hole. A hole alone on its
line takes that line's indentation for every line of its value.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources

from ..dsl.diagnostics import SpecError
from ..dsl.source import Span
from .closed_form import MAX_INTERVALS, Q_HI, Q_LO, ClosedForm, derive_symbolic
from .emit_expr import ExprPrinter, Line, Operands
from .ir import Node, PatternIR, const, walk
from .simplify import simplify, substitute

_HOLE = re.compile(r"\{\{([A-Z_][A-Z0-9_]*)\}\}")
_MARK = re.compile(r"  # (\S+:\d+)$")


def skeleton(name: str) -> str:
    """The text of `lowering/skeletons/<name>.py.in`."""
    return resources.files("attnc.lowering.skeletons").joinpath(f"{name}.py.in").read_text(encoding="utf-8")


def fill(text: str, holes: dict[str, str], name: str = "skeleton") -> str:
    """Replace every `{{NAME}}` in `text`; unknown and unused holes are errors."""
    found = set(_HOLE.findall(text))
    missing = sorted(found - holes.keys())
    unused = sorted(holes.keys() - found)
    if missing or unused:
        raise ValueError(f"{name}: holes without a value: {missing}; values without a hole: {unused}")
    out = []
    for line in text.splitlines():
        m = _HOLE.fullmatch(line.strip())
        if m:
            indent = line[: len(line) - len(line.lstrip())]
            value = holes[m.group(1)]
            out.extend((indent + v) if v else "" for v in value.splitlines())
        else:
            out.append(_HOLE.sub(lambda mm: holes[mm.group(1)], line))
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Kernel:
    """A generated kernel module: its text, its extra arguments, and line → spec span."""

    source: str
    arguments: tuple[str, ...]  # names after the fixed arguments, in signature order
    line_spans: dict[int, Span]  # 1-based generated line -> span of the spec text it came from
    topk: int
    #: the key ranges the kernel computes per query tile (sizes as leaves); None when the kernel
    #: reads a block layout's index tensors instead
    closed_form: ClosedForm | None = None


def specialize(ir: PatternIR, values: dict[str, object]) -> PatternIR:
    """Substitute int and bool parameters (compile-time constants) and simplify."""
    table = {("param", p.name): const(values[p.name]) for p in ir.params
             if p.type in ("int", "bool") and p.name in values}
    return ir.map(lambda n: simplify(substitute(n, table)))


def _marker(span: Span | None) -> str:
    if span is None:
        return ""
    return f"  # {os.path.basename(span.source.path).replace(' ', '_')}:{span.line}"


def line_spans(source: str, comments: dict[str, Span]) -> dict[int, Span]:
    """Generated line number -> the spec span its `# file.attn:LINE` comment names."""
    out = {}
    for no, line in enumerate(source.splitlines(), 1):
        m = _MARK.search(line)
        if m and m.group(1) in comments:
            out[no] = comments[m.group(1)]
    return out


def _render(lines: list[Line], comments: dict[str, Span]) -> str:
    out = []
    for ln in lines:
        mark = _marker(ln.span)
        if mark:
            comments.setdefault(mark.strip()[2:], ln.span)
        out.append(ln.text + mark)
    return "\n".join(out)


#: the leaves closed-form key ranges may read in a kernel: the tile's query bounds and sizes
_RANGE_LEAVES = ("const", "size")


def kernel_closed_form(masks: tuple[Node, ...], exact_only: bool = True) -> ClosedForm | None:
    """The closed form a kernel can evaluate per query tile: key ranges over `q_lo`, `q_hi` and
    the runtime sizes only (no parameters or tensors: those would need kernel arguments).

    Only exact closed forms are used by default: one that dropped a literal (`%` in dilated,
    strided, strided_fixed) covers whole key ranges the layout may prove partly EMPTY (e.g.
    strided_fixed(stride=128, summary=8) at 64x64 tiles visits 136 tiles where the layout
    visits 80), so those patterns keep the layout path. `exact_only=False` is for tests."""
    cf = derive_symbolic(masks)
    if cf is None or len(cf.intervals) > MAX_INTERVALS or (exact_only and not cf.exact):
        return None
    for lo, hi in cf.intervals + cf.full_intervals:
        for n in walk(lo) + walk(hi):
            if not n.args and n.op not in _RANGE_LEAVES and n not in (Q_LO, Q_HI):
                return None
            if n.op in ("load", "score", "sum", "loopvar"):
                return None
    return cf


def _key_range_lines(cf: ClosedForm | None) -> list[Line]:
    """`lo0 = ...` .. `fhi3 = ...` for `_key_ranges`; slots past the closed form's are empty.
    `q_lo` / `q_hi` print as the kernel's local names (nonnegative, like sizes)."""
    as_locals = {("index", "q_lo"): Node("size", "int", (), "q_lo"),
                 ("index", "q_hi"): Node("size", "int", (), "q_hi")}
    printer = ExprPrinter(Operands(), "r")
    for prefix, pairs in (("", cf.intervals if cf else ()), ("f", cf.full_intervals if cf else ())):
        for i in range(MAX_INTERVALS):
            if i < len(pairs):
                lo, hi = (simplify(substitute(x, as_locals)) for x in pairs[i])
                printer.statement(f"{prefix}lo{i}", lo)
                printer.statement(f"{prefix}hi{i}", hi)
            else:
                printer.lines.append(Line(f"{prefix}lo{i} = 0", None))
                printer.lines.append(Line(f"{prefix}hi{i} = 0", None))
    return printer.lines


@dataclass(frozen=True)
class PatternCode:
    """The pattern-specific code every kernel shares: the bodies of `_score_mod`, `_mask_mod`
    and `_bias_mod`, and the static top-k count (0 without `select`)."""

    score: list[Line]
    mask: list[Line]
    bias: list[Line]
    topk: int


def pattern_code(ir: PatternIR, operands: Operands) -> PatternCode:
    """Print a specialized pattern's score statements, masks and sigmoid bias."""
    score = ExprPrinter(operands, "s")
    for stmt in ir.scores:
        score.statement("score", stmt)
        score.forget_score_temps()
    mask = ExprPrinter(operands, "m")
    names = []
    for i, m in enumerate(ir.masks):
        if m.op == "const" and m.value is True:
            continue
        mask.statement(f"keep{i}", m)
        names.append(f"keep{i}")
    mask.lines.append(Line("return " + (" & ".join(names) if names else "q >= 0"), None))
    bias = ExprPrinter(operands, "c")
    if ir.normalizer == "sigmoid":
        bias.statement("bias", ir.bias if ir.bias is not None else const(0.0))
    else:
        bias.lines.append(Line("bias = 0.0", None))
    topk = 0
    if ir.topk is not None:
        n = simplify(ir.topk)
        if n.op != "const":
            raise SpecError(ir.topk.span, "the count of `select topk` must be known when the kernel "
                                          "is compiled", "use a literal or an int parameter")
        topk = int(n.value)
    return PatternCode(score.lines, mask.lines, bias.lines, topk)


def emit_forward(ir: PatternIR, specialization: dict[str, object], wide: bool = False) -> Kernel:
    """Generate the forward kernel module for `ir` with int/bool parameters fixed; `wide`: int64
    index arithmetic (see lowering/int_range.py)."""
    ir = specialize(ir, specialization)
    operands = Operands()
    comments: dict[str, Span] = {}

    code = pattern_code(ir, operands)
    topk = code.topk

    closed = kernel_closed_form(ir.masks)
    args = operands.names()
    holes = {
        "PATTERN": ir.name,
        "SOURCE": ir.path,
        "SPECIALIZATION": ", ".join(f"{k}={specialization[k]!r}" for k in sorted(specialization)) or "none",
        "SCORE_MOD": _render(code.score, comments) or "pass",
        "MASK_MOD": _render(code.mask, comments),
        "BIAS_MOD": _render(code.bias, comments),
        "MOD_ARGS": "".join(", " + a for a in args),
        "HAS_MASK": repr(bool(ir.masks)),
        "SIGMOID": repr(ir.normalizer == "sigmoid"),
        "TOPK": str(topk),
        "WIDE": repr(bool(wide)),
        "CLOSED_FORM": repr(closed is not None),
        "N_COVER": str(len(closed.intervals) if closed else 0),
        "KEY_RANGES": _render(_key_range_lines(closed), comments),
    }
    source = fill(skeleton("forward"), holes, "forward.py.in")
    return Kernel(source, tuple(args), line_spans(source, comments), topk, closed)
