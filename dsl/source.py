"""Source files and spans: every AST and IR node points back at the user's text."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, eq=False)
class SourceFile:
    """A piece of `.attn` text and the name it is reported under (a path or `<string>`)."""

    path: str
    text: str

    def line(self, lineno: int) -> str:
        lines = self.text.splitlines()
        return lines[lineno - 1] if 0 < lineno <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based, `end_col` is exclusive."""

    source: SourceFile = field(compare=False, hash=False, repr=False)
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.source.path}:{self.line}:{self.col}"

    def to(self, other: "Span | None") -> "Span":
        """The span from the start of `self` to the end of `other`."""
        if other is None:
            return self
        return Span(self.source, self.line, self.col, other.end_line, other.end_col)


def span_field():
    """A dataclass field for a span that takes no part in equality or hashing."""
    return field(default=None, compare=False, hash=False, repr=False, kw_only=True)
