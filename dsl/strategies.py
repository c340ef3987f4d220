"""Hypothesis strategies for well-typed `.attn` patterns, built as ASTs.

Used by the test suite (printer round trip, robustness, analysis soundness, differential fuzzing)
and by `attnc fuzz` (runtime/fuzz.py). Requires `hypothesis` (a test dependency).

Generated patterns are *meaningful* as well as well-typed, so that a disagreement between two
backends is a bug and not noise:

- tensor indices stay in range (`% n` for static extents, `clamp(i, 0, n - 1)` for sizes);
- integer divisors are non-zero literals (possibly negative, to exercise floor semantics);
- `log`/`sqrt` see positive arguments and `exp` non-positive ones; float terms stay bounded;
- integer values stay far below 2**31 (kernels compute indices in int32, the reference in int64);
- nothing converts a score-dependent float into an int or a bool (a rounding difference there
  would flip a discrete decision), and float comparisons in masks use only dyadic constants.

Hypothesis shrinks integers toward 0 and sampled lists toward their first element, so leaves,
`+` and "no" are what a choice shrinks to: optional constructs (`select`, `normalize`, `use`,
the `sum` wrapper, a pattern called in a mask instead of `use`d) are drawn when an integer is at
its *maximum*, and a shrunk failure keeps one only when it is needed.

`def`s come by *extraction* (`extract_defs`): a subexpression of a statement becomes the body
of a new def, its positions, `score` and loop variables becoming parameters, and the
subexpression a call of it. The def lands at file level when its body reads nothing of the
pattern (else just before the statement), and sometimes declares its parameters' types. A call
inlines to the expression it replaced, so the pattern means what it meant without the def
(the same IR, so the same kernels): every property that held still holds. `modules` and
`fuzz_modules` choose the extraction from a hash of the drawn module, not from draws, so the
choices hypothesis makes — and so the cases, and the runtime, of a fixed-seed profile — are
those it made before defs existed; `extracted_defs` draws it instead.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field, fields, replace

from hypothesis import strategies as st

from . import ast as A
from . import types as T
from .printer import print_module

#: the language's unary float functions (exp, tanh, ...), in declaration order
FLOAT_FUNCS = tuple(name for name, f in T.FUNCTIONS.items() if f.result == T.FLOAT and f.max_args == 1)
COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")
DYADIC = (0.5, 1.0, 1.5, 2.0, 0.25, 3.0)  # exact in every float type, so comparisons agree
#: tensor shapes a pattern may declare: names of sizes, or static extents given as digit strings
TENSOR_DIMS = (("heads",), ("k_len",), ("batch", "k_len"), ("heads", "7"), ("batch", "q_len"),
               ("q_len", "k_len"), ("kv_heads", "16"))


@dataclass
class Ctx:
    """Names in scope while generating a pattern, by type."""

    ints: list[str] = field(default_factory=lambda: ["q", "k", "b", "h"])
    floats: list[str] = field(default_factory=list)
    bools: list[str] = field(default_factory=list)
    sizes: list[str] = field(default_factory=lambda: list(A.SIZE_NAMES))
    tensors: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # name -> (elem, dims)
    score: bool = False
    loop_vars: list[str] = field(default_factory=list)

    def tensors_of(self, elem: str) -> list[str]:
        return [n for n, (e, _) in self.tensors.items() if e == elem]


def _num(v):
    return A.Num(v) if v >= 0 else A.Unary("-", A.Num(-v))


def int_literal(lo=-8, hi=8):
    return st.integers(lo, hi).map(_num)


def nonzero_divisor():
    return st.sampled_from([1, 2, 3, 4, 5, 7, 16, -1, -2, -3, -5]).map(_num)


@st.composite
def int_leaf(draw, ctx: Ctx):
    choice = draw(st.integers(0, 5))
    if choice <= 2 and ctx.ints + ctx.loop_vars:
        return A.Name(draw(st.sampled_from(ctx.ints + ctx.loop_vars)))
    if choice == 3 and ctx.sizes:
        return A.Name(draw(st.sampled_from(ctx.sizes)))
    return draw(int_literal())


@st.composite
def int_expr(draw, ctx: Ctx, depth: int = 2):
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return draw(int_leaf(ctx))
    kind = draw(st.sampled_from(["add", "sub", "mul_const", "floordiv", "mod", "abs", "minmax", "clamp",
                                 "ifexp", "load", "neg", "square", "floor", "sum", "bits", "shift",
                                 "invert"]))
    sub = lambda: draw(int_expr(ctx, depth - 1))  # noqa: E731
    if kind == "bits":
        return A.Binary(draw(st.sampled_from(["&", "|", "^"])), sub(), sub())
    if kind == "shift":  # small static counts: values stay far below 2**31
        return A.Binary(draw(st.sampled_from(["<<", ">>"])), sub(), draw(int_literal(0, 3)))
    if kind == "invert":
        return A.Unary("~", sub())
    if kind in ("add", "sub"):
        return A.Binary("+" if kind == "add" else "-", sub(), sub())
    if kind == "mul_const":
        return A.Binary("*", sub(), draw(int_literal(-3, 3)))
    if kind == "floordiv":
        return A.Binary("//", sub(), draw(nonzero_divisor()))
    if kind == "mod":
        return A.Binary("%", sub(), draw(nonzero_divisor()))
    if kind == "abs":
        return A.Call("abs", (sub(),))
    if kind == "minmax":
        return A.Call(draw(st.sampled_from(["min", "max"])), (sub(), sub()))
    if kind == "clamp":
        lo = draw(st.integers(-8, 8))
        return A.Call("clamp", (sub(), _num(lo), _num(lo + draw(st.integers(0, 16)))))
    if kind == "ifexp":
        return A.IfExp(sub(), draw(bool_expr(ctx, depth - 1)), sub())
    if kind == "neg":
        return A.Unary("-", sub())
    if kind == "square":  # int ** literal on a leaf only: values stay below 2**31
        return A.Binary("**", draw(int_leaf(ctx)), A.Num(2))
    if kind == "floor":  # float -> int through an exact product (dyadic factor)
        f = draw(st.sampled_from(["floor", "ceil"]))
        return A.Call(f, (A.Binary("*", sub(), A.Num(draw(st.sampled_from([0.5, 0.25, 1.5])))),))
    if kind == "sum":
        return draw(sum_of(ctx, depth, int_expr))
    ints = ctx.tensors_of("int")
    if ints:
        return draw(tensor_load(ctx, draw(st.sampled_from(ints)), depth - 1))
    return sub()


@st.composite
def sum_of(draw, ctx: Ctx, depth: int, body_strategy, kind: str = "sum"):
    """`sum(body for iN in range(n))` (or `any` / `all` of a bool body); the body sees the loop
    variable (and reads tensors with it when the pattern has some)."""
    if len(ctx.loop_vars) >= 2:
        return draw(body_strategy(ctx, depth - 1))
    var = f"i{len(ctx.loop_vars)}"
    inner = replace(ctx, loop_vars=ctx.loop_vars + [var])
    body = draw(body_strategy(inner, depth - 1))
    int_params = [n for n in ctx.ints if n.startswith("p")]
    if int_params and draw(st.booleans()):  # static: int parameters are known before the kernel runs
        count = A.Call("min", (A.Name(draw(st.sampled_from(int_params))), A.Num(3)))
    else:
        count = A.Num(draw(st.integers(0, 3)))
    return A.SumGen(body, var, count, kind=kind)


@st.composite
def tensor_load(draw, ctx: Ctx, name: str, depth: int):
    _, dims = ctx.tensors[name]
    idx = []
    for d in dims:
        e = draw(int_expr(ctx, max(depth, 0)))
        if d.isdigit():
            e = A.Binary("%", e, A.Num(int(d)))
        else:
            e = A.Call("clamp", (e, A.Num(0), A.Binary("-", A.Name(d), A.Num(1))))
        idx.append(e)
    return A.Index(name, tuple(idx))


@st.composite
def float_expr(draw, ctx: Ctx, depth: int = 2):
    """Bounded float expressions (|value| stays moderate for in-range inputs)."""
    leaves = ctx.floats + (["score"] if ctx.score else [])
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        if leaves and draw(st.booleans()):
            return A.Name(draw(st.sampled_from(leaves)))
        return A.Num(draw(st.sampled_from(DYADIC)))
    kind = draw(st.sampled_from(["add", "sub", "mul", "div", "func", "from_int", "ifexp", "minmax", "load",
                                 "square", "sum"]))
    sub = lambda: draw(float_expr(ctx, depth - 1))  # noqa: E731
    if kind in ("add", "sub", "mul"):
        return A.Binary({"add": "+", "sub": "-", "mul": "*"}[kind], sub(), sub())
    if kind == "div":
        return A.Binary("/", sub(), A.Binary("+", A.Num(1.0), A.Call("abs", (sub(),))))
    if kind == "func":
        f = draw(st.sampled_from(FLOAT_FUNCS))
        arg = sub()
        if T.FUNCTIONS[f].safe_args == "positive":
            arg = A.Binary("+", A.Num(1.0), A.Call("abs", (arg,)))
        elif T.FUNCTIONS[f].safe_args == "nonpositive":
            arg = A.Unary("-", A.Call("abs", (arg,)))
        elif T.FUNCTIONS[f].safe_args == "bounded":
            arg = A.Call("tanh", (arg,))
        return A.Call(f, (arg,))
    if kind == "from_int":  # small ints scaled down, e.g. -abs(q - k) * 0.25
        return A.Binary("*", draw(int_expr(ctx, depth - 1)), _num(draw(st.sampled_from([0.25, 0.125, -0.5]))))
    if kind == "ifexp":
        return A.IfExp(sub(), draw(bool_expr(ctx, depth - 1)), sub())
    if kind == "minmax":
        return A.Call(draw(st.sampled_from(["min", "max"])), (sub(), sub()))
    if kind == "square":  # a bounded base: tanh or sigmoid of anything, or a scaled-down int
        base = draw(st.sampled_from(["tanh", "sigmoid"]))
        return A.Binary("**", A.Call(base, (sub(),)), A.Num(draw(st.sampled_from([2, 3]))))
    if kind == "sum":
        return draw(sum_of(ctx, depth, float_expr))
    floats = ctx.tensors_of("float")
    if floats:
        return draw(tensor_load(ctx, draw(st.sampled_from(floats)), depth - 1))
    return sub()


@st.composite
def exact_float_expr(draw, ctx: Ctx, depth: int = 1):
    """Float expressions whose value is (nearly) exact in fp32: ints, float parameters and float
    tensor reads combined by `+`, `-` and dyadic factors. Safe to compare with a dyadic constant."""
    if depth <= 0 or draw(st.booleans()):
        choice = draw(st.integers(0, 2))
        params = [f for f in ctx.floats if f.startswith("p")]  # lets may be inexact
        if choice == 0 and params:
            return A.Name(draw(st.sampled_from(params)))
        if choice == 1 and ctx.tensors_of("float"):
            return draw(tensor_load(ctx, draw(st.sampled_from(ctx.tensors_of("float"))), 0))
        return A.Binary("*", draw(int_expr(ctx, 1)), A.Num(draw(st.sampled_from([0.5, 0.25]))))
    op = draw(st.sampled_from(["+", "-"]))
    return A.Binary(op, draw(exact_float_expr(ctx, depth - 1)), draw(exact_float_expr(ctx, depth - 1)))


@st.composite
def bool_expr(draw, ctx: Ctx, depth: int = 2):
    if depth <= 0 or draw(st.integers(0, 4)) == 0:
        choice = draw(st.integers(0, 3))
        if choice == 0 and ctx.bools:
            return A.Name(draw(st.sampled_from(ctx.bools)))
        if choice == 1:
            return A.Bool(draw(st.booleans()))
        return A.Compare((draw(st.sampled_from(COMPARE_OPS)),),
                         (draw(int_expr(ctx, 1)), draw(int_expr(ctx, 1))))
    kind = draw(st.sampled_from(["cmp", "cmp", "chain", "and", "or", "not", "load", "fcmp", "any", "all"]))
    if kind in ("any", "all"):
        return draw(sum_of(ctx, depth, bool_expr, kind))
    if kind == "cmp":
        op = draw(st.sampled_from(COMPARE_OPS))
        return A.Compare((op,), (draw(int_expr(ctx, depth - 1)), draw(int_expr(ctx, depth - 1))))
    if kind == "chain":
        return A.Compare(("<=", "<"), (draw(int_literal(-4, 0)), draw(int_expr(ctx, depth - 1)),
                                       draw(int_expr(ctx, depth - 1))))
    if kind in ("and", "or"):
        return A.Binary(kind, draw(bool_expr(ctx, depth - 1)), draw(bool_expr(ctx, depth - 1)))
    if kind == "not":
        return A.Unary("not", draw(bool_expr(ctx, depth - 1)))
    if kind == "fcmp":
        op = draw(st.sampled_from(["<", "<=", ">", ">="]))
        return A.Compare((op,), (draw(exact_float_expr(ctx, 1)), _num(draw(st.sampled_from((0.5, 1.0, -2.0, 4.0))))))
    bools = ctx.tensors_of("bool")
    if bools:
        return draw(tensor_load(ctx, draw(st.sampled_from(bools)), depth - 1))
    return draw(bool_expr(ctx, 0))


@st.composite
def requirement(draw, ctx: Ctx):
    """`require` over int parameters and sizes (never positions, the score or tensors), e.g.
    `require q_len >= -7 and p0 % -3 >= -5`: it holds for every size and every parameter value
    the fuzzer draws (ints >= -4), so it refuses no case; the round trip and the lowering of
    `require` through `use` are what it exercises."""
    static = [n for n in ctx.ints if n.startswith("p")] + list(A.SIZE_NAMES)
    def term():
        left = A.Name(draw(st.sampled_from(static)))
        if draw(st.booleans()):
            left = A.Binary("%", left, draw(nonzero_divisor()))  # > -5: the divisors are >= -5
        return A.Compare((">=",), (left, draw(int_literal(-12, -5))))
    cond = term()
    if draw(st.integers(0, 2)) == 2:
        cond = A.Binary(draw(st.sampled_from(["and", "or"])), cond, term())
    return A.Require(cond)


def _param_default(typ: str):
    return {"int": int_literal(0, 16), "float": st.sampled_from([0.5, 1.0, 2.0]).map(A.Num),
            "bool": st.booleans().map(A.Bool)}[typ]


@st.composite
def patterns(draw, name: str = "fuzzed", allow_topk: bool = True, allow_sigmoid: bool = True,
             allow_tensors: bool = True, depth: int = 2, let_prefix: str = "l", allow_scores: bool = True):
    """A random well-typed `Pattern` AST.

    Parameters p0.. (int / float / bool, always with a default), tensors t0.. (int ids, bool
    flags, float tables over sizes or static extents), lets l0.., score statements (unless not
    `allow_scores`: a pattern that may be called in a mask), masks, and sometimes `select
    topk(n)` and `normalize sigmoid(bias = ...)`."""
    ctx = Ctx()
    params, body = [], []
    for i in range(draw(st.integers(0, 3))):
        typ = draw(st.sampled_from(["int", "float", "bool"]))
        pname = f"p{i}"
        params.append(A.Param(pname, typ, draw(_param_default(typ))))
        {"int": ctx.ints, "float": ctx.floats, "bool": ctx.bools}[typ].append(pname)
    if allow_tensors:
        for i in range(draw(st.integers(0, 3))):
            elem = draw(st.sampled_from(["int", "float", "bool"]))
            tname = f"t{i}"
            dims = draw(st.sampled_from(TENSOR_DIMS))
            dim_exprs = tuple(A.Num(int(d)) if d.isdigit() else A.Name(d) for d in dims)
            body.append(A.TensorDecl(tname, elem, dim_exprs))
            ctx.tensors[tname] = (elem, dims)
    for i in range(draw(st.integers(0, 3))):
        typ = draw(st.sampled_from(["int", "float", "bool"]))
        gen = {"int": int_expr, "float": float_expr, "bool": bool_expr}[typ]
        body.append(A.Let(f"{let_prefix}{i}", draw(gen(ctx, depth))))
        {"int": ctx.ints, "float": ctx.floats, "bool": ctx.bools}[typ].append(f"{let_prefix}{i}")
    ctx.score = True
    for _ in range(draw(st.integers(0, 3)) if allow_scores else 0):
        op = draw(st.sampled_from(["=", "+=", "-=", "*=", "/="]))
        value = draw(float_expr(ctx, depth))
        if op == "=" and draw(st.booleans()):
            value = A.Binary("+", A.Name("score"), value)
        if draw(st.integers(0, 4)) == 4:
            value = A.SumGen(A.Binary("*", value, A.Binary("*", A.Name("j"), A.Num(0.5))), "j",
                             A.Num(draw(st.integers(1, 3))))
        if op == "/=":  # last: a sum's j = 0 term is 0, so a sum may be 0 too
            value = A.Binary("+", A.Num(1.0), A.Call("abs", (value,)))
        body.append(A.ScoreStmt(op, value))
    ctx.score = False
    for _ in range(draw(st.integers(0, 3))):
        body.append(A.Mask(draw(bool_expr(ctx, depth))))
    if allow_topk and draw(st.integers(0, 5)) == 5:
        n = draw(st.one_of(st.integers(1, 8), st.integers(9, 40)))
        body.append(A.Select("topk", (A.Arg(None, A.Num(n)),)))
    if allow_sigmoid and draw(st.integers(0, 5)) == 5:
        bias = draw(st.one_of(
            st.sampled_from([None, A.Unary("-", A.Call("log", (A.Name("k_len"),))), A.Num(0.5)]),
            float_expr(ctx, 1).map(lambda e: A.Binary("-", e, A.Num(2.0)))))
        body.append(A.Normalize("sigmoid", (A.Arg("bias", bias),) if bias is not None else ()))
    if draw(st.integers(0, 4)) == 4:  # drawn last, so that it disturbs shrinking the least
        body.append(draw(requirement(ctx)))
    if not body:
        body.append(A.Mask(A.Compare((">=",), (A.Name("q"), A.Name("k")))))
    return A.Pattern(name, tuple(params), tuple(body))


@st.composite
def modules(draw, defs: bool = True, **kwargs):
    n = draw(st.integers(1, 2))
    pats = tuple(draw(patterns(name=f"fuzzed{i}", **kwargs)) for i in range(n))
    module = A.Module((), pats)
    return extract_defs(module, _rng_of(module)) if defs else module


# ----------------------------------------------------------------------------- defs

def _children(e: A.Expr) -> list[A.Expr]:
    if isinstance(e, A.Binary) and e.op == "**":
        return [e.left]  # the exponent stays a literal: `x ** 2` is int, `x ** f()` float
    out = []
    for f in fields(e):
        v = getattr(e, f.name)
        if isinstance(v, A.Expr):
            out.append(v)
        elif isinstance(v, tuple):
            out.extend(x for x in v if isinstance(x, A.Expr))
    return out


def _compound(e: A.Expr, loops: frozenset = frozenset()) -> list[tuple[A.Expr, frozenset]]:
    """The subexpressions of `e` that are not leaves, in pre-order, each with the loop
    variables of the sums around it."""
    out = [] if isinstance(e, (A.Num, A.Bool, A.Name)) else [(e, loops)]
    for c in _children(e):
        inside = isinstance(e, A.SumGen) and c is e.body
        out += _compound(c, loops | {e.var} if inside else loops)
    return out


def _substitute(e: A.Expr, rule) -> A.Expr:
    """`e` rebuilt with each node `x` for which `rule(x)` is not None replaced by that."""
    new = rule(e)
    if new is not None:
        return new
    changes = {}
    for f in fields(e):
        v = getattr(e, f.name)
        if isinstance(v, A.Expr):
            changes[f.name] = _substitute(v, rule)
        elif isinstance(v, tuple) and any(isinstance(x, A.Expr) for x in v):
            changes[f.name] = tuple(_substitute(x, rule) for x in v)
    return replace(e, **changes) if changes else e


def _free(e: A.Expr, bound: frozenset = frozenset()) -> list[str]:
    """Names `e` reads that it does not bind (sum loop variables), first occurrence first."""
    if isinstance(e, A.Name):
        return [] if e.id in bound else [e.id]
    if isinstance(e, A.SumGen):
        found = _free(e.count, bound) + _free(e.body, bound | {e.var})
    else:
        found = [n for c in _children(e) for n in _free(c, bound)]
    return list(dict.fromkeys(found))


def _calls_other(e: A.Expr, defs: set[str]) -> bool:
    """Whether `e` calls something that is neither a built-in function nor one of `defs` (a
    pattern called in a mask: it cannot move into a def's body)."""
    if isinstance(e, A.Call) and e.func not in T.FUNCTIONS and e.func not in defs:
        return True
    return any(_calls_other(c, defs) for c in _children(e))


def _reads_pattern(e: A.Expr, local_defs: set[str]) -> bool:
    """Whether `e` reads a tensor or calls a def of its pattern."""
    if isinstance(e, A.Index) or (isinstance(e, A.Call) and e.func in local_defs):
        return True
    return any(_reads_pattern(c, local_defs) for c in _children(e))


_STMT_EXPR = {A.Let: "value", A.Mask: "cond", A.ScoreStmt: "value"}


def _rng_of(module: A.Module) -> random.Random:
    """A generator seeded by the module's text: the same module, the same extraction."""
    return random.Random(zlib.crc32(print_module(module).encode()))


@st.composite
def extracted_defs(draw, module: A.Module, most: int = 2, chance: float = 1.0):
    """`extract_defs` with its choices drawn."""
    return extract_defs(module, random.Random(draw(st.integers(0, 2 ** 32 - 1))), most, chance)


def extract_defs(module: A.Module, rng: random.Random, most: int = 2, chance: float = 0.25) -> A.Module:
    """`module` with up to `most` subexpressions of its last pattern (each with probability
    `chance`) turned into calls of new defs `d0`, `d1`, ... (see the module docstring): what it
    computes is unchanged."""
    defs = list(module.defs)
    pattern = module.patterns[-1]
    body = list(pattern.body)
    for _ in range(most):
        if rng.random() >= chance:
            break
        known = {d.name for d in defs} | {s.name for s in body if isinstance(s, A.Def)}
        spots = [(j, e, loops) for j, stmt in enumerate(body) if type(stmt) in _STMT_EXPR
                 for e, loops in _compound(getattr(stmt, _STMT_EXPR[type(stmt)]))
                 if not _calls_other(e, known)]
        if not spots:
            break
        j, e, loops = spots[rng.randrange(len(spots))]
        local_defs = {s.name for s in body if isinstance(s, A.Def)}
        free = _free(e)
        # positions, the score and loop variables are not visible in a def's body: pass them
        passed = [n for n in free if n in A.INDEX_NAMES or n == "score" or n in loops]
        declared = rng.random() < 0.5
        params = tuple(A.DefParam("s" if n == "score" else n,
                                  ("float" if n == "score" else "int") if declared else None)
                       for n in passed)
        name = f"d{len(defs) + len(local_defs)}"
        d = A.Def(name, params, _substitute(e, lambda x: A.Name("s") if x == A.Name("score") else None))
        call = A.Call(name, tuple(A.Name(n) for n in passed))
        stmt = body[j]
        where = _STMT_EXPR[type(stmt)]
        body[j] = replace(stmt, **{where: _substitute(getattr(stmt, where),
                                                      lambda x, e=e, call=call: call if x is e else None)})
        if set(free) <= set(passed) | set(A.SIZE_NAMES) and not _reads_pattern(e, local_defs):
            defs.append(d)  # it reads only its parameters and the sizes: a file-level def
        else:
            body.insert(j, d)
    patterns = module.patterns[:-1] + (replace(pattern, body=tuple(body)),)
    return replace(module, patterns=patterns, defs=tuple(defs))


#: stdlib patterns a generated module may `use`, with the int arguments it passes
STD_USES = (("causal", ()), ("sliding_window", ("window",)), ("chunked", ("chunk",)), ("prefix_lm", ("prefix",)),
            ("softcap", ()))
#: those of them that have only masks, so that they may also be called in a mask
STD_MASKS = ("causal", "sliding_window", "chunked", "prefix_lm")


@st.composite
def _include(draw, name: str, args: tuple[A.Arg, ...], callable_: bool):
    """`use NAME(args)`, or (at the maximum of a draw, when `callable_`) a mask that calls it:
    `NAME(args)`, `not NAME(args)`, or it `or` / `and` a condition on positions and sizes."""
    if not callable_ or draw(st.integers(0, 2)) < 2:
        return A.Use(name, args)
    call = A.Call(name, tuple(a.value for a in args if a.name is None), tuple(a for a in args if a.name))
    form = draw(st.integers(0, 2))
    if form == 0:
        return A.Mask(call)
    if form == 1:
        return A.Mask(A.Unary("not", call))
    op = draw(st.sampled_from(["or", "and"]))
    return A.Mask(A.Binary(op, call, draw(bool_expr(Ctx(), 1))))


@st.composite
def fuzz_modules(draw, name: str = "fuzzed", depth: int = 2):
    """A module whose pattern `name` is random and may `use` a helper pattern of the same file
    (passing some of its parameters) and an imported stdlib pattern, or call them in a mask."""
    imports, helpers, uses = [], [], []
    if draw(st.integers(0, 3)) == 3:
        mask_only = draw(st.integers(0, 2)) == 2  # then it may be called in a mask
        helper = draw(patterns(name="helper", allow_topk=False, allow_sigmoid=False, allow_tensors=False,
                               depth=1, let_prefix="hl", allow_scores=not mask_only))
        helpers.append(helper)
        uses.append(draw(_include("helper", tuple(A.Arg(p.name, draw(_param_default(p.type)))
                                                  for p in helper.params if draw(st.booleans())), mask_only)))
    if draw(st.integers(0, 3)) == 3:
        std, args = draw(st.sampled_from(STD_USES))
        imports.append(A.Import(f"std.{std}", None, False))
        uses.append(draw(_include(std, tuple(A.Arg(a, A.Num(draw(st.integers(1, 64)))) for a in args),
                                  std in STD_MASKS)))
    main = draw(patterns(name=name, depth=depth))
    order = draw(st.permutations(uses)) if uses else []
    module = A.Module(tuple(imports), tuple(helpers) + (replace(main, body=tuple(order) + main.body),))
    return extract_defs(module, _rng_of(module))
