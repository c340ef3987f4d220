"""The op table: one entry per IR op, holding everything the passes know about that op.

An `Op` gives an op's arity and result type rule (`verify` checks every node against them), its
value on Python constants (`fold`: simplification), on tensors (`torch`: the reference
semantics), on intervals (`interval`: the sparsity analysis and `int_range`), its derivative
(`derivative`: the backward) and its Triton text (`triton`, and the source of a `helper` that
text calls). The passes read their rule from here and hold no per-op table of their own; what
they still special-case is what reads their environment: the leaves, `load`, `sum`, and the
reference's float type for `cast`.

A rule whose absence would be wrong fails loudly, naming the op, when a pass needs it
(`rule(node, kind)`): `torch`, `triton`, and `derivative` for float ops. `fold` and `interval`
are optional because their absence is conservative: the op is left for run time, or its value
is unknown to the analysis.

A new unary function `f` of the language is declared in `dsl/types.py` (FUNCTIONS) and
`register`ed here as an op of the same name; `lower.py` maps `f(x)` to it.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from ..dsl.diagnostics import SpecError
from ..dsl.types import BOOL, FLOAT, INT, NUMERIC
from .intervals import (INF, Iv, absolute, compare, corners, div, floordiv, maximum, minimum, mod,
                        nan_safe, select)
from .ir import Node, const
from .triton_forms import ADD, AND, CMP, MUL, OR, XOR, Call, Infix, Postfix, Prefix, Special

#: the result rule of leaves whose dtype is their own (a constant's value, a declared type)
ANY = "any"


@dataclass(frozen=True)
class Op:
    """One IR op.

    `arity`: its number of arguments (None: any, e.g. a load's indices). `result(*arg_dtypes)`:
    its dtype (ANY: the node's own), or None when the arguments are ill-typed.
    `fold(*values)`: its value on Python constants (an ArithmeticError or ValueError leaves it
    unfolded). `torch(*tensors)`: its value on tensors broadcastable to [B, H, rows, k_len].
    `interval(node, *ivs)`: bounds of its value from its arguments' bounds (an `Iv`, or a str
    saying why it is not bounded). `derivative(node, g)`: the adjoints of its arguments, as IR,
    given the node's adjoint `g` (None for an argument that gets none).
    `triton`: how it prints (`Call`, `Infix`, `Prefix`, `Postfix` or `Special`); `helper`: the
    source of a `@triton.jit` function that text calls, emitted into every kernel module."""

    name: str
    arity: int | None
    result: Callable[..., str | None]
    fold: Callable | None = None
    torch: Callable | None = None
    interval: Callable | None = None
    derivative: Callable | None = None
    triton: Call | Infix | Prefix | Postfix | Special | None = None
    helper: str = ""


TABLE: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add an op to the table (an op of that name must not exist)."""
    if op.name in TABLE:
        raise ValueError(f"IR op `{op.name}` is already registered")
    TABLE[op.name] = op
    return op


def unregister(name: str) -> None:
    """Remove an op from the table."""
    del TABLE[name]


def op_of(n: Node) -> Op:
    """The entry of `n`'s op; an op missing from the table is an internal error at `n`."""
    op = TABLE.get(n.op)
    if op is None:
        raise SpecError(n.span, f"internal: IR op `{n.op}` is not in the op table (lowering/ops.py)")
    return op


def rule(n: Node, kind: str) -> Callable | Call | Infix | Prefix | Postfix | Special:
    """The `kind` rule ('torch', 'triton', 'derivative', ...) of `n`'s op; a missing one is an
    internal error at `n` that names the op."""
    found = getattr(op_of(n), kind)
    if found is None:
        raise SpecError(n.span, f"internal: IR op `{n.op}` has no {kind} rule (lowering/ops.py)")
    return found


def triton_helpers() -> str:
    """The Triton helpers the ops' texts call, in registration order (the `FUNCTION_HELPERS` hole)."""
    return "\n\n\n".join(op.helper.strip("\n") for op in TABLE.values() if op.helper)


# --- result rules


def same_numeric(*dtypes: str) -> str | None:
    """Numbers of one type, giving that type (`add`, `min`, `abs`, ...)."""
    return dtypes[0] if len(set(dtypes)) == 1 and dtypes[0] in NUMERIC else None


def floats(*dtypes: str) -> str | None:
    """Floats only, giving a float (`div`, `exp`, ...)."""
    return FLOAT if all(t == FLOAT for t in dtypes) else None


def bools(*dtypes: str) -> str | None:
    """Bools only, giving a bool (`and`, `or`, `not`)."""
    return BOOL if all(t == BOOL for t in dtypes) else None


def _ordered(a: str, b: str) -> str | None:
    return BOOL if a == b and a in NUMERIC else None


def _equality(a: str, b: str) -> str | None:
    return BOOL if a == b else None


# --- interval rules


def increasing(fn: Callable) -> Callable:
    """The interval rule of a unary op that `fn` computes on float64 tensors, non-decreasing."""
    return lambda n, a: nan_safe(fn(a.lo), fn(a.hi))


def decreasing(fn: Callable) -> Callable:
    """The interval rule of a unary op that `fn` computes on float64 tensors, non-increasing."""
    return lambda n, a: nan_safe(fn(a.hi), fn(a.lo))


def _endpoints(fn: Callable) -> Callable:
    return lambda n, a: Iv(fn(a.lo), fn(a.hi))


def _iv_floordiv(n: Node, a: Iv, b: Iv) -> Iv:
    if n.dtype == FLOAT:
        q = div(a, b)
        return Iv(torch.floor(q.lo), torch.floor(q.hi))
    return floordiv(a, b)


def _iv_compare(n: Node, a: Iv, b: Iv) -> Iv:
    return compare(n.op, a, b, FLOAT in (n.args[0].dtype, n.args[1].dtype))


# --- derivative rules: (node, adjoint g) -> adjoint of each argument

def _f(op: str, *args: Node) -> Node:
    return Node(op, FLOAT, args)


ONE, ZERO = const(1.0), const(0.0)
LN2 = math.log(2.0)


def no_gradient(n: Node, g: Node) -> tuple[None, ...]:
    """The derivative rule of an op that passes no gradient (piecewise constant, or no float input)."""
    return (None,) * len(n.args)


def _d_div(n, g):
    a, b = n.args
    return (_f("div", g, b), _f("neg", _f("div", _f("mul", g, a), _f("mul", b, b))))


def _d_pow(n, g):
    a, b = n.args
    da = _f("mul", g, _f("mul", b, _f("pow", a, _f("sub", b, ONE))))
    if b.op == "const":
        return (da, None)
    return (da, _f("mul", g, _f("mul", n, _f("log", a))))


def _d_abs(n, g):
    (a,) = n.args
    sign = _f("where", Node("gt", BOOL, (a, ZERO)), ONE,
              _f("where", Node("lt", BOOL, (a, ZERO)), const(-1.0), ZERO))
    return (_f("mul", g, sign),)


def _d_extremum(n, g):
    """min/max: the whole gradient to the first argument on ties."""
    first = Node("le" if n.op == "min" else "ge", BOOL, n.args)
    return (_f("where", first, g, ZERO), _f("where", first, ZERO, g))


def _d_mod(n, g):
    """Float `a % b` is `a - b * floor(a / b)`: 1 for `a`, `-floor(a / b)` for `b` (torch's
    `remainder` gradient; the steps themselves have none)."""
    a, b = n.args
    return (g, _f("neg", _f("mul", g, _f("floordiv", a, b))))


def _d_where(n, g):
    c = n.args[0]
    return (None, _f("where", c, g, ZERO), _f("where", c, ZERO, g))


# --- semantics helpers


def _fold_floordiv(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b != 0 else 0
    return math.floor(a / b)


def _fold_mod(a, b):
    if isinstance(a, int) and isinstance(b, int) and b == 0:
        return a
    return a % b


def _fold_pow(a, b):
    if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 64:
        return 2 ** 64  # certainly out of the 64-bit range; avoids computing a huge power
    return a ** b


# Integer `//` and `%` are total: `a // 0 == 0` and `a % 0 == a` (so `a == (a // b) * b + a % b`
# still holds), in every rule here and in the kernels (lowering/emit_expr.py). Floats follow IEEE.

def _torch_floordiv(a, b):
    if a.dtype.is_floating_point:
        return torch.floor(a / b)
    zero = b == 0
    return torch.where(zero, 0, torch.div(a, torch.where(zero, 1, b), rounding_mode="floor"))


def _torch_mod(a, b):
    if a.dtype.is_floating_point:
        return torch.remainder(a, b)
    zero = b == 0
    return torch.where(zero, a, torch.remainder(a, torch.where(zero, 1, b)))


def _torch_softplus(x):
    return torch.clamp_min(x, 0) + torch.log1p(torch.exp(-torch.abs(x)))


def _fold_sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


_TANH = '''
@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
'''

_TAN = '''
@triton.jit
def _tan(x):
    return tl.sin(x) / tl.cos(x)
'''

_SOFTPLUS = '''
@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
'''

def _periodic(fn, peak: float) -> Callable:
    """The interval rule of sin (`peak` π/2) or cos (`peak` 0): the endpoints' values, widened
    to 1 where the interval holds a maximum (peak + 2πk) and to −1 where it holds a minimum;
    [−1, 1] for an interval of width ≥ 2π or an infinite one."""
    def rule(n, a):
        lo, hi = a.lo, a.hi
        wide = ~torch.isfinite(lo) | ~torch.isfinite(hi) | (hi - lo >= 2 * math.pi)
        lo, hi = torch.where(wide, 0.0, lo), torch.where(wide, 0.0, hi)
        turn = lambda at: torch.floor((hi - at) / (2 * math.pi)) >= torch.ceil((lo - at) / (2 * math.pi))  # noqa: E731
        f_lo, f_hi = fn(lo), fn(hi)
        low = torch.where(wide | turn(peak + math.pi), -1.0, torch.minimum(f_lo, f_hi))
        high = torch.where(wide | turn(peak), 1.0, torch.maximum(f_lo, f_hi))
        return Iv(low, high)
    return rule


def _iv_tan(n, a):
    """tan increases between its poles (π/2 + πk); an interval holding a pole is unbounded."""
    lo, hi = a.lo, a.hi
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    lo_s, hi_s = torch.where(finite, lo, 0.0), torch.where(finite, hi, 0.0)
    pole = ~finite | (torch.floor((hi_s - math.pi / 2) / math.pi) >= torch.ceil((lo_s - math.pi / 2) / math.pi))
    return Iv(torch.where(pole, -INF, torch.tan(lo_s)), torch.where(pole, INF, torch.tan(hi_s)))


def ints(*dtypes: str) -> str | None:
    return INT if all(d == INT for d in dtypes) else None


def _bits(iv: Iv) -> torch.Tensor:
    """The least n with [lo, hi] inside [-2**n, 2**n - 1] (two's complement width less the sign)."""
    m = torch.maximum(-iv.lo, iv.hi + 1).clamp_min(1.0)
    return torch.ceil(torch.log2(m))


def _iv_bits(op: str) -> Callable:
    """Interval rule of `&`, `|`, `^` on two's-complement ints: the common width's range, and
    tighter where the operands are non-negative (`a & b` <= either, `a | b` >= either)."""
    def rule(n, a, b):
        top = torch.exp2(torch.maximum(_bits(a), _bits(b)))
        lo, hi = -top, top - 1
        a_nn, b_nn = a.lo >= 0, b.lo >= 0
        if op == "and":
            hi = torch.where(a_nn & b_nn, torch.minimum(a.hi, b.hi),
                             torch.where(a_nn, a.hi, torch.where(b_nn, b.hi, hi)))
            lo = torch.where(a_nn | b_nn, 0.0, lo)
        elif op == "or":
            lo = torch.where(a_nn & b_nn, torch.maximum(a.lo, b.lo), lo)
        else:
            lo = torch.where(a_nn & b_nn, 0.0, lo)
        return nan_safe(lo, hi)
    return rule


_SHIFTS = '''
@triton.jit
def _shl(x, c):
    """x << c for a count past 30: an int32 module's values fit 32 bits, so only x == 0 can
    shift that far (and a shift of the full width is undefined in LLVM)."""
    if WIDE:
        y = x << c
    else:
        y = x << tl.minimum(c, 31)
    return y


@triton.jit
def _shr(x, c):
    """x >> c (arithmetic) for a count past 30: x >> 31 is already 0 or -1 for int32."""
    if WIDE:
        y = x >> c
    else:
        y = x >> tl.minimum(c, 31)
    return y
'''


def _check_shift(count: int) -> int:
    if not 0 <= count <= 62:
        raise ValueError(f"shift count {count} is outside 0..62")
    return count


def _torch_shift(fn) -> Callable:
    def run(a, c):
        if bool((c < 0).any() or (c > 62).any()):
            raise ValueError("shift count outside 0..62")  # `check_shift_counts` reports it at bind
        return fn(a, c)
    return run


# --- the entries

# leaves and the structural ops that read the passes' environments
for _name, _dtype in (("const", ANY), ("index", INT), ("size", INT), ("param", ANY), ("score", FLOAT),
                      ("loopvar", INT)):
    register(Op(_name, 0, lambda d=_dtype: d))
register(Op("load", None, lambda *index: ANY if all(t == INT for t in index) else None))
register(Op("sum", 2, lambda count, body: body if count == INT else None))
for _name in ("any", "all"):  # loops like `sum`, combining bool terms with `or` / `and`
    register(Op(_name, 2, lambda count, body: BOOL if count == INT and body == BOOL else None))
register(Op("where", 3, lambda c, a, b: a if c == BOOL and a == b else None,
            fold=lambda c, a, b: a if c else b, torch=torch.where,
            interval=lambda n, c, a, b: select(c, a, b), derivative=_d_where, triton=Call("tl.where")))
register(Op("cast", 1, lambda a: FLOAT if a == INT else None,  # int -> float
            fold=float, torch=None,  # the reference converts to its own float type (fp32 or fp64)
            interval=_endpoints(lambda x: x), derivative=no_gradient, triton=Postfix(".to(tl.float32)")))

# arithmetic
register(Op("add", 2, same_numeric, fold=operator.add, torch=torch.add,
            interval=lambda n, a, b: Iv(a.lo + b.lo, a.hi + b.hi),
            derivative=lambda n, g: (g, g), triton=Infix("+", ADD)))
register(Op("sub", 2, same_numeric, fold=operator.sub, torch=torch.sub,
            interval=lambda n, a, b: Iv(a.lo - b.hi, a.hi - b.lo),
            derivative=lambda n, g: (g, _f("neg", g)), triton=Infix("-", ADD)))
register(Op("mul", 2, same_numeric, fold=operator.mul, torch=torch.mul,
            interval=lambda n, a, b: corners(torch.mul, a, b),
            derivative=lambda n, g: (_f("mul", g, n.args[1]), _f("mul", g, n.args[0])), triton=Infix("*", MUL)))
register(Op("div", 2, floats, fold=operator.truediv, torch=torch.div, interval=lambda n, a, b: div(a, b),
            derivative=_d_div, triton=Infix("/", MUL)))
register(Op("floordiv", 2, same_numeric, fold=_fold_floordiv, torch=_torch_floordiv, interval=_iv_floordiv,
            derivative=no_gradient, triton=Special("divmod")))
register(Op("mod", 2, same_numeric, fold=_fold_mod, torch=_torch_mod,
            interval=lambda n, a, b: mod(a, b) if n.dtype == INT else "float `%` is not bounded",
            derivative=_d_mod, triton=Special("divmod")))
register(Op("pow", 2, same_numeric, fold=_fold_pow, torch=torch.pow, interval=None,
            derivative=_d_pow, triton=Special("pow")))
register(Op("neg", 1, same_numeric, fold=operator.neg, torch=torch.neg, interval=lambda n, a: Iv(-a.hi, -a.lo),
            derivative=lambda n, g: (_f("neg", g),), triton=Prefix("-")))
register(Op("abs", 1, same_numeric, fold=abs, torch=torch.abs, interval=lambda n, a: absolute(a),
            derivative=_d_abs, triton=Call("tl.abs")))
register(Op("min", 2, same_numeric, fold=min, torch=torch.minimum, interval=lambda n, a, b: minimum(a, b),
            derivative=_d_extremum, triton=Call("tl.minimum")))
register(Op("max", 2, same_numeric, fold=max, torch=torch.maximum, interval=lambda n, a, b: maximum(a, b),
            derivative=_d_extremum, triton=Call("tl.maximum")))
for _name, _fn in (("floor", math.floor), ("ceil", math.ceil)):
    # the result has the pattern's int type: int64 in WIDE modules, as the reference's ints
    register(Op(_name, 1, lambda a: INT if a == FLOAT else None, fold=_fn,  # float -> int
                torch=lambda x, f=getattr(torch, _name): f(x).to(torch.int64),
                interval=_endpoints(getattr(torch, _name)), derivative=no_gradient,
                triton=Call(f"_i{_name}"),
                helper=(f"@triton.jit\ndef _i{_name}(x):\n"
                        f"    \"\"\"{_name}(x) as the pattern's int type (int64 in WIDE modules).\"\"\"\n"
                        f"    if WIDE:\n        y = tl.{_name}(x).to(tl.int64)\n"
                        f"    else:\n        y = tl.{_name}(x).to(tl.int32)\n    return y\n")))

# integer bit operators (two's complement, as Python's ints within 64 bits); shift counts are
# static and checked at bind (0..62), so `<<` is `* 2**c` and `>>` is `// 2**c` (arithmetic)
register(Op("bitand", 2, ints, fold=operator.and_, torch=torch.bitwise_and, interval=_iv_bits("and"),
            derivative=no_gradient, triton=Infix("&", AND)))
register(Op("bitor", 2, ints, fold=operator.or_, torch=torch.bitwise_or, interval=_iv_bits("or"),
            derivative=no_gradient, triton=Infix("|", OR)))
register(Op("bitxor", 2, ints, fold=operator.xor, torch=torch.bitwise_xor, interval=_iv_bits("xor"),
            derivative=no_gradient, triton=Infix("^", XOR)))
register(Op("lshift", 2, ints, fold=lambda a, c: a << _check_shift(c),
            torch=_torch_shift(torch.bitwise_left_shift),
            interval=lambda n, a, c: corners(lambda x, y: x * torch.exp2(y), a, c),
            derivative=no_gradient, triton=Special("shift"), helper=_SHIFTS))
register(Op("rshift", 2, ints, fold=lambda a, c: a >> _check_shift(c),
            torch=_torch_shift(torch.bitwise_right_shift),
            interval=lambda n, a, c: corners(lambda x, y: torch.floor(x / torch.exp2(y)), a, c),
            derivative=no_gradient, triton=Special("shift")))
register(Op("invert", 1, ints, fold=operator.invert, torch=torch.bitwise_not,
            interval=lambda n, a: Iv(-a.hi - 1, -a.lo - 1), derivative=no_gradient, triton=Prefix("~")))

# logic and comparisons (0/1 intervals: `and` is min, `or` is max)
register(Op("not", 1, bools, fold=operator.not_, torch=torch.logical_not,
            interval=lambda n, a: Iv(1 - a.hi, 1 - a.lo), triton=Prefix("~")))
register(Op("and", 2, bools, fold=lambda a, b: a and b, torch=torch.logical_and,
            interval=lambda n, a, b: minimum(a, b), triton=Infix("&", AND)))
register(Op("or", 2, bools, fold=lambda a, b: a or b, torch=torch.logical_or,
            interval=lambda n, a, b: maximum(a, b), triton=Infix("|", OR)))
COMPARISONS = ("lt", "le", "gt", "ge", "eq", "ne")
for _name, _sym in zip(COMPARISONS, ("<", "<=", ">", ">=", "==", "!=")):
    register(Op(_name, 2, _equality if _name in ("eq", "ne") else _ordered, fold=getattr(operator, _name),
                torch=getattr(torch, _name), interval=_iv_compare, triton=Infix(_sym, CMP)))

# the language's float functions
register(Op("exp", 1, floats, fold=math.exp, torch=torch.exp, interval=increasing(torch.exp),
            derivative=lambda n, g: (_f("mul", g, n),), triton=Call("tl.exp")))
register(Op("exp2", 1, floats, fold=lambda x: 2.0 ** x, torch=torch.exp2, interval=increasing(torch.exp2),
            derivative=lambda n, g: (_f("mul", g, _f("mul", n, const(LN2))),), triton=Call("tl.exp2")))
register(Op("log", 1, floats, fold=math.log, torch=torch.log, interval=increasing(torch.log),
            derivative=lambda n, g: (_f("div", g, n.args[0]),), triton=Call("tl.log")))
register(Op("log2", 1, floats, fold=math.log2, torch=torch.log2, interval=increasing(torch.log2),
            derivative=lambda n, g: (_f("div", g, _f("mul", n.args[0], const(LN2))),), triton=Call("tl.log2")))
register(Op("sqrt", 1, floats, fold=math.sqrt, torch=torch.sqrt, interval=increasing(torch.sqrt),
            derivative=lambda n, g: (_f("div", g, _f("mul", const(2.0), n)),), triton=Call("tl.sqrt")))
register(Op("tanh", 1, floats, fold=math.tanh, torch=torch.tanh, interval=increasing(torch.tanh),
            derivative=lambda n, g: (_f("mul", g, _f("sub", ONE, _f("mul", n, n))),),
            triton=Call("_tanh"), helper=_TANH))
register(Op("sigmoid", 1, floats, fold=_fold_sigmoid, torch=torch.sigmoid, interval=increasing(torch.sigmoid),
            derivative=lambda n, g: (_f("mul", g, _f("mul", n, _f("sub", ONE, n))),), triton=Call("tl.sigmoid")))
register(Op("sin", 1, floats, fold=math.sin, torch=torch.sin, interval=_periodic(torch.sin, math.pi / 2),
            derivative=lambda n, g: (_f("mul", g, _f("cos", n.args[0])),), triton=Call("tl.sin")))
register(Op("cos", 1, floats, fold=math.cos, torch=torch.cos, interval=_periodic(torch.cos, 0.0),
            derivative=lambda n, g: (_f("neg", _f("mul", g, _f("sin", n.args[0]))),), triton=Call("tl.cos")))
register(Op("tan", 1, floats, fold=math.tan, torch=torch.tan, interval=_iv_tan,
            derivative=lambda n, g: (_f("mul", g, _f("add", ONE, _f("mul", n, n))),),
            triton=Call("_tan"), helper=_TAN))
register(Op("erf", 1, floats, fold=math.erf, torch=torch.erf, interval=increasing(torch.erf),
            derivative=lambda n, g: (_f("mul", g, _f("mul", const(2.0 / math.sqrt(math.pi)),
                                                     _f("exp", _f("neg", _f("mul", n.args[0], n.args[0]))))),),
            triton=Call("tl.erf")))
register(Op("softplus", 1, floats, fold=lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x))),
            torch=_torch_softplus, interval=increasing(torch.nn.functional.softplus),
            derivative=lambda n, g: (_f("mul", g, _f("sigmoid", n.args[0])),),
            triton=Call("_softplus"), helper=_SOFTPLUS))
