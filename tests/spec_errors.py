"""A shared check for tests of spec mistakes: the error is a SpecError at line 2 of its file,
with a caret, and says `message`."""
from __future__ import annotations

import pytest

import attnc


def assert_body_error(body: str, message: str) -> None:
    """`pattern bad:` followed by `body` fails to compile with `message`, pointing into line 2."""
    with pytest.raises(attnc.SpecError) as e:
        attnc.compile("pattern bad:\n" + body, path="bad.attn")
    text = str(e.value)
    assert message in text and "bad.attn:2:" in text and "^" in text, text
