"""Arbitrary input text only ever produces a SpecError (never another exception, never a hang)."""
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.dsl.diagnostics import SpecError
from attnc.dsl.printer import print_module
from attnc.dsl.strategies import modules

SPECS = os.path.join(os.path.dirname(__file__), "specs")
TOKENS = ["pattern", "p", "(", ")", ":", "\n", "    ", "mask", "score", "=", "+=", "q", "k", ">=", "<", "and",
          "or", "not", "1", "2.5", "tensor", "float", "[", "]", ",", "heads", "let", "x", "select", "topk",
          "normalize", "sigmoid", "bias", "use", "import", "std", ".", "causal", "sum", "for", "in", "range",
          "if", "else", "//", "%", "**", "-", "#c", "\t", '"f.attn"', "as", "true", "abs", "exp"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_spec_errors(text: str):
    start = time.process_time()
    try:
        attnc.compile(text, path="fuzz.attn")
    except SpecError as e:
        assert str(e)  # renders
    assert time.process_time() - start < 1.0, "input took over a second of CPU time"


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(data):
    _only_spec_errors(data.decode("utf-8", errors="replace"))


@SETTINGS
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
