"""Scalar types and the typing rules shared by the checker and the IR constructors."""
from __future__ import annotations

from dataclasses import dataclass

INT, FLOAT, BOOL = "int", "float", "bool"
ERR = "error"  # poison: an operand already reported; rules return ERR silently
NUMERIC = (INT, FLOAT)

@dataclass(frozen=True)
class Function:
    """A built-in function of the language. It takes `min_args` to `max_args` arguments (None:
    no limit); its `result` is "same" (the promoted type of its numeric arguments), "float" or
    "int". `safe_args` says where its value is finite and moderate: "any" argument, "positive"
    ones, "nonpositive" ones, or "bounded" ones, |x| < 1 (the fuzzer, dsl/strategies.py, draws
    only those).

    A function `f` that is not desugared by `lowering/lower.py` (like min/max/clamp) lowers to
    the IR op `f`, whose meaning is its entry in `lowering/ops.py`."""

    min_args: int
    max_args: int | None
    result: str
    safe_args: str = "any"


FUNCTIONS: dict[str, Function] = {
    "abs": Function(1, 1, "same"),
    "min": Function(2, None, "same"),
    "max": Function(2, None, "same"),
    "clamp": Function(3, 3, "same"),
    "exp": Function(1, 1, "float", "nonpositive"),
    "tanh": Function(1, 1, "float"),
    "sigmoid": Function(1, 1, "float"),
    "softplus": Function(1, 1, "float"),
    "sin": Function(1, 1, "float"),
    "cos": Function(1, 1, "float"),
    "tan": Function(1, 1, "float", "bounded"),
    "erf": Function(1, 1, "float"),
    "log": Function(1, 1, "float", "positive"),
    "sqrt": Function(1, 1, "float", "positive"),
    "exp2": Function(1, 1, "float", "nonpositive"),
    "log2": Function(1, 1, "float", "positive"),
    "floor": Function(1, 1, "int"),
    "ceil": Function(1, 1, "int"),
}


def define_function(name: str, function: Function) -> None:
    """Add a built-in function (a name not defined yet); its IR op is `lowering.ops.register`ed."""
    if name in FUNCTIONS:
        raise ValueError(f"function `{name}` is already defined")
    FUNCTIONS[name] = function


def undefine_function(name: str) -> None:
    del FUNCTIONS[name]


def promote(*types: str) -> str:
    """The numeric type of an arithmetic result: float if any operand is float, else int."""
    if ERR in types:
        return ERR
    return FLOAT if FLOAT in types else INT


#: the integer bit operators (ints only; booleans use `and`, `or`, `not`)
BIT_OPERATORS = ("&", "|", "^", "<<", ">>")


def binary_result(op: str, left: str, right: str, right_is_nonneg_int_literal: bool = False) -> str | None:
    """Result type of `left op right`, ERR if an operand is poisoned, None if the types are wrong."""
    if ERR in (left, right):
        return ERR
    if op in ("and", "or"):
        return BOOL if left == right == BOOL else None
    if op in BIT_OPERATORS:
        return INT if left == right == INT else None
    if left not in NUMERIC or right not in NUMERIC:
        return None
    if op == "/":
        return FLOAT
    if op == "**":
        return INT if left == right == INT and right_is_nonneg_int_literal else FLOAT
    return promote(left, right)


def compare_result(op: str, left: str, right: str) -> str | None:
    if ERR in (left, right):
        return ERR
    if left in NUMERIC and right in NUMERIC:
        return BOOL
    if op in ("==", "!=") and left == right == BOOL:
        return BOOL
    return None


def call_result(func: str, args: list[str]) -> str | None:
    if ERR in args:
        return ERR
    if any(a not in NUMERIC for a in args):
        return None
    rule = FUNCTIONS[func].result
    return promote(*args) if rule == "same" else rule
