"""Arbitrary input text only ever produces a SpecError (never another exception, never a hang):
random bytes, token soups, mutated valid files, pathological nesting and huge literals."""
import gc
import os
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.dsl.diagnostics import SpecError
from attnc.dsl.printer import print_module
from attnc.dsl.strategies import modules

SPECS = os.path.join(os.path.dirname(__file__), "specs")
TOKENS = ["pattern", "p", "(", ")", ":", "\n", "    ", "  ", "mask", "score", "=", "+=", "q", "k", "h", "b",
          ">=", "<", "==", "and", "or", "not", "if", "else", "1", "2.5", "3", "-", "*", "//", "%", "**", ",",
          "tensor", "t", "float", "int", "bool", "[", "]", "heads", "let", "x", "w", "select", "topk",
          "normalize", "sigmoid", "softmax", "bias", "use", "import", "std", ".", "std.causal", "causal",
          "sum", "for", "i", "in", "range", "exp", "abs", "clamp", "true", "#", "#c", "\t", '"f.attn"',
          '"x.attn"', "as"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_spec_errors(text: str):
    """Compiling `text` works or raises a SpecError that renders, has sane positions and is not
    an internal error — within a second of CPU time. The garbage collector is off while the
    clock runs: a collection of the whole test session's heap is not the input's cost."""
    gc.disable()
    start = time.process_time()
    try:
        attnc.compile(text, path="fuzz.attn")
    except SpecError as e:
        assert str(e)  # renders
        assert "internal error" not in e.render(), e.render()
        for d in e.diagnostics:
            if d.span is not None:
                assert 1 <= d.span.line and 1 <= d.span.col
    finally:
        seconds = time.process_time() - start
        gc.enable()
    assert seconds < 1.0, "input took over a second of CPU time"


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(data):
    _only_spec_errors(data.decode("utf-8", errors="replace"))
    _only_spec_errors(data.decode("latin-1"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_random_token_sequences(tokens):
    _only_spec_errors(" ".join(tokens))
    _only_spec_errors("".join(tokens))


@SETTINGS
@given(modules(), st.data())
def test_mutated_valid_files(module, data):
    text = print_module(module)
    kind = data.draw(st.sampled_from(["delete", "swap_lines", "duplicate", "insert"]))
    if kind == "delete" and text:
        i = data.draw(st.integers(0, len(text) - 1))
        j = data.draw(st.integers(i, min(len(text), i + 5)))
        text = text[:i] + text[j:]
    elif kind == "swap_lines":
        lines = text.splitlines()
        if len(lines) > 1:
            i = data.draw(st.integers(0, len(lines) - 2))
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
        text = "\n".join(lines)
    elif kind == "duplicate":
        lines = text.splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        text = "\n".join(lines[:i + 1] + lines[i:])
    else:
        i = data.draw(st.integers(0, len(text)))
        text = text[:i] + data.draw(st.sampled_from(TOKENS)) + text[i:]
    _only_spec_errors(text)


@pytest.mark.parametrize("text", [
    "pattern p:\n    mask " + "(" * 600 + "q" + ")" * 600 + " >= k\n",
    "pattern p:\n    mask " + "not " * 600 + "q >= k\n",
    "pattern p:\n    score = " + " + ".join(["score"] * 3000) + "\n",
    "pattern p:\n    mask q >= 123456789012345678901234567890\n",
    "pattern p(w: int = 99999999999999999999999):\n    mask q >= k\n",
    "pattern p:\n    score += 1e999\n",
    "pattern p:\n" + "".join(f"    let x{i} = {'q' if i == 0 else f'x{i-1}'} + 1\n" for i in range(400)) + "    mask x399 > k\n",
    "pattern p:\n    mask q >= k" + " " * 100000 + "\n",
    "\x00\x01pattern",
    "\x00pattern p:\n    mask q >= k\n",
    "pattern p:\n\tmask q >= k\n        mask q > 0\n",
])
def test_pathological_inputs(text):
    _only_spec_errors(text)


def test_use_of_a_pattern_with_errors_in_an_imported_file_reports_that_file(tmp_path):
    (tmp_path / "bad.attn").write_text("pattern b:\n    mask q >= kk\n")
    (tmp_path / "main.attn").write_text('import "bad.attn"\n\npattern m:\n    use b\n')
    with pytest.raises(SpecError) as e:
        attnc.load(tmp_path / "main.attn")
    assert "bad.attn:2:15" in str(e.value)


def test_exponentially_shared_lets_stay_linear():
    lets = "".join(f"    let x{i} = x{i-1} + x{i-1}\n" for i in range(1, 60))
    p = attnc.compile("pattern p:\n    let x0 = q - k\n" + lets + "    mask x59 >= 0\n")
    import torch
    q = torch.randn(1, 1, 8, 4)
    start = time.process_time()
    assert p.digest and p(q, q, q).shape == (1, 1, 8, 4)
    assert time.process_time() - start < 5


def test_deeply_nested_parentheses():
    for depth in (500, 5000):
        text = "pattern p:\n    mask " + "(" * depth + "q >= k" + ")" * depth + "\n"
        _only_spec_errors(text)


def test_deeply_nested_unary_minus_and_long_chains():
    _only_spec_errors("pattern p:\n    mask q >= " + "-" * 5000 + "k\n")
    _only_spec_errors("pattern p:\n    mask q >= k" + " + 1" * 5000 + "\n")
    _only_spec_errors("pattern p:\n    score += " + "exp(" * 1000 + "q" + ")" * 1000 + "\n")


@pytest.mark.parametrize("literal", ["99999999999999999999999999999", "9" * 5000, "1e999", "1" + "0" * 400 + ".5"])
def test_huge_literals(literal):
    with pytest.raises(attnc.SpecError) as info:
        attnc.compile(f"pattern p:\n    mask q - k < {literal}\n")
    assert "out of range" in info.value.message or "64 bits" in info.value.message
    with pytest.raises(attnc.SpecError):
        attnc.compile(f"pattern p(w: int = {literal}):\n    mask q - k < w\n")


_VALID = [
    "pattern streaming(window: int = 1024, sinks: int = 4):\n    mask q >= k\n    mask q - k < window or k < sinks\n",
    "pattern g(side: int, n: int = 3):\n    tensor alpha: float[heads, n]\n    let dy = q // side - k // side\n"
    "    score *= sum(alpha[h, i] * exp(-(dy * dy) / 2) for i in range(n))\n",
    "import std.causal\n\npattern cw(window: int = 512):\n    use causal\n    mask q - k < window\n",
    "pattern s:\n    normalize sigmoid(bias = -log(k_len))\n    select topk(4)\n",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 3),
                                                     st.sampled_from(TOKENS)), min_size=1, max_size=4))
def test_mutated_specs(base, edits):
    """Valid specs with a few characters deleted, replaced or inserted."""
    text = base
    for pos, kind, token in edits:
        pos %= len(text) + 1
        if kind == 0:
            text = text[:pos] + text[pos + 1:]
        elif kind == 1:
            text = text[:pos] + token + text[pos:]
        elif kind == 2:
            text = text[:pos] + token + text[pos + len(token):]
        else:
            text = text[:pos]
    _only_spec_errors(text)


def test_recursion_limit_is_restored():
    limit = sys.getrecursionlimit()
    _only_spec_errors("pattern p:\n    mask " + "(" * 3000 + "q >= k" + ")" * 3000 + "\n")
    assert sys.getrecursionlimit() == limit
