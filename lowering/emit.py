"""Triton emission: fill a hand-written kernel skeleton's named holes from a pattern's IR.

`emit_forward(ir, specialization)` returns a `Kernel`: the generated module text, the map from
its lines back to spec spans, and the signature of each kernel function as data
(`lowering/signature.py`). Skeletons live in `lowering/skeletons/*.py.in`; a line `# include:
NAME` pulls in `NAME.py.in` (the prelude both directions share), a hole is `{{NAME}}`, and
`fill` refuses a skeleton hole without a value and a value without a hole. A hole alone on its
line takes that line's indentation for every line of its value.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from importlib import resources

from ..dsl.source import Span
from .closed_form import MAX_INTERVALS, Q_HI, Q_LO, ClosedForm, derive_symbolic
from .emit_expr import ExprPrinter, Line, Operands
from .ir import Node, PatternIR, const, walk
from .ops import triton_helpers
from .placement import place
from .printer import canonical_text
from .signature import Constraints, Signature, forward_signatures
from .simplify import simplify, static_value, substitute

_HOLE = re.compile(r"\{\{([A-Z_][A-Z0-9_]*)\}\}")
_MARK = re.compile(r"  # (\S+:\d+)$")
_INCLUDE = re.compile(r"^# include: (\w+)$", re.M)


def skeleton(name: str) -> str:
    """The text of `lowering/skeletons/<name>.py.in`, its `# include: NAME` lines expanded."""
    text = resources.files("attnc.lowering.skeletons").joinpath(f"{name}.py.in").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: skeleton(m.group(1)).rstrip("\n"), text)


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
    """A generated module described as data: its text, the spec span of each generated line,
    the signature of each kernel function in it (in launch order), and what its launches must
    respect. `topk` is the static count of `select topk` (0 without one); `closed_form` the
    key ranges the forward computes per query tile (None: it reads a block layout); `grads`
    the float tensor arguments whose gradients a backward module accumulates."""

    source: str
    line_spans: dict[int, Span]  # 1-based generated line -> span of the spec text it came from
    signatures: tuple[Signature, ...]
    constraints: Constraints
    topk: int = 0
    closed_form: ClosedForm | None = None
    grads: tuple[str, ...] = ()
    #: the same for the forward and backward modules of one specialized pattern (a content
    #: hash of its IR and specialization): what tuned configurations are remembered under
    pattern_key: str = ""

    def signature(self, name: str) -> Signature:
        for sig in self.signatures:
            if sig.name == name:
                return sig
        raise KeyError(f"internal: the module has no kernel `{name}`")


def specialize_ir(ir: PatternIR, values: dict[str, object]) -> PatternIR:
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


def render(lines: list[Line], comments: dict[str, Span]) -> str:
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
            if n.op in ("load", "score", "sum", "any", "all", "loopvar"):
                return None
    return cf


#: q <-> k and their lengths: the dK/dV pass's closed form is the forward's with roles swapped
_SWAP = {("index", "q"): Node("index", "int", (), "k"), ("index", "k"): Node("index", "int", (), "q"),
         ("size", "q_len"): Node("size", "int", (), "k_len"),
         ("size", "k_len"): Node("size", "int", (), "q_len")}


def transposed_closed_form(masks: tuple[Node, ...]) -> ClosedForm | None:
    """The closed form of the masks with queries and keys swapped: per key tile, the query
    ranges that hold every allowed query (cover) and those allowed for every key (full), for
    the dK/dV pass. Its ranges read the swapped sizes; `range_lines(..., swap=True)` swaps
    them back when printing."""
    return kernel_closed_form(tuple(simplify(substitute(m, _SWAP)) for m in masks))


def range_lines(cf: ClosedForm | None, lo: str, hi: str, swap: bool = False) -> list[Line]:
    """`lo0 = ...` .. `fhi3 = ...` for `_key_ranges` / `_query_ranges`; slots past the closed
    form's are empty. The tile's bounds print as the locals `lo` / `hi` (nonnegative, like
    sizes); `swap`: the ranges came from `transposed_closed_form`."""
    as_locals = {("index", "q_lo"): Node("size", "int", (), lo),
                 ("index", "q_hi"): Node("size", "int", (), hi)}
    if swap:
        as_locals.update({k: v for k, v in _SWAP.items() if k[0] == "size"})
    printer = ExprPrinter(Operands(), "r")
    for prefix, pairs in (("", cf.intervals if cf else ()), ("f", cf.full_intervals if cf else ())):
        for i in range(MAX_INTERVALS):
            if i < len(pairs):
                a, b = (simplify(substitute(x, as_locals)) for x in pairs[i])
                printer.statement(f"{prefix}lo{i}", a)
                printer.statement(f"{prefix}hi{i}", b)
            else:
                printer.lines.append(Line(f"{prefix}lo{i} = 0", None))
                printer.lines.append(Line(f"{prefix}hi{i} = 0", None))
    return printer.lines


@dataclass(frozen=True)
class PatternCode:
    """The pattern-specific code every kernel shares: the bodies of `_score_mod`, `_mask_mod`,
    `_bias_mod` and `_sink_mod`, and the static top-k count (0 without `select`)."""

    score: list[Line]
    mask: list[Line]
    bias: list[Line]
    sink: list[Line]
    topk: int


def pattern_code(ir: PatternIR, operands: Operands) -> PatternCode:
    """Print a specialized pattern's score statements, masks, sigmoid bias and softmax sink."""
    score = ExprPrinter(operands, "s")
    score.hoist(ir.scores)
    for stmt in ir.scores:
        score.statement("score", stmt)
        score.forget_score_temps()
    mask = ExprPrinter(operands, "m")
    mask.hoist(ir.masks)
    names = []
    for i, m in enumerate(ir.masks):
        if m.op == "const" and m.value is True:
            continue
        mask.statement(f"keep{i}", m)
        names.append(f"keep{i}")
    mask.lines.append(Line("return " + (" & ".join(names) if names else "q >= 0"), None))
    bias = ExprPrinter(operands, "c")
    if ir.normalizer == "sigmoid":
        bias.hoist([ir.bias] if ir.bias is not None else [])
        bias.statement("bias", ir.bias if ir.bias is not None else const(0.0))
    else:
        bias.lines.append(Line("bias = 0.0", None))
    sink = ExprPrinter(operands, "z")
    if ir.sink is not None:
        sink.hoist([ir.sink])
        sink.statement("sink", ir.sink)
    else:
        sink.lines.append(Line("sink = 0.0", None))
    topk = 0
    if ir.topk is not None:
        topk = int(static_value(ir.topk, {}, message="the count of `select topk` must be known when "
                                "the kernel is compiled", hint="use a literal or an int parameter"))
    return PatternCode(score.lines, mask.lines, bias.lines, sink.lines, topk)


