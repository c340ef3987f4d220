"""`def`: functions in the language, inlined at each call.

Diagnostics (golden files in tests/golden/diagnostics/def/), the printer round trip, the IR of a
pattern written with defs against the same pattern written out (so kernels, reference,
derivatives and analysis need nothing new), the reference against dense formulas written here,
generated kernels (interpreter) against the reference forward and backward, layouts against
brute force, imports, the fuzzer's defs, and the two gallery examples against FlexAttention.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from attnc.dsl import ast as A
from attnc.dsl import loader
from attnc.dsl.checker import check_library
from attnc.dsl.loader import build_library
from attnc.dsl.parser import parse
from attnc.dsl.printer import print_module
from attnc.dsl.strategies import extracted_defs, fuzz_modules, modules
from attnc.lowering.lower import lower_pattern
from attnc.lowering.printer import canonical_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec_errors import check_golden_error
from test_backward import check_fp32, qkv
from test_sparsity import assert_sound, compare

import attnc

GOLDEN = Path(__file__).parent / "golden" / "diagnostics" / "def"
EXAMPLES = Path(__file__).parent.parent / "examples"

# --------------------------------------------------------------------------- diagnostics

# name -> (line, column) where the one error must point
SPEC_ERRORS = {
    "recursion": (1, 12),
    "mutual_recursion": (2, 14),
    "local_recursion": (2, 16),
    "wrong_arity": (3, 10),
    "argument_type": (3, 14),
    "inferred_type": (3, 10),
    "range_not_static": (3, 14),
    "builtin_name": (1, 5),
    "keyword_name": (1, 5),
    "unknown_function": (3, 10),
    "position_in_body": (1, 23),
    "score_in_body": (2, 19),
    "let_after_def": (2, 20),
    "duplicate": (2, 5),
    "unknown_type": (1, 7),
    "not_called": (3, 10),
}

# the message or hint each of these must give
SAYS = {
    "recursion": "recursive def: f -> f",
    "mutual_recursion": "recursive def: far -> near -> far",
    "local_recursion": "recursive def: f -> f",
    "wrong_arity": "`row` takes 2 arguments, 1 given",
    "argument_type": "argument `i` of `row` is int, given bool",
    "inferred_type": "`half` cannot be called with x: bool",
    "builtin_name": "pick another name, e.g. `min_`",
    "unknown_function": "did you mean `row`?",
    "position_in_body": "pass `q` as an argument",
    "score_in_body": "pass `score` as an argument",
    "let_after_def": "move `def f` below `d`",
    "not_called": "`row` is a def; call it: `row(...)`",
}


def test_every_golden_file_has_a_case():
    assert {p.stem for p in GOLDEN.glob("*.attn")} == set(SPEC_ERRORS)


@pytest.mark.parametrize("name", sorted(SPEC_ERRORS))
def test_spec_error(name, golden):
    check_golden_error(GOLDEN, name, SPEC_ERRORS[name], golden, says=SAYS.get(name))


def test_errors_in_a_def_are_reported_once_however_often_it_is_called():
    line = "    mask half(q > k) == half(q < k) and half(true) == 0"
    err = _errors(f"def half(x) = x // 2\npattern p:\n{line}\n")
    calls = [i + 1 for i in range(len(line)) if line.startswith("half(", i)]
    assert [d.span.col for d in err.diagnostics] == calls  # one per call
    err = _errors("def g(x) = x + nope\npattern p:\n    mask g(q) == g(k)\n")
    assert len(err.diagnostics) == 1 and err.diagnostics[0].span.line == 1  # in the body, once


def _errors(text: str, path: str = "t.attn") -> attnc.SpecError:
    with pytest.raises(attnc.SpecError) as info:
        attnc.compile(text, path=path)
    return info.value


@pytest.mark.parametrize("text,says", [
    ("pattern p(w: int = 1):\n    let f = 2\n    def f(x) = x\n    mask q >= k\n", "already defined as a let"),
    ("pattern p:\n    def f(x) = x\n    let f = 2\n    mask q >= k\n", "already defined as a def"),
    ("pattern p(w: int = 1):\n    def f(w) = w\n    mask q >= k\n", "already defined as a parameter"),
    ("def f(x, x) = x\npattern p:\n    mask q >= k\n", "declared twice"),
    ("def f(q_len) = q_len\npattern p:\n    mask q >= k\n", "built-in name"),
    ("def f(x) = x\npattern f:\n    mask q >= k\n", "already defined in this file as a pattern"),
    ("def h(x) = x\npattern p:\n    mask h(q) >= k\n", "`h` is a built-in name and cannot be a def"),
    ("def min(x) = x\npattern p:\n    def max(y) = y\n    mask min(q) >= max(k)\n", "cannot be redefined"),
    ("def f(x) = x\npattern p(w: int = f(3)):\n    mask q >= k\n", "default value must be a constant"),
    ("pattern a:\n    def f(x) = x\n    mask q >= k\npattern b:\n    use a\n    mask f(q) >= k\n",
     "unknown function `f`"),  # a pattern's defs are its own
    ("def f(x: float) = x\npattern p:\n    tensor t: float[f(heads)]\n    mask q >= k\n",
     "tensor dimension must be an int"),
    ("def f(x) = x\npattern p:\n    mask sum(1 for i in range(f(q))) > 0\n", "range of `sum` must be known"),
    ("def f(x) = sum(x for x in range(2))\npattern p:\n    mask f(q) > 0\n", "loop variable `x` hides"),
])
def test_more_errors(text, says):
    err = _errors(text)
    assert says in err.render(), err.render()


def test_a_file_of_defs_only_is_a_library():
    check_library(build_library("def row(i, width) = i // width\n", "grid.attn"))
    assert "empty file" in _errors("\n").render()


# --------------------------------------------------------------------------- printer, IR

def _ir(text: str, path: str = "t.attn", name: str | None = None):
    return attnc.compile(text, name=name, path=path).ir


SOURCES = [
    ("def f(a, b: int) = a + b\ndef g() = 3\n\npattern p(w: int = 3):\n    def h(x: float) = x * w\n"
     "    mask f(q, g()) >= k\n    score = h(score)\n"),
    'import "grid.attn" as g\n\npattern p:\n    mask g.row(q, 4) == g.row(k, 4)\n',
]


@pytest.mark.parametrize("text", SOURCES)
def test_printer_round_trips_defs(text):
    m = parse(text)
    assert print_module(m) == text
    assert parse(print_module(m)) == m


@pytest.mark.parametrize("with_defs,written_out", [
    ("""
