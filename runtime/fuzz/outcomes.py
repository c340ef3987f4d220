"""What a fuzz case comes to: a property failure (a bug), a rejection (the pattern's own semantics
refuses the case), a clean refusal by the backend (unsupported), and the counts of a run."""
from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field

from ...dsl.diagnostics import SpecError

#: the properties `check_case` runs, in order (see the package docstring)
PROPERTIES = ("compile", "roundtrip", "robustness", "layout", "kernel", "grad")


class PropertyFailure(AssertionError):
    """A property does not hold: a bug in attnc (or in this fuzzer's assumptions)."""

    def __init__(self, prop: str, message: str):
        super().__init__(f"[{prop}] {message}")
        self.prop, self.message = prop, message


class Rejected(Exception):
    """The pattern's own semantics refuses this case (not a failure)."""


class Unsupported(Rejected):
    """The backend refuses the case cleanly, with a SpecError naming the construct (not a failure)."""


@dataclass
class Stats:
    """The counts of a run, which `attnc fuzz` prints: cases, distinct patterns, failures found,
    passes per property, rejections and refusals by message, fragile top-k rows, seconds per
    property, cases abandoned at the deadline, and whether the deadline was reached."""

    examples: int = 0
    patterns: set = field(default_factory=set)
    passed: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    unsupported: Counter = field(default_factory=Counter)
    fragile_rows: int = 0
    seconds: Counter = field(default_factory=Counter)
    failures: int = 0
    abandoned: int = 0
    out_of_time: bool = False

    def line(self) -> str:
        passed = ", ".join(f"{p} {self.passed[p]}" for p in PROPERTIES if self.passed[p])
        return (f"{self.examples} cases, {len(self.patterns)} patterns, {self.failures} failures; "
                f"passed: {passed or 'none'}; rejected {sum(self.rejected.values())}, "
                f"unsupported {sum(self.unsupported.values())}"
                + (f"; {self.abandoned} abandoned at the deadline" if self.abandoned else ""))


def first_line(e: BaseException) -> str:
    while e.__cause__ is not None:  # Triton's interpreter wraps the real error several times
        e = e.__cause__
    text = f"{type(e).__name__}: {e}".strip()
    if isinstance(e, SpecError):
        text = e.message
    return (text.splitlines() or [type(e).__name__])[0][:160]


def crash(prop: str, what: str, e: BaseException) -> PropertyFailure:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
    return PropertyFailure(prop, f"{what} raised {first_line(e)}\n{tb}")
