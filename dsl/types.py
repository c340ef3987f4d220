"""Scalar types and the typing rules shared by the checker and the IR constructors."""
from __future__ import annotations

INT, FLOAT, BOOL = "int", "float", "bool"
ERR = "error"  # poison: an operand already reported; rules return ERR silently
NUMERIC = (INT, FLOAT)

# name -> (min arity, max arity or None, result rule)
#   "same": the promoted type of the (numeric) arguments; "float": always float; "int": always int
FUNCTIONS: dict[str, tuple[int, int | None, str]] = {
    "abs": (1, 1, "same"),
    "min": (2, None, "same"),
    "max": (2, None, "same"),
    "clamp": (3, 3, "same"),
    "exp": (1, 1, "float"),
    "exp2": (1, 1, "float"),
    "log": (1, 1, "float"),
    "log2": (1, 1, "float"),
    "sqrt": (1, 1, "float"),
    "tanh": (1, 1, "float"),
    "sigmoid": (1, 1, "float"),
    "softplus": (1, 1, "float"),
    "floor": (1, 1, "int"),
    "ceil": (1, 1, "int"),
}


def promote(*types: str) -> str:
    """The numeric type of an arithmetic result: float if any operand is float, else int."""
    if ERR in types:
        return ERR
    return FLOAT if FLOAT in types else INT


def binary_result(op: str, left: str, right: str, right_is_nonneg_int_literal: bool = False) -> str | None:
    """Result type of `left op right`, ERR if an operand is poisoned, None if the types are wrong."""
    if ERR in (left, right):
        return ERR
    if op in ("and", "or"):
        return BOOL if left == right == BOOL else None
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
    rule = FUNCTIONS[func][2]
    return promote(*args) if rule == "same" else rule