def reads_score(ir: PatternIR) -> bool:
    """Whether a keep decision reads the score (a mask on `score`, or `select topk`)."""
    return ir.topk is not None or any(n.op == "score" for m in ir.masks for n in walk(m))


def pattern_key(ir: PatternIR, specialization: dict, wide: bool, positions: bool = False) -> str:
    """A content hash of a pattern's IR, its specialization, its index width and whether it is
    placed."""
    text = canonical_text(ir) + repr(sorted(specialization.items())) + repr(bool(wide))
    text += ", placed" if positions else ""
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def log2_fold(ir: PatternIR) -> bool:
    """The softmax logit is q·k * scale, read by no mask: scale and log2(e) fold into one
    multiply (the kernels' LOG2_FOLD)."""
    return not ir.scores and ir.normalizer == "softmax" and not any(
        n.op == "score" for m in ir.masks for n in walk(m))


def common_holes(ir: PatternIR, specialization: dict, code: "PatternCode", operands: Operands,
                 closed: ClosedForm | None, wide: bool, comments: dict[str, Span]) -> dict[str, str]:
    """The holes of `common.py.in`, which both directions include, and the header's."""
    return {
        "PATTERN": ir.name,
        "SOURCE": ir.path,
        "SPECIALIZATION": ", ".join(f"{k}={specialization[k]!r}" for k in sorted(specialization)) or "none",
        "SCORE_MOD": render(code.score, comments) or "pass",
        "MASK_MOD": render(code.mask, comments),
        "BIAS_MOD": render(code.bias, comments),
        "SINK_MOD": render(code.sink, comments),
        "HAS_SINK": repr(ir.sink is not None),
        "MOD_ARGS": operands.mod_args(),
        "HAS_MASK": repr(bool(ir.masks)),
        "SIGMOID": repr(ir.normalizer == "sigmoid"),
        "TOPK": str(code.topk),
        "TOPK_W": str(_next_pow2(code.topk) if code.topk else 1),
        "WIDE": repr(bool(wide)),
        "FUNCTION_HELPERS": triton_helpers(),
        "LOG2_FOLD": repr(log2_fold(ir)),
        "POSITIONS": repr(operands.positions),
        "CLOSED_FORM": repr(closed is not None),
        "N_COVER": str(len(closed.intervals) if closed else 0),
        "N_RUNS": str(len(closed.intervals) if closed else 1),
        "KEY_RANGES": render(range_lines(closed, "q_lo", "q_hi"), comments),
    }


def constraints(ir: PatternIR, topk: int) -> Constraints:
    """What every launch of the pattern's modules must respect (see `Constraints`)."""
    return Constraints(min_block_n=max(16, _next_pow2(topk)), shared_tiles=reads_score(ir))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def signature_holes(signatures, holes_by_name: dict[str, str]) -> dict[str, str]:
    """`{{X_PARAMS}}` (the `def` parameter list) and `{{X_ARGDOC}}` of each kernel function."""
    out = {}
    for sig in signatures:
        prefix = holes_by_name[sig.name]
        out[f"{prefix}_PARAMS"] = sig.params_text(" " * len(f"def {sig.name}("))
        out[f"{prefix}_ARGDOC"] = sig.doc_text()
    return out


def prepare(ir: PatternIR, specialization: dict[str, object], positions: bool):
    """The IR a module prints (int and bool parameters fixed; placed when the calls it serves
    have positions, `lowering/placement.py`) and its operand registry."""
    ir = specialize_ir(ir, specialization)
    if positions:
        ir = place(ir)
    return ir, Operands(positions=positions)


def emit_forward(ir: PatternIR, specialization: dict[str, object], wide: bool = False,
                 positions: bool = False) -> Kernel:
    """Generate the forward kernel module for `ir` with int/bool parameters fixed; `wide`: int64
    index arithmetic (see lowering/int_range.py); `positions`: for calls with positions (each
    program loads its sequence's q_start, k_start and k_len)."""
    ir, operands = prepare(ir, specialization, positions)
    comments: dict[str, Span] = {}

    code = pattern_code(ir, operands)
    topk = code.topk

    closed = kernel_closed_form(ir.masks)
    signatures = forward_signatures(operands.operands(), closed is not None)
    holes = {**common_holes(ir, specialization, code, operands, closed, wide, comments),
             **signature_holes(signatures, {"attn_kth": "KTH", "attn_fwd": "FWD",
                                            "attn_merge": "MERGE"})}
    source = fill(skeleton("forward"), holes, "forward.py.in")
    return Kernel(source, line_spans(source, comments), signatures, constraints(ir, topk), topk,
                  closed, (), pattern_key(ir, specialization, wide, positions))