def centre(c, n, kernel) = clamp(c, kernel // 2, n - 1 - kernel // 2)
pattern p(height: int = 4, width: int = 5, kernel: int = 3):
    def row(i) = i // width
    def col(i: int) = i % width
    def near(a, b, n) = abs(b - centre(a, n, kernel)) <= kernel // 2
    mask near(row(q), row(k), height) and near(col(q), col(k), width)
""", """
pattern p(height: int = 4, width: int = 5, kernel: int = 3):
    mask abs(k // width - clamp(q // width, kernel // 2, height - 1 - kernel // 2)) <= kernel // 2 and \\
        abs(k % width - clamp(q % width, kernel // 2, width - 1 - kernel // 2)) <= kernel // 2
"""),
    # declared float parameters convert ints; sums in a body are named as if written in place
    ("""
def sq(x) = x * x
def damp(x: float, n) = sum(x * j for j in range(n))
pattern p(w: int = 2):
    tensor t: float[heads]
    def bias(i) = t[i % heads] * w
    score = sq(score) + sum(damp(i, 2) + bias(h) for i in range(3)) - damp(1, w) + sq(q - k)
    mask q >= k
""", """
pattern p(w: int = 2):
    tensor t: float[heads]
    score = score * score + sum(sum(1.0 * i * j for j in range(2)) + t[h % heads] * w for i in range(3)) \\
        - sum(1.0 * j for j in range(w)) + (q - k) * (q - k)
    mask q >= k
"""),
])
def test_calls_lower_to_the_ir_of_the_written_out_pattern(with_defs, written_out):
    assert _ir(with_defs) == _ir(written_out)
    p1, p2 = attnc.compile(with_defs), attnc.compile(written_out)
    assert p1.digest == p2.digest
    # the same kernel, but for the `# file:LINE` comments (a body's lines are the def's)
    lines = re.compile(r"# <string>:\d+")
    assert lines.sub("", p1.triton_source()) == lines.sub("", p2.triton_source())


def test_unused_defs_leave_the_digest_alone():
    plain = "pattern p(w: int = 4):\n    mask q - k < w\n"
    extra = "def unused(a, b) = a * b\npattern p(w: int = 4):\n    def also(x) = x + w\n    mask q - k < w\n"
    assert attnc.compile(plain).digest == attnc.compile(extra).digest


def test_a_local_def_sees_the_lets_as_they_stand_at_the_def():
    # `use other` brings a second `x`: the includer may no longer name it, but the def keeps the
    # value it saw (lexical scope); a local def shadows the file-level one
    text = """
def f(a) = a - 1000
pattern other:
    let x = 100
    mask k <= q + x
pattern p:
    let x = 1
    def f(a) = a + x
    use other
    mask k <= f(q)
"""
    ir = _ir(text, name="p")
    want = _ir("pattern p:\n    mask k <= q + 100\n    mask k <= q + 1\n")
    assert set(ir.masks) == set(want.masks)


def test_a_used_pattern_inlines_its_own_defs():
    text = "pattern a(w: int = 3):\n    def near(x, y) = abs(x - y) < w\n    mask near(q, k)\n" \
           "pattern b:\n    use a(w = 5)\n"
    assert _ir(text, name="b").masks == _ir("pattern b:\n    mask abs(q - k) < 5\n").masks


# --------------------------------------------------------------------------- imports

def test_imported_defs_under_an_alias_and_without(tmp_path):
    (tmp_path / "grid.attn").write_text(
        "# coordinates on a grid of `width` columns\n"
        "def row(i, width) = i // width\n"
        "def col(i, width) = i % width\n"
        "def manhattan(a, b, width) = abs(row(a, width) - row(b, width)) + abs(col(a, width) - col(b, width))\n")
    (tmp_path / "aliased.attn").write_text(
        'import "grid.attn" as g\npattern near(width: int = 4, radius: int = 2):\n'
        '    mask g.manhattan(q, k, width) <= radius\n')
    (tmp_path / "plain.attn").write_text(
        'import "grid.attn"\npattern near(width: int = 4, radius: int = 2):\n'
        '    mask manhattan(q, k, width) <= radius\n')
    want = _ir("pattern near(width: int = 4, radius: int = 2):\n"
               "    mask abs(q // width - k // width) + abs(q % width - k % width) <= radius\n")
    for f in ("aliased.attn", "plain.attn"):
        assert attnc.load(tmp_path / f).ir.masks == want.masks
    (tmp_path / "typo.attn").write_text('import "grid.attn" as g\npattern p:\n    mask g.rw(q, 4) == 0\n')
    with pytest.raises(attnc.SpecError, match="did you mean `g.row`"):
        attnc.load(tmp_path / "typo.attn")
    (tmp_path / "clash.attn").write_text('import "grid.attn"\ndef row(i) = i\npattern p:\n    mask q >= k\n')
    with pytest.raises(attnc.SpecError, match="clashes with the def `row` here"):
        attnc.load(tmp_path / "clash.attn")


def test_errors_in_an_imported_def_point_into_its_file(tmp_path):
    (tmp_path / "lib.attn").write_text("def half(x) = x // 2\n")
    (tmp_path / "main.attn").write_text('import "lib.attn" as m\npattern p:\n    mask m.half(q > k) == 1\n')
    with pytest.raises(attnc.SpecError) as info:
        attnc.load(tmp_path / "main.attn")
    d = info.value.diagnostics[0]
    assert (d.span.line, d.span.col) == (3, 10) and "lib.attn:1:" in d.hint


def test_import_std_brings_its_defs(monkeypatch):
    real_names, real_read = loader.stdlib_names, loader.read_stdlib
    monkeypatch.setattr(loader, "stdlib_names", lambda: real_names() + ["grid_defs"])
    monkeypatch.setattr(loader, "read_stdlib", lambda name: "def row(i, w) = i // w\n"
                        if name == "grid_defs" else real_read(name))
    ir = _ir("import std.grid_defs as g\npattern p:\n    mask g.row(q, 4) == g.row(k, 4)\n")
    assert ir.masks == _ir("pattern p:\n    mask q // 4 == k // 4\n").masks


# --------------------------------------------------------------------------- reference, kernels

SCORE_AND_MASK = """
def gelu(x) = x * 0.5 * (1.0 + erf(x / sqrt(2.0)))
pattern p(width: int = 5, slope: float = 0.25):
    tensor gain: float[heads]
    def row(i) = i // width
    def col(i) = i % width
    def bias(a, c) = slope * abs(row(a) - row(c)) * gain[h2(a)]
    def h2(i) = i % heads
    score = gelu(score) - bias(q, k)
    mask abs(col(q) - col(k)) <= 1 and row(q) >= row(k)
"""


def _dense(q, k, v, score_fn, allowed):
    s = score_fn((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v.double()


def test_reference_matches_a_dense_formula():
    text = SCORE_AND_MASK.replace("    def h2(i) = i % heads\n", "").replace("gain[h2(a)]", "gain[a % heads]")
    p = attnc.compile(text)
    B, H, L, width, slope = 1, 2, 23, 5, 0.25
    q, k, v = (t.detach() for t in qkv(B, H, H, L, L, 8, seed=3))
    gain = torch.tensor([0.5, -1.5])
    i = torch.arange(L)
    qi, ki = i.view(-1, 1), i.view(1, -1)
    allowed = ((qi % width - ki % width).abs() <= 1) & (qi // width >= ki // width)

    def score(s):
        g = s * 0.5 * (1 + torch.erf(s / math.sqrt(2.0)))
        # gain[q % heads]: the row's own position picks the gain
        return g - slope * (qi // width - ki // width).abs().double() * gain.double()[qi % H]

    got = p(q.double(), k.double(), v.double(), gain=gain, backend="reference")
    torch.testing.assert_close(got, _dense(q, k, v, score, allowed), atol=1e-10, rtol=1e-10)


def test_a_def_reading_its_pattern_before_its_definition_is_an_error():
    # `bias` calls `h2`, which is defined below it
    assert "unknown function `h2`" in _errors(SCORE_AND_MASK).render()


def test_kernels_forward_and_backward_match_the_reference():
    text = SCORE_AND_MASK.replace("    def h2(i) = i % heads\n", "").replace(
        "    def row(i)", "    def h2(i) = i % heads\n    def row(i)")
    p = attnc.compile(text)
    q, k, v = qkv(1, 2, 2, 37, 37, 16, seed=2)
    gain = torch.tensor([0.7, -0.4]).requires_grad_(True)
    got = check_fp32(p, q, k, v, {"gain": gain})
    assert got["gain"].abs().sum() > 0


# --------------------------------------------------------------------------- analysis

def test_layouts_of_def_masks_are_sound_and_as_precise_as_written_out():
    p = attnc.load(EXAMPLES / "dilated_neighborhood.attn")
    std = attnc.std("neighborhood_2d")
    args = {"height": 12, "width": 10, "kernel": 3, "dilation": 2}
    _, got, exact = compare(p, 120, 120, 16, 16, **args)
    assert_sound(got, exact)
    _, std_got, _ = compare(std, 120, 120, 16, 16, **args)
    assert torch.equal(got, std_got)
    video = attnc.load(EXAMPLES / "video_neighborhood.attn")
    _, got, exact = compare(video, 150, 150, 16, 32, frames=6, height=5, width=5, kernel_t=3)
    assert_sound(got, exact)
    assert (got == 0).sum() > 0  # far frames are skipped


# --------------------------------------------------------------------------- fuzzer

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_extracted_defs_keep_the_ir(data):
    m = data.draw(modules(defs=False))
    with_defs = data.draw(extracted_defs(m, most=2))
    text = print_module(with_defs)
    assert parse(text) == with_defs, text

    def irs(module):
        lib = build_library(print_module(module), "f.attn")
        check_library(lib)
        return [canonical_text(lower_pattern(r)) for r in lib.local_patterns()]
    assert irs(with_defs) == irs(m), text


def test_the_fuzzer_draws_file_level_and_local_defs():
    seen = {"file": 0, "local": 0}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(fuzz_modules())
    def count(m):
        seen["file"] += bool(m.defs)
        seen["local"] += any(isinstance(s, A.Def) for p in m.patterns for s in p.body)
    count()
    assert seen["file"] > 0 and seen["local"] > 0, seen


# --------------------------------------------------------------------------- gallery

def _flex(q, k, v, mask_mod, L):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block)


def _window(c_q, c_k, n, size, dilation=1):
    """NATTEN along one axis, written as the window's start on the query's dilation group."""
    group = c_q % dilation
    cells = (n - group + dilation - 1) // dilation
    start = (c_q // dilation - size // 2).clamp(min=0)
    start = torch.minimum(start, cells - size)
    return (c_k % dilation == group) & (c_k // dilation >= start) & (c_k // dilation < start + size)


@pytest.mark.parametrize("height,width,kernel,dilation", [(8, 8, 3, 2), (6, 10, 3, 2), (9, 10, 3, 3)])
def test_dilated_neighborhood_matches_flex_attention(height, width, kernel, dilation):
    p = attnc.load(EXAMPLES / "dilated_neighborhood.attn")
    L = height * width

    def mask_mod(b, h, qi, ki):
        return _window(qi // width, ki // width, height, kernel, dilation) & \
            _window(qi % width, ki % width, width, kernel, dilation)
    q, k, v = (t.detach() for t in qkv(1, 2, 2, L, L, 16))
    want = _flex(q, k, v, mask_mod, L)
    got = p(q, k, v, height=height, width=width, kernel=kernel, dilation=dilation, backend="reference")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_video_neighborhood_matches_flex_attention():
    p = attnc.load(EXAMPLES / "video_neighborhood.attn")
    T, Hh, W, kt, kh, kw = 3, 4, 5, 3, 3, 3
    L = T * Hh * W

    def mask_mod(b, h, qi, ki):
        return _window(qi // (Hh * W), ki // (Hh * W), T, kt) & \
            _window(qi // W % Hh, ki // W % Hh, Hh, kh) & _window(qi % W, ki % W, W, kw)
    q, k, v = (t.detach() for t in qkv(1, 2, 2, L, L, 16))
    want = _flex(q, k, v, mask_mod, L)
    got = p(q, k, v, frames=T, height=Hh, width=W, kernel_t=kt, kernel_h=kh, kernel_w=kw,
            backend="reference")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("text,says", [
    # a file-level def's body calling an unknown name, or a pattern (found by test_robustness)
    ("def a(q, k) = q >= k\ndef b(q: int, k: int) = c(q, k)\npattern p:\n    mask b(q, k)\n",
     "unknown function `c`"),
    ("def f(q, k) = causal()\npattern causal:\n    mask q >= k\npattern p:\n    mask f(q, k)\n",
     "unknown function `causal`"),
])
def test_a_def_body_never_calls_a_pattern(text, says):
    err = _errors(text)
    assert says in err.render() and "internal error" not in err.render(), err.render()
