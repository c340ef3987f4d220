"""A precedence-aware printer: core IR expressions → Triton (Python) expression text.

Conventions of the generated code (the skeletons rely on them):

* indices: `b`, `h` are scalar program ids; `q` is a `[BLOCK_M, 1]` and `k` a `[1, BLOCK_N]`
  int32 tensor; `score` is the `[BLOCK_M, BLOCK_N]` fp32 logit tile;
* sizes are kernel arguments under their own names (`q_len`, `k_len`, ...);
* float parameters are kernel arguments `prm_<name>` (runtime values: no recompilation);
  int and bool parameters are substituted as constants before printing (specialization);
* a tensor argument `t` is passed as `tns_t` (pointer), `tns_t_d<i>` (sizes) and `tns_t_s<i>`
  (strides); loads clamp every index into range, so memory is never read out of bounds;
* ints are int32/int64 tensors, floats fp32, bools int1; integer `//` and `%` follow Python
  (floor) semantics through the `_floordiv` / `_mod` helpers unless both operands are provably
  non-negative (and the divisor positive), where C and Python semantics agree; a divisor that
  is not a constant is guarded, so `x // 0 == 0` and `x % 0 == x` as in the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..dsl.diagnostics import SpecError
from ..dsl.source import Span
from .ir import Node, const, transform, walk
from .ops import COMPARISONS, rule
from .signature import Operand, dim_name, operand_args, param_name, stride_name, tensor_name
from .uniform import strength_reduce, uniform_roots
from .simplify import LOOPS, simplify, substitute, unroll_loops
from .triton_forms import ATOM, CMP, MUL, SHIFT, UNARY, Special, wrap

_INDEX = {"b": "b", "h": "h", "q": "q", "k": "k"}
#: exponents `x ** c` expanded into products
_MAX_POW = 8


def unroll_sums(node: Node) -> Node:
    """Replace every `sum`, `any` and `all` by the chain of its terms (its count must be a
    constant by now)."""
    for n in walk(node):
        if n.op in LOOPS and n.args[0].op != "const":
            raise SpecError(n.span, f"the range of `{n.op}` must be known when the kernel is compiled",
                            "use a constant or an int parameter for the count")
    return unroll_loops(simplify(node))


def nonnegative(n: Node, memo: dict) -> bool:
    """A sound (incomplete) proof that an int expression is never negative."""
    key = id(n)
    if key in memo:
        return memo[key]
    op = n.op
    if op == "const":
        out = n.value >= 0
    elif op in ("index", "size"):
        out = True
    elif op in ("add", "mul", "min", "floordiv"):
        out = all(nonnegative(a, memo) for a in n.args)
    elif op == "max":
        out = any(nonnegative(a, memo) for a in n.args)
    elif op == "mod":
        out = positive(n.args[1], memo)
    elif op == "abs":
        out = True
    elif op == "where":
        out = nonnegative(n.args[1], memo) and nonnegative(n.args[2], memo)
    else:
        out = False
    memo[key] = out
    return out


def positive(n: Node, memo: dict) -> bool:
    return n.op == "const" and n.value > 0


@dataclass
class Operands:
    """The pattern operands printed expressions read (sizes are always kernel arguments)."""

    params: set[str] = field(default_factory=set)
    tensors: dict[str, int] = field(default_factory=dict)  # name -> rank
    #: a placed pattern (`lowering/placement.py`): helpers also take the sequence's positions
    positions: bool = False

    def operands(self) -> tuple[Operand, ...]:
        """Float parameters, then tensor arguments, each sorted by name."""
        return (tuple(Operand(p, "param") for p in sorted(self.params))
                + tuple(Operand(t, "tensor", self.tensors[t]) for t in sorted(self.tensors)))

    def mod_args(self) -> str:
        """`, a, b, ...`: the operands' kernel arguments (and a placed pattern's `q_start`,
        `k_start`), appended to helper signatures."""
        placed = ", q_start, k_start" if self.positions else ""
        return placed + "".join(", " + a.name for a in operand_args(self.operands()))


@dataclass
class Line:
    """One generated statement and the spec span it came from."""

    text: str
    span: Span | None


def _per_program(n: Node) -> bool:
    """True when `n` is one value per program (reads no position and no score)."""
    return not any(m.op == "score" or (m.op == "index" and m.value in ("q", "k")) for m in walk(n))


class ExprPrinter:
    """Prints IR DAGs as a list of assignment lines; a subexpression used twice gets a temporary."""

    def __init__(self, operands: Operands, prefix: str):
        self.operands = operands
        self.prefix = prefix
        self.lines: list[Line] = []
        self.temps: dict[Node, str] = {}
        self.counter = 0
        self.signs: dict = {}

    @staticmethod
    def prepare(node: Node) -> Node:
        """The form of an expression the printer prints: sums unrolled, divisions by per-program
        values turned into reciprocal multiplies (`lowering/uniform.py`)."""
        return strength_reduce(unroll_sums(node))

    def hoist(self, nodes) -> None:
        """Emit the per-program subexpressions of `nodes` (to be printed later in this function)
        as temporaries now, once, before any statement (and so before any atomic)."""
        for n in uniform_roots([self.prepare(x) for x in nodes]):
            if n not in self.temps:
                name = f"{self.prefix}{self.counter}"
                self.counter += 1
                self.lines.append(Line(f"{name} = {self.expr(n)[0]}", n.span))
                self.temps[n] = name

    def statement(self, target: str, node: Node, span: Span | None = None) -> None:
        """Emit `target = <node>`, with temporaries for shared subexpressions first."""
        node = self.prepare(node)
        uses: dict[Node, int] = {}
        for n in walk(node):
            for a in n.args:
                uses[a] = uses.get(a, 0) + 1
        shared = [n for n in walk(node) if uses.get(n, 0) > 1 and n.args and n.op != "const"
                  and n not in self.temps]
        for n in shared:
            if n in self.temps:  # a structurally equal twin was named already
                continue
            name = f"{self.prefix}{self.counter}"
            self.counter += 1
            self.lines.append(Line(f"{name} = {self.expr(n)[0]}", n.span or span))
            self.temps[n] = name
        self.lines.append(Line(f"{target} = {self.expr(node)[0]}", span or node.span))

    def forget_score_temps(self) -> None:
        """Temporaries that read `score` are stale once `score` is reassigned."""
        self.temps = {n: t for n, t in self.temps.items() if not any(m.op == "score" for m in walk(n))}

    # ------------------------------------------------------------------ expressions

    def expr(self, n: Node) -> tuple[str, int]:
        """(text, precedence) of `n`."""
        if n in self.temps:
            return self.temps[n], ATOM
        op = n.op
        if op == "const":
            return self._const(n)
        if op == "index":
            return _INDEX[n.value], ATOM
        if op == "size":
            return n.value, ATOM
        if op == "param":
            if n.dtype != "float":
                raise SpecError(n.span, f"internal: parameter `{n.value}` was not specialized")
            self.operands.params.add(n.value)
            return param_name(n.value), ATOM
        if op == "score":
            return "score", ATOM
        if op == "load":
            return self._load(n), ATOM
        if op in LOOPS or op == "loopvar":
            raise SpecError(n.span, f"internal: `{op}` reached the printer unexpanded")
        form = rule(n, "triton")
        if isinstance(form, Special):
            return getattr(self, self.SPECIAL[form.name])(n)
        text, prec = form.render([self.expr(a) for a in n.args])
        if op in COMPARISONS and n.args[0].dtype == "float" and _per_program(n):
            # Triton's interpreter keeps a *scalar* float comparison's result in float storage,
            # so a later `&`/`|`/`~` with it fails; `!= 0` gives real booleans (a no-op compiled)
            return f"({text}) != 0", CMP
        return text, prec

    def _wrap(self, n: Node, need: int) -> str:
        return wrap(self.expr(n), need)

    def _const(self, n: Node) -> tuple[str, int]:
        v = n.value
        if isinstance(v, bool):
            # a bare Python bool would not broadcast like an int1 tensor in `&` / `|`
            return ("(q >= 0)" if v else "(q < 0)"), ATOM
        if isinstance(v, float):
            if math.isinf(v):
                return ('float("inf")' if v > 0 else 'float("-inf")'), ATOM
            text = repr(v)
        else:
            text = str(v)
        return text, (UNARY if text.startswith("-") else ATOM)

    def _load(self, n: Node) -> str:
        name = n.value
        self.operands.tensors[name] = len(n.args)
        terms = []
        for i, a in enumerate(n.args):
            idx = self.expr(a)[0]
            if not nonnegative(a, self.signs):
                idx = f"tl.maximum({idx}, 0)"
            terms.append(f"tl.minimum({idx}, {dim_name(name, i)} - 1) * {stride_name(name, i)}")
        ptr = f"{tensor_name(name)} + " + " + ".join(terms) if terms else tensor_name(name)
        conv = {"float": ".to(tl.float32)", "int": ".to(tl.int64)", "bool": " != 0"}[n.dtype]
        text = f"tl.load({ptr}){conv}"
        return f"({text})" if n.dtype == "bool" else text

    def _divmod(self, n: Node) -> tuple[str, int]:
        a, b = n.args
        if n.dtype == "float":
            x, y = self.expr(a)[0], self.expr(b)[0]
            if n.op == "floordiv":
                return f"tl.floor(({x}) / ({y}))", ATOM
            return f"_fmod({x}, {y})", ATOM
        if nonnegative(a, self.signs) and positive(b, self.signs):
            sym = "//" if n.op == "floordiv" else "%"
            return f"{self._wrap(a, MUL)} {sym} {self._wrap(b, MUL + 1)}", MUL
        helper = "_floordiv" if n.op == "floordiv" else "_mod"
        if b.op == "const" and b.value != 0:
            return f"{helper}({self.expr(a)[0]}, {self.expr(b)[0]})", ATOM
        if b.op == "const":  # `x // 0 == 0` and `x % 0 == x`, as in the reference
            return ("0", ATOM) if n.op == "floordiv" else self.expr(a)
        # a divisor known only at run time may be 0: `x // 0 == 0`, `x % 0 == x` (as the reference)
        x, d = self._named(a, n.span), self._named(b, n.span)
        at_zero = "0" if n.op == "floordiv" else x
        return f"tl.where({d} == 0, {at_zero}, {helper}({x}, tl.where({d} == 0, 1, {d})))", ATOM

    def _shift(self, n: Node) -> tuple[str, int]:
        """`<<` / `>>` with a count known at compile time (checked at bind to be 0..62); a count
        past 30 goes through `_shl` / `_shr`, which keep int32 modules defined."""
        a, c = n.args
        if c.op == "const" and c.value <= 30:
            sym = "<<" if n.op == "lshift" else ">>"
            return f"{self._wrap(a, SHIFT)} {sym} {self._wrap(c, SHIFT + 1)}", SHIFT
        helper = "_shl" if n.op == "lshift" else "_shr"
        return f"{helper}({self.expr(a)[0]}, {self.expr(c)[0]})", ATOM

    def _pow(self, n: Node) -> tuple[str, int]:
        base, e = n.args
        const_e = e.op == "const"
        if const_e and float(e.value).is_integer() and abs(e.value) <= _MAX_POW:
            count = int(abs(e.value))
            if count == 0:
                return ("1.0" if n.dtype == "float" else "1"), ATOM
            x = self._named(base, n.span)
            prod = " * ".join([x] * count)
            if e.value < 0:
                return f"1.0 / ({prod})", MUL
            return prod, MUL if count > 1 else ATOM
        if n.dtype != "float":
            raise SpecError(n.span, "integer `**` in a kernel needs a constant exponent",
                            "use a float base, or an int parameter / literal as the exponent")
        if const_e and e.value == 0.5:
            return f"tl.sqrt({self.expr(base)[0]})", ATOM
        if const_e:  # x ** c = 2 ** (c log2 x); 0 ** c is 0 (c > 0) or inf (c < 0)
            x = self._named(base, n.span)
            zero = "0.0" if e.value > 0 else 'float("inf")'
            return f"tl.where({x} == 0.0, {zero}, tl.exp2({e.value!r} * tl.log2({x})))", ATOM
        return f"_powf({self.expr(base)[0]}, {self.expr(e)[0]})", ATOM

    #: the printer's own rules (methods) for the ops whose text needs sign proofs or temporaries
    SPECIAL = {"divmod": "_divmod", "pow": "_pow", "shift": "_shift"}

    def _named(self, n: Node, span: Span | None) -> str:
        """`n` as a name or literal, emitting a temporary line when it is a compound."""
        if n.op in ("const", "index", "size", "param", "score") or n in self.temps:
            return self._wrap(n, ATOM)
        name = f"{self.prefix}{self.counter}"
        self.counter += 1
        self.lines.append(Line(f"{name} = {self.expr(n)[0]}", n.span or span))
        self.temps[n] = name
        return name
