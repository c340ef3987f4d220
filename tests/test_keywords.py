"""Keywords are reserved (docs/language.md), and operators of other languages get the word this
one spells them with. The golden texts of these errors are in tests/golden/diagnostics."""
from __future__ import annotations

import pytest

import attnc
from attnc.dsl.ast import KEYWORDS

# every place a name is declared; {} is the name
DECLARATIONS = {
    "pattern": "pattern {}:\n    mask q >= k\n",
    "parameter": "pattern p({}: int = 1):\n    mask q >= k\n",
    "tensor": "pattern p:\n    tensor {}: float[heads]\n    mask q >= k\n",
    "let": "pattern p:\n    let {} = 3\n    mask q >= k\n",
    "loop variable": "pattern p:\n    score += sum(0.5 for {} in range(2))\n",
    "import alias": "import std.causal as {}\npattern p:\n    mask q >= k\n",
}


def _error(src: str) -> attnc.SpecError:
    with pytest.raises(attnc.SpecError) as info:
        attnc.compile(src, path="kw.attn")
    return info.value


@pytest.mark.parametrize("where", sorted(DECLARATIONS))
@pytest.mark.parametrize("keyword", KEYWORDS)
def test_a_keyword_cannot_be_declared_as_a_name(keyword, where):
    template = DECLARATIONS[where]
    err = _error(template.format(keyword))
    d = err.diagnostics[0]
    assert d.message == f"`{keyword}` is a keyword and cannot be used as a name", err.render()
    line = template.split("\n").index(next(ln for ln in template.split("\n") if "{}" in ln)) + 1
    assert (d.span.line, d.span.col) == (line, template.split("\n")[line - 1].index("{}") + 1)
    assert d.span.end_col - d.span.col == len(keyword)


@pytest.mark.parametrize("where", sorted(DECLARATIONS))
def test_names_that_merely_contain_a_keyword_are_fine(where):
    for name in ("mask_", "masks", "true_value", "scores", "in_", "range_len", "format", "nota"):
        src = DECLARATIONS[where].format(name)
        if where == "import alias":
            src = src.replace("mask q >= k", f"use {name}.causal")
        attnc.compile(src, path="ok.attn")


def test_true_no_longer_silently_wins_over_a_let():
    err = _error("pattern p:\n    let true = 0\n    mask q >= k or true\n")
    assert err.span.line == 2 and "keyword" in err.message


def test_keyword_as_a_keyword_argument_name():
    err = _error("pattern p:\n    normalize sigmoid(mask = 1.0)\n")
    assert (err.span.line, err.span.col) == (2, 23) and "`mask` is a keyword" in err.message


def test_python_capitals_suggest_the_language_literal():
    assert _error("pattern p:\n    mask q >= k or True\n").diagnostics[0].hint == "did you mean `true`?"
    assert _error("pattern p:\n    mask q >= k and not False\n").diagnostics[0].hint == "did you mean `false`?"


@pytest.mark.parametrize("src,col,word", [
    ("    mask q >= k && k >= 0\n", 17, "and"),
    ("    let a = q > 1 && k > 1\n    mask a\n", 19, "and"),
    ("    score += 1.0 if q > k || k == 0 else 0.0\n", 27, "or"),
    ("    mask q >= k & k >= 0\n", 17, "and"),
    ("    mask q >= k | k >= 0\n", 17, "or"),
    ("    mask !(q < k)\n", 10, "not"),
    ("    score += 0.5 if !(q < k) else 0.0\n", 21, "not"),
])
def test_foreign_boolean_operators_suggest_the_word(src, col, word):
    err = _error("pattern p:\n" + src)
    d = err.diagnostics[0]
    assert (d.span.line, d.span.col) == (2, col), err.render()
    assert d.hint.startswith(f"write `{word}`")


def test_not_equal_is_still_an_operator():
    attnc.compile("pattern p:\n    mask q != k and not q == 3\n")


@pytest.mark.parametrize("src,col", [
    ("    mask q = k\n", 12),
    ("    mask q % 2 = 0 and k >= 0\n", 16),
    ("    score += 1.0 if q = k else 0.0\n", 23),
    ("    let same = q = k\n    mask same\n", 18),
])
def test_single_equals_in_an_expression_suggests_double(src, col):
    err = _error("pattern p:\n" + src)
    d = err.diagnostics[0]
    assert (d.span.line, d.span.col) == (2, col), err.render()
    assert d.message == "`=` is not a comparison" and d.hint.startswith("write `==` to compare")
