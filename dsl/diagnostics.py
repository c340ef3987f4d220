"""The one user-facing error type, `SpecError`, and how it renders.

A `SpecError` holds one or more `Diagnostic`s. Each renders as::

    file.attn:3:15: error: unknown name `kk`
        mask q >= kk
                  ^~
    hint: did you mean `k`?
"""
from __future__ import annotations

from dataclasses import dataclass

from .source import Span


@dataclass(frozen=True)
class Diagnostic:
    span: Span | None
    message: str
    hint: str | None = None

    def render(self) -> str:
        if self.span is None:
            out = [f"error: {self.message}"]
        else:
            s = self.span
            out = [f"{s}: error: {self.message}"]
            text = s.source.line(s.line)
            if text:
                width = (s.end_col - s.col) if s.end_line == s.line else len(text) - s.col + 1
                width = max(1, width)
                out.append("    " + text)
                out.append("    " + " " * (s.col - 1) + "^" + "~" * (width - 1))
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


class SpecError(Exception):
    """An error in a pattern spec (or in its use), pointing at the `.attn` text with a caret."""

    def __init__(self, diagnostics, message: str | None = None, hint: str | None = None):
        if isinstance(diagnostics, Span) or diagnostics is None:
            diagnostics = [Diagnostic(diagnostics, message or "", hint)]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__(self.render())

    @property
    def span(self) -> Span | None:
        return self.diagnostics[0].span

    @property
    def message(self) -> str:
        return self.diagnostics[0].message

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)

    def __str__(self) -> str:
        return self.render()


def closest(name: str, candidates) -> str | None:
    """The candidate nearest to `name` by edit distance, if it is near enough to suggest."""
    best, best_d = None, None
    for c in sorted(set(candidates)):
        d = _edit_distance(name, c)
        if best_d is None or d < best_d:
            best, best_d = c, d
    if best is None:
        return None
    limit = max(1, len(name) // 3)
    return best if best_d <= limit and best != name else None


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
