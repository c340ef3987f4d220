"""Hypothesis strategies for well-typed `.attn` patterns, built as ASTs.

Used by the test suite (printer round trip, analysis soundness, differential fuzzing) and by
`attnc fuzz`. Requires `hypothesis` (a test dependency). Generated patterns are designed to be
*meaningful* as well as well-typed: tensor indices stay in range (`% n` or `clamp`), integer
divisors are non-zero literals (possibly negative, to exercise floor semantics), `log`/`sqrt` see
positive arguments, and float terms stay bounded so that kernels and the reference can be
compared with tolerances.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from . import ast as A

INT_SIZES = ("q_len", "k_len", "heads", "kv_heads", "batch", "head_dim")
FLOAT_FUNCS = ("exp", "tanh", "sigmoid", "softplus", "log", "sqrt", "exp2", "log2")


@dataclass
class Ctx:
    """Names in scope while generating a pattern, by type."""

    ints: list[str] = field(default_factory=lambda: ["q", "k", "b", "h"])
    floats: list[str] = field(default_factory=list)
    bools: list[str] = field(default_factory=list)
    tensors: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # name -> (elem, dim names)
    dim_sizes: dict[str, int] = field(default_factory=dict)  # static extents of named dims
    score: bool = False
    loop_vars: list[str] = field(default_factory=list)


def _num(v):
    return A.Num(v) if v >= 0 else A.Unary("-", A.Num(-v))


def int_literal(lo=-8, hi=8):
    return st.integers(lo, hi).map(_num)


def nonzero_divisor():
    return st.sampled_from([1, 2, 3, 4, 5, 7, 16, -1, -2, -3, -5]).map(_num)


@st.composite
def int_expr(draw, ctx: Ctx, depth: int = 2):
    leaves = ctx.ints + ctx.loop_vars
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        if draw(st.booleans()) and leaves:
            return A.Name(draw(st.sampled_from(leaves)))
        return draw(int_literal())
    kind = draw(st.sampled_from(["add", "sub", "mul_const", "floordiv", "mod", "abs", "minmax", "clamp",
                                 "ifexp", "load", "neg"]))
    sub = lambda: draw(int_expr(ctx, depth - 1))  # noqa: E731
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
    ints = [n for n, (elem, _) in ctx.tensors.items() if elem == "int"]
    if ints:
        return draw(tensor_load(ctx, draw(st.sampled_from(ints)), depth - 1))
    return sub()


@st.composite
def tensor_load(draw, ctx: Ctx, name: str, depth: int):
    _, dims = ctx.tensors[name]
    idx = []
    for d in dims:
        extent = ctx.dim_sizes.get(d)
        e = draw(int_expr(ctx, max(depth, 0)))
        if extent is not None:
            e = A.Binary("%", e, _num(extent))
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
        return A.Num(draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 0.25, 3.0])))
    kind = draw(st.sampled_from(["add", "sub", "mul", "div", "func", "from_int", "ifexp", "minmax", "load"]))
    sub = lambda: draw(float_expr(ctx, depth - 1))  # noqa: E731
    if kind in ("add", "sub", "mul"):
        return A.Binary({"add": "+", "sub": "-", "mul": "*"}[kind], sub(), sub())
    if kind == "div":
        return A.Binary("/", sub(), A.Binary("+", A.Num(1.0), A.Call("abs", (sub(),))))
    if kind == "func":
        f = draw(st.sampled_from(FLOAT_FUNCS))
        arg = sub()
        if f in ("log", "sqrt", "log2"):
            arg = A.Binary("+", A.Num(1.0), A.Call("abs", (arg,)))
        elif f in ("exp", "exp2"):
            arg = A.Unary("-", A.Call("abs", (arg,)))
        return A.Call(f, (arg,))
    if kind == "from_int":  # small ints scaled down, e.g. -abs(q - k) * 0.25
        return A.Binary("*", draw(int_expr(ctx, depth - 1)), _num(draw(st.sampled_from([0.25, 0.125, -0.5]))))
    if kind == "ifexp":
        return A.IfExp(sub(), draw(bool_expr(ctx, depth - 1)), sub())
    if kind == "minmax":
        return A.Call(draw(st.sampled_from(["min", "max"])), (sub(), sub()))
    floats = [n for n, (elem, _) in ctx.tensors.items() if elem == "float"]
    if floats:
        return draw(tensor_load(ctx, draw(st.sampled_from(floats)), depth - 1))
    return sub()


@st.composite
def bool_expr(draw, ctx: Ctx, depth: int = 2):
    if depth <= 0 or draw(st.integers(0, 4)) == 0:
        choice = draw(st.integers(0, 3))
        if choice == 0 and ctx.bools:
            return A.Name(draw(st.sampled_from(ctx.bools)))
        if choice == 1:
            return A.Bool(draw(st.booleans()))
        return A.Compare((draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="])),),
                         (draw(int_expr(ctx, 1)), draw(int_expr(ctx, 1))))
    kind = draw(st.sampled_from(["cmp", "cmp", "chain", "and", "or", "not", "load"]))
    if kind == "cmp":
        op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        return A.Compare((op,), (draw(int_expr(ctx, depth - 1)), draw(int_expr(ctx, depth - 1))))
    if kind == "chain":
        return A.Compare(("<=", "<"), (draw(int_literal(-4, 0)), draw(int_expr(ctx, depth - 1)),
                                       draw(int_expr(ctx, depth - 1))))
    if kind in ("and", "or"):
        return A.Binary(kind, draw(bool_expr(ctx, depth - 1)), draw(bool_expr(ctx, depth - 1)))
    if kind == "not":
        return A.Unary("not", draw(bool_expr(ctx, depth - 1)))
    bools = [n for n, (elem, _) in ctx.tensors.items() if elem == "bool"]
    if bools:
        return draw(tensor_load(ctx, draw(st.sampled_from(bools)), depth - 1))
    return draw(bool_expr(ctx, 0))


@st.composite
def patterns(draw, name: str = "fuzzed", allow_topk: bool = True, allow_sigmoid: bool = True,
             allow_tensors: bool = True, depth: int = 2):
    """A random well-typed `Pattern` AST."""
    ctx = Ctx()
    params, body = [], []
    for i in range(draw(st.integers(0, 2))):
        typ = draw(st.sampled_from(["int", "float", "bool"]))
        pname = f"p{i}"
        default = {"int": int_literal(0, 16), "float": st.sampled_from([0.5, 1.0, 2.0]).map(A.Num),
                   "bool": st.booleans().map(A.Bool)}[typ]
        params.append(A.Param(pname, typ, draw(default)))
        {"int": ctx.ints, "float": ctx.floats, "bool": ctx.bools}[typ].append(pname)
    if allow_tensors:
        for i in range(draw(st.integers(0, 2))):
            elem = draw(st.sampled_from(["int", "float", "bool"]))
            tname = f"t{i}"
            dims = draw(st.sampled_from([("heads",), ("batch", "k_len"), ("heads", "7"), ("batch", "q_len")]))
            ctx.dim_sizes["7"] = 7
            dim_exprs = tuple(A.Num(7) if d == "7" else A.Name(d) for d in dims)
            body.append(A.TensorDecl(tname, elem, dim_exprs))
            ctx.tensors[tname] = (elem, dims)
    for i in range(draw(st.integers(0, 2))):
        typ = draw(st.sampled_from(["int", "float", "bool"]))
        gen = {"int": int_expr, "float": float_expr, "bool": bool_expr}[typ]
        body.append(A.Let(f"l{i}", draw(gen(ctx, depth))))
        {"int": ctx.ints, "float": ctx.floats, "bool": ctx.bools}[typ].append(f"l{i}")
    ctx.score = True
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["=", "+=", "-=", "*=", "/="]))
        value = draw(float_expr(ctx, depth))
        if op == "/=":
            value = A.Binary("+", A.Num(1.0), A.Call("abs", (value,)))
        if op == "=" and draw(st.booleans()):
            value = A.Binary("+", A.Name("score"), value)
        if draw(st.integers(0, 4)) == 0:
            value = A.SumGen(A.Binary("*", value, A.Binary("*", A.Name("j"), A.Num(0.5))), "j",
                             A.Num(draw(st.integers(1, 3))))
        body.append(A.ScoreStmt(op, value))
    ctx.score = False
    for _ in range(draw(st.integers(0, 3))):
        body.append(A.Mask(draw(bool_expr(ctx, depth))))
    if allow_topk and draw(st.integers(0, 5)) == 0:
        body.append(A.Select("topk", (A.Arg(None, A.Num(draw(st.integers(1, 8)))),)))
    if allow_sigmoid and draw(st.integers(0, 5)) == 0:
        bias = draw(st.sampled_from([None, A.Unary("-", A.Call("log", (A.Name("k_len"),))), A.Num(0.5)]))
        body.append(A.Normalize("sigmoid", (A.Arg("bias", bias),) if bias is not None else ()))
    if not body:
        body.append(A.Mask(A.Compare((">=",), (A.Name("q"), A.Name("k")))))
    return A.Pattern(name, tuple(params), tuple(body))


@st.composite
def modules(draw, **kwargs):
    n = draw(st.integers(1, 2))
    pats = tuple(draw(patterns(name=f"fuzzed{i}", **kwargs)) for i in range(n))
    return A.Module((), pats)
