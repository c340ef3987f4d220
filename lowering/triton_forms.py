"""How an op prints as Triton (Python) expression text: the forms an op's `triton` entry takes
(lowering/ops.py) and the precedence the expression printer (lowering/emit_expr.py) wraps by.

Each form renders from its arguments' printed `(text, precedence)` pairs; `Special` names a rule
of the printer itself, for the ops whose text needs more than their arguments' text.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Python precedence of printed expressions, higher binds tighter
ATOM, UNARY, MUL, ADD, SHIFT, AND, XOR, OR, CMP = 100, 12, 11, 10, 9, 7, 6, 5, 4


def wrap(arg: tuple[str, int], need: int) -> str:
    """A printed `(text, precedence)` in parentheses unless it binds at least as tight as `need`."""
    text, prec = arg
    return text if prec >= need else f"({text})"


@dataclass(frozen=True)
class Call:
    """`name(a, b, ...)` then `suffix` (e.g. `.to(tl.int32)`)."""

    name: str
    suffix: str = ""

    def render(self, args: list[tuple[str, int]]) -> tuple[str, int]:
        return f"{self.name}({', '.join(text for text, _ in args)}){self.suffix}", ATOM


@dataclass(frozen=True)
class Infix:
    """`a symbol b` at precedence `prec`; comparisons (CMP) never chain."""

    symbol: str
    prec: int

    def render(self, args: list[tuple[str, int]]) -> tuple[str, int]:
        left = self.prec + 1 if self.prec == CMP else self.prec
        return f"{wrap(args[0], left)} {self.symbol} {wrap(args[1], self.prec + 1)}", self.prec


@dataclass(frozen=True)
class Prefix:
    """`symbol a`, e.g. `-a`, `~a`."""

    symbol: str

    def render(self, args: list[tuple[str, int]]) -> tuple[str, int]:
        return f"{self.symbol}{wrap(args[0], UNARY)}", UNARY


@dataclass(frozen=True)
class Postfix:
    """`a suffix`, e.g. `a.to(tl.float32)`."""

    suffix: str

    def render(self, args: list[tuple[str, int]]) -> tuple[str, int]:
        return f"{wrap(args[0], ATOM)}{self.suffix}", ATOM


@dataclass(frozen=True)
class Special:
    """Printed by the expression printer's own rule `name` (lowering/emit_expr.py), which needs
    more than its arguments' text: sign proofs (Python `//`, `%`) or temporaries (`**`)."""

    name: str
