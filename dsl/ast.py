"""The surface AST: one frozen dataclass per construct of the grammar.

Children are tuples; every node has a `span` that takes no part in equality or hashing, so
`parse(print(ast)) == ast` compares structure only.
"""
from __future__ import annotations

from dataclasses import dataclass

from .source import Span, span_field


# ----------------------------------------------------------------------------- expressions

class Expr:
    span: Span | None


@dataclass(frozen=True)
class Num(Expr):
    """An integer or float literal."""
    value: int | float
    span: Span | None = span_field()


@dataclass(frozen=True)
class Bool(Expr):
    value: bool
    span: Span | None = span_field()


@dataclass(frozen=True)
class Name(Expr):
    """A reference to an index (`q k b h`), size, parameter, `let`, loop variable or `score`."""
    id: str
    span: Span | None = span_field()


@dataclass(frozen=True)
class Call(Expr):
    """`f(args)`: a built-in function, or in a mask a pattern (`P(args)`, `m.P(args)` for an
    imported one) standing for the conjunction of its masks. `keywords` are the `name = value`
    arguments, which follow the positional `args`."""
    func: str  # possibly qualified: `m.pattern`
    args: tuple[Expr, ...]
    keywords: tuple[Arg, ...] = ()
    span: Span | None = span_field()


@dataclass(frozen=True)
class Index(Expr):
    """`tensor[i, j, ...]`."""
    tensor: str
    indices: tuple[Expr, ...]
    span: Span | None = span_field()


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # '-', '+', 'not', '~'
    operand: Expr
    span: Span | None = span_field()


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # + - * / // % ** and or & | ^ << >>
    left: Expr
    right: Expr
    span: Span | None = span_field()


@dataclass(frozen=True)
class Compare(Expr):
    """A comparison chain `a < b <= c` (meaning `a < b and b <= c`)."""
    ops: tuple[str, ...]
    operands: tuple[Expr, ...]
    span: Span | None = span_field()


@dataclass(frozen=True)
class IfExp(Expr):
    """`body if cond else orelse`."""
    body: Expr
    cond: Expr
    orelse: Expr
    span: Span | None = span_field()


@dataclass(frozen=True)
class SumGen(Expr):
    """`kind(body for var in range(count))`, `kind` one of `sum`, `any`, `all` (REDUCERS);
    `count` must be a static integer."""
    body: Expr
    var: str
    count: Expr
    span: Span | None = span_field()
    kind: str = "sum"


#: the reductions over `range(n)`, and the IR op of each
REDUCERS = ("sum", "any", "all")


# ----------------------------------------------------------------------------- statements

@dataclass(frozen=True)
class Arg:
    """A call argument in `use`, `select` or `normalize`: positional when `name` is None."""
    name: str | None
    value: Expr
    span: Span | None = span_field()


@dataclass(frozen=True)
class TensorDecl:
    """`tensor name: elem[dim, ...]` with elem in int, float, bool."""
    name: str
    elem: str
    dims: tuple[Expr, ...]
    span: Span | None = span_field()


@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    span: Span | None = span_field()


@dataclass(frozen=True)
class Mask:
    cond: Expr
    span: Span | None = span_field()


@dataclass(frozen=True)
class ScoreStmt:
    """`score = e`, or an augmented form; `op` is one of '=', '+=', '-=', '*=', '/='."""
    op: str
    value: Expr
    span: Span | None = span_field()


@dataclass(frozen=True)
class Select:
    """`select topk(n)`."""
    kind: str
    args: tuple[Arg, ...]
    span: Span | None = span_field()


@dataclass(frozen=True)
class Normalize:
    """`normalize softmax` or `normalize sigmoid(bias = e)`."""
    kind: str
    args: tuple[Arg, ...]
    span: Span | None = span_field()


@dataclass(frozen=True)
class Use:
    """`use other(args)`: include another pattern's statements with its parameters bound."""
    target: str  # possibly qualified: `m.pattern`
    args: tuple[Arg, ...]
    span: Span | None = span_field()


@dataclass(frozen=True)
class Require:
    """`require cond`: a condition on parameters and sizes, checked when a call binds its
    arguments (before any kernel runs)."""
    cond: Expr
    span: Span | None = span_field()


@dataclass(frozen=True)
class DefParam:
    """A parameter of a `def`: `name`, or `name: int|float|bool`; an undeclared type (None) is
    the type of the argument at each call."""
    name: str
    type: str | None
    span: Span | None = span_field()


@dataclass(frozen=True)
class Def:
    """`def name(a, b: int) = body`: a function, inlined at each call. At file level it sees its
    parameters and the sizes; inside a pattern also the parameters, tensors and lets before it."""
    name: str
    params: tuple[DefParam, ...]
    body: Expr
    span: Span | None = span_field()


Stmt = TensorDecl | Let | Mask | ScoreStmt | Select | Normalize | Use | Require | Def


# ----------------------------------------------------------------------------- top level

@dataclass(frozen=True)
class Param:
    """A pattern parameter `name: int|float|bool [= default]`."""
    name: str
    type: str
    default: Expr | None
    span: Span | None = span_field()


@dataclass(frozen=True)
class Pattern:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span | None = span_field()


@dataclass(frozen=True)
class Import:
    """`import std.NAME [as m]` (`path` is dotted, `is_file` False) or `import "f.attn" [as m]`."""
    path: str
    alias: str | None
    is_file: bool
    span: Span | None = span_field()


@dataclass(frozen=True)
class Module:
    imports: tuple[Import, ...]
    patterns: tuple[Pattern, ...]
    defs: tuple[Def, ...] = ()  # the file-level `def`s
    span: Span | None = span_field()


# ----------------------------------------------------------------------------- vocabulary

INDEX_NAMES = ("b", "h", "q", "k")
SIZE_NAMES = ("batch", "heads", "kv_heads", "q_len", "k_len", "head_dim")
SCALAR_TYPES = ("int", "float", "bool")
ELEM_TYPES = ("int", "float", "bool")
KEYWORDS = ("pattern", "import", "as", "tensor", "let", "mask", "score", "select", "normalize",
            "use", "require", "def", "if", "else", "and", "or", "not", "true", "false", "sum", "any", "all", "for", "in", "range")
