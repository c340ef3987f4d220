"""Shared checks for tests of spec mistakes: a body that fails with a message at line 2, and a
golden file `NAME.attn` whose one error points at a given place and renders as `NAME.txt`."""
from __future__ import annotations

from pathlib import Path

import pytest

import attnc


def assert_body_error(body: str, message: str) -> None:
    """`pattern bad:` followed by `body` fails to compile with `message`, pointing into line 2."""
    with pytest.raises(attnc.SpecError) as e:
        attnc.compile("pattern bad:\n" + body, path="bad.attn")
    text = str(e.value)
    assert message in text and "bad.attn:2:" in text and "^" in text, text


def golden_error(directory: Path, name: str) -> attnc.SpecError:
    """The SpecError of compiling `directory/NAME.attn` (named `NAME.attn` in its message)."""
    text = (directory / f"{name}.attn").read_text(encoding="utf-8")
    with pytest.raises(attnc.SpecError) as info:
        attnc.compile(text, path=f"{name}.attn")
    return info.value


def check_golden_error(directory: Path, name: str, where: tuple[int, int], golden, render=None,
                       says: str | None = None) -> attnc.SpecError:
    """`NAME.attn` has exactly one error, at `where` (line, column) of that file, never an
    internal one, saying `says` in its message or hint; rendered (by `render`, default
    `SpecError.render`) it is `NAME.txt`."""
    err = golden_error(directory, name)
    assert len(err.diagnostics) == 1, err.render()
    d = err.diagnostics[0]
    assert d.span is not None and str(d.span).startswith(f"{name}.attn:"), err.render()
    assert (d.span.line, d.span.col) == where, err.render()
    assert "internal error" not in d.message
    if says is not None:
        assert says in d.message + "\n" + (d.hint or ""), err.render()
    golden.check(directory / f"{name}.txt", (render or attnc.SpecError.render)(err))
    return err
