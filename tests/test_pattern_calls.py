"""Patterns called in masks, `P(args)` and `m.P(args)`: the conjunction of P's masks, combined with
`or` and `not`. The reference against dense formulas written here and FlexAttention's
`or_masks`; the kernels against the reference (forward and backward, under the interpreter);
layouts against brute force, and closed forms where the hand-written masks have them. The golden
texts of the errors are in tests/golden/diagnostics (pattern_call_*)."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import attnc
from attnc.dsl import ast as A
from attnc.dsl.parser import parse
from attnc.dsl.printer import print_module
from attnc.dsl.strategies import fuzz_modules
from attnc.dsl.types import FUNCTIONS

from test_backward import check_fp32, qkv
from test_sparsity import SHAPES, assert_closed_form_sound, assert_sound, compare

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _error(src: str, path: str = "c.attn") -> attnc.SpecError:
    with pytest.raises(attnc.SpecError) as info:
        attnc.compile(src, path=path, name="p")
    return info.value


def _grid(Lq, Lk):
    return torch.arange(Lq).view(Lq, 1), torch.arange(Lk).view(1, Lk)


def _dense(q, k, v, allowed, bias=None):
    """Softmax attention in fp64 over `allowed` [.., Lq, Lk]; a row with no key gives 0."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v.double()


def _inputs(B=1, H=2, Lq=29, Lk=29, D=8, seed=0):
    return tuple(t.detach().double() for t in qkv(B, H, H, Lq, Lk, D, seed=seed))


# --------------------------------------------------------------------------- syntax

def test_calls_parse_with_keywords_and_dotted_names_and_print_back():
    src = ("import std.chunked as c\n\npattern p:\n"
           "    mask c.chunked(16, causal=false) or not min(q, k) > 3 and causal()\n")
    m = parse(src)
    call = m.patterns[0].body[0].cond.left
    assert call == A.Call("c.chunked", (A.Num(16),), (A.Arg("causal", A.Bool(False)),))
    assert parse(print_module(m)) == m
    assert "c.chunked(16, causal=false)" in print_module(m)


# --------------------------------------------------------------------------- semantics (reference)

PREFIX = """
import std.causal
pattern p(prefix: int = 5):
    mask causal() or k < prefix
"""


def test_or_of_a_call_is_the_union():
    q, k, v = _inputs(Lq=23, Lk=31)
    qi, ki = _grid(23, 31)
    got = attnc.compile(PREFIX)(q, k, v, prefix=7, backend="reference")
    torch.testing.assert_close(got, _dense(q, k, v, (qi >= ki) | (ki < 7)), atol=1e-12, rtol=1e-12)


def test_not_of_a_call_negates_the_conjunction_of_its_masks():
    p = attnc.compile("import std.chunked\npattern p(c: int = 6):\n    mask not chunked(chunk = c)\n")
    q, k, v = _inputs()
    qi, ki = _grid(29, 29)
    inside = (qi // 6 == ki // 6) & (qi >= ki)   # std.chunked: both of its masks
    got = p(q, k, v, backend="reference")
    torch.testing.assert_close(got, _dense(q, k, v, ~inside), atol=1e-12, rtol=1e-12)


def test_arguments_bind_as_with_use():
    """Positional, keyword, defaults, and a bool argument that is any expression (here per head)."""
    p = attnc.compile("import std.chunked\nimport std.sliding_window\npattern p:\n"
                      "    mask sliding_window(4) or chunked(chunk = 8, causal = h < 1)\n")
    q, k, v = _inputs()
    qi, ki = _grid(29, 29)
    window = (qi >= ki) & (qi - ki < 4)
    head0 = (qi // 8 == ki // 8) & (qi >= ki)
    head1 = qi // 8 == ki // 8
    allowed = torch.stack([window | head0, window | head1]).view(1, 2, 29, 29)
    got = p(q, k, v, backend="reference")
    torch.testing.assert_close(got, _dense(q, k, v, allowed), atol=1e-12, rtol=1e-12)


HELPERS = """
pattern near(w: int = 3):
    let d = q - k
    mask 0 <= d < w

pattern flagged:
    tensor flag: bool[batch, k_len]
    mask flag[b, k]

pattern p(w: int = 3):
    mask near(w) or flagged() and k % 2 == 0
    score += 0.25 * d
"""


def test_tensors_and_lets_of_a_called_pattern_come_along():
    p = attnc.compile(HELPERS, name="p")
    assert [t.name for t in p.tensors] == ["flag"]
    q, k, v = _inputs()
    qi, ki = _grid(29, 29)
    flag = torch.rand(1, 29, generator=torch.Generator().manual_seed(3)) < 0.3
    allowed = ((qi - ki >= 0) & (qi - ki < 4)) | (flag.view(1, 1, 1, 29) & (ki % 2 == 0))
    got = p(q, k, v, w=4, flag=flag, backend="reference")
    want = _dense(q, k, v, allowed, bias=0.25 * (qi - ki).double())
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    with pytest.raises(attnc.SpecError, match="needs the tensor `flag`"):
        p(q, k, v, backend="reference")


def test_an_imported_pattern_is_called_by_its_qualified_name(tmp_path):
    (tmp_path / "windows.attn").write_text("pattern band(lo: int, hi: int):\n    mask lo <= q - k <= hi\n")
    main = tmp_path / "main.attn"
    main.write_text('import "windows.attn" as w\n\npattern p:\n    mask w.band(0, 2) or w.band(lo = -9, hi = -8)\n')
    p = attnc.load(str(main))
    q, k, v = _inputs()
    qi, ki = _grid(29, 29)
    d = qi - ki
    torch.testing.assert_close(p(q, k, v, backend="reference"),
                               _dense(q, k, v, ((d >= 0) & (d <= 2)) | ((d >= -9) & (d <= -8))))


def test_a_pattern_without_masks_is_true_and_its_requires_still_hold():
    src = ("pattern sized(n: int = 4):\n    require n > 0\n\n"
           "pattern p(n: int = 4):\n    mask not sized(n) or q >= k\n")
    p = attnc.compile(src, name="p")
    assert [str(m) for m in p.ir.masks] == [str(attnc.std("causal").ir.masks[0])]
    q, k, v = _inputs()
    with pytest.raises(attnc.SpecError) as info:
        p(q, k, v, n=0, backend="reference")
    assert info.value.message == "require failed: n > 0 with n = 0"
    assert info.value.diagnostics[0].hint == "required by the call `sized(...)` at <string>:5:14"


def test_a_require_that_never_holds_names_the_call():
    err = _error("import std.prefix_lm\npattern p:\n    mask prefix_lm(-1) or q - k < 8\n")
    assert err.message == "require failed: prefix >= 0 with prefix = -1"
    assert err.span.source.path == "<std>/prefix_lm.attn"
    assert err.diagnostics[0].hint == "required by the call `prefix_lm(...)` at c.attn:3:10"


def test_the_same_ir_as_the_hand_written_masks():
    """A call is inlined: the IR (hence the kernels and the analysis) is that of the masks written
    out, so std.prefix_lm and `causal() or k < prefix` are one pattern."""
    p = attnc.load(os.path.join(EXAMPLES, "prefix_lm_or.attn"))
    std = attnc.std("prefix_lm")
    assert p.ir.masks == std.ir.masks and p.ir.requires == std.ir.requires
    by_hand = attnc.compile("pattern p(chunk: int = 16):\n    require chunk > 0\n"
                            "    mask q >= k and not (q // chunk == k // chunk)\n")
    inter = attnc.load(os.path.join(EXAMPLES, "inter_chunk.attn"))
    assert inter.ir.masks == by_hand.ir.masks and inter.ir.requires == by_hand.ir.requires


# --------------------------------------------------------------------------- names and errors

def test_local_names_hide_patterns():
    for decl, kind in (("let causal = q > 2", "let"), ("tensor causal: bool[heads]", "tensor")):
        err = _error(f"import std.causal\npattern p:\n    {decl}\n    mask causal() or k < 2\n")
        assert err.message == f"`causal` is a {kind} here, which hides the pattern `causal`"


def test_a_let_brought_in_twice_is_ambiguous():
    src = HELPERS.replace("mask near(w) or flagged() and k % 2 == 0", "mask near(w) or near(w = 2 * w)")
    err = _error(src)
    assert err.message == "`d` is ambiguous: it is defined by `near(...)` at line 11 and by `near(...)` at line 11"


@pytest.mark.parametrize("body,why", [
    ("select topk(4)", "a `select` at c.attn:3:5"),
    ("normalize sigmoid", "a `normalize` at c.attn:3:5"),
    ("score += 1.0", "a `score` statement at c.attn:3:5"),
    ("use softcap", "`use softcap` at c.attn:3:5, which has a `score` statement at <std>/softcap.attn:"),
])
def test_only_a_mask_only_pattern_can_be_called(body, why):
    err = _error(f"import std.softcap\npattern helper:\n    {body}\n    mask q >= k\n"
                 "pattern p:\n    mask helper() or k < 3\n")
    assert err.message.startswith("`helper` cannot stand for a mask: it has " + why), err.render()
    assert "`use helper(...)`" in err.diagnostics[0].hint


def test_calls_stand_only_in_masks():
    for stmt in ("score += 1.0 if causal() else 0.0", "require causal()", "let a = causal()"):
        err = _error(f"import std.causal\npattern p:\n    {stmt}\n    mask q >= k\n")
        assert err.message == "`causal` is a pattern: a call of it can stand only in a `mask`"


def test_argument_mistakes_are_those_of_use():
    err = _error("import std.chunked\npattern p:\n    mask chunked(chunk = 2.5, causl = true, chunk = 3)\n")
    messages = [d.message for d in err.diagnostics]
    assert messages == ["`chunk` of `chunked` is int, given float", "`chunked` has no parameter `causl`",
                        "parameter `chunk` given twice"]
    assert err.diagnostics[1].hint == "did you mean `causal`?"
    err = _error("import std.chunked\npattern p:\n    mask chunked(4, true, 9)\n")
    assert err.message == "`chunked` takes 2 parameters, 3 given"
    err = _error("import std.chunked\npattern p:\n    mask chunked(chunk = k)\n")
    assert err.message.startswith("`chunk` must be known before the kernel runs")


def test_a_misspelt_pattern_call_suggests_the_pattern():
    err = _error("import std.causal\npattern p:\n    mask causl() or k < 2\n")
    assert err.message == "unknown function `causl`" and err.diagnostics[0].hint == "did you mean `causal`?"


def test_use_cycles_keep_their_words():
    err = _error("pattern p:\n    use p\n")
    assert err.message == "`use` cycle: p -> p"
    err = _error("pattern p:\n    mask p() or k < 1\n")
    assert err.message == "cycle of patterns: p -> p"


# --------------------------------------------------------------------------- analysis

CALLS = """
import std.causal
import std.chunked
import std.sliding_window
import std.strided
import std.document

pattern or_calls(w: int = 9, s: int = 7):
    mask sliding_window(window = w) or strided(stride = s)

pattern not_call(c: int = 24):
    mask causal() and not chunked(chunk = c, causal = false)

pattern not_or(c: int = 24, p: int = 10):
    mask not (chunked(chunk = c) or k < p) or q == k

pattern docs_or_window(w: int = 9):
    mask document(causal = false) or sliding_window(window = w)
"""
#: calls whose masks are affine in q and k: the layout is exact and closed-form
CLOSED = {"not_call": {}, "not_or": {}}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["or_calls", "not_call", "not_or", "docs_or_window"])
def test_layouts_of_calls_are_sound(name, shape):
    p = attnc.compile(CALLS, name=name)
    args = {}
    if name == "docs_or_window":
        if shape[1] > shape[0]:
            pytest.skip("`doc` labels the keys too: k_len <= q_len")
        args["doc"] = torch.sort(torch.randint(0, 4, (1, shape[0]), generator=torch.Generator().manual_seed(1)))[0]
    lay, got, ref = compare(p, *shape, **args)
    assert_sound(got, ref)
    assert_closed_form_sound(lay, ref)
    if name in CLOSED or name == "or_calls":
        assert torch.equal(got, ref)
    if name in CLOSED:
        assert lay.closed_form is not None and lay.closed_form.exact
        assert set(lay.tiers) == {"closed_form"}


def test_the_prefix_lm_example_keeps_its_closed_form():
    p = attnc.load(os.path.join(EXAMPLES, "prefix_lm_or.attn"))
    for shape in SHAPES:
        lay, got, ref = compare(p, *shape, prefix=37)
        assert torch.equal(got, ref)
        assert set(lay.tiers) == {"closed_form"} and lay.closed_form.exact


#: mask-only stdlib patterns with the arguments a generated call passes
PARTS = {"causal": lambda d: "causal()", "sliding_window": lambda d: f"sliding_window({d(1, 20)})",
         "chunked": lambda d: f"chunked(chunk = {d(1, 20)}, causal = {d.bool()})",
         "prefix_lm": lambda d: f"prefix_lm(prefix = {d(0, 30)})", "strided": lambda d: f"strided({d(1, 9)})",
         "dilated": lambda d: f"dilated(window = {d(1, 6)}, dilation = {d(1, 4)})"}


@st.composite
def _combination(draw, depth=2):
    class D:
        def __call__(self, lo, hi):
            return draw(st.integers(lo, hi))

        def bool(self):
            return draw(st.sampled_from(["true", "false"]))
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        name = draw(st.sampled_from(sorted(PARTS)))
        return PARTS[name](D()), {name}
    op = draw(st.sampled_from(["and", "or", "not"]))
    a, na = draw(_combination(depth - 1))
    if op == "not":
        return f"not {a}", na
    b, nb = draw(_combination(depth - 1))
    return f"({a} {op} {b})", na | nb


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(_combination(), st.sampled_from(SHAPES))
def test_any_combination_of_calls_has_a_sound_layout(combo, shape):
    """and / or / not of pattern calls, nested: the analysis (DNF over the inlined masks) is sound,
    and so is the closed form where it finds one."""
    expr, names = combo
    src = "".join(f"import std.{n}\n" for n in sorted(names)) + f"pattern p:\n    mask {expr}\n"
    p = attnc.compile(src, name="p")
    lay, got, ref = compare(p, *shape)
    assert_sound(got, ref)
    assert_closed_form_sound(lay, ref)


# --------------------------------------------------------------------------- kernels

KERNELS = """
import std.causal
import std.chunked
import std.sliding_window
import std.document

pattern either(w: int = 5):
    tensor slope: float[heads]
    mask sliding_window(window = w) or document(causal = false) and k % 3 == 0
    score += slope[h] * (k - q)

pattern inter(c: int = 8):
    mask causal() and not chunked(chunk = c, causal = false)
"""


def test_kernels_match_the_reference_for_an_or_of_calls():
    p = attnc.compile(KERNELS, name="either")
    q, k, v = qkv(2, 2, 2, 37, 37, 16, seed=4)
    doc = torch.sort(torch.randint(0, 3, (2, 37), generator=torch.Generator().manual_seed(2)))[0]
    slope = torch.tensor([0.05, -0.1]).requires_grad_(True)
    got = check_fp32(p, q, k, v, {"doc": doc, "slope": slope})
    assert got["slope"].abs().sum() > 0


def test_kernels_match_the_reference_for_not_of_a_call():
    p = attnc.compile(KERNELS, name="inter")
    q, k, v = qkv(1, 2, 2, 37, 37, 16, seed=5)
    check_fp32(p, q, k, v, {"c": 8})


# --------------------------------------------------------------------------- FlexAttention

def test_prefix_lm_or_matches_flex_attention_or_masks():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention, or_masks
    p = attnc.load(os.path.join(EXAMPLES, "prefix_lm_or.attn"))
    L, prefix = 80, 21
    q, k, v = (t.detach() for t in qkv(1, 2, 2, L, L, 16))
    mask_mod = or_masks(lambda b, h, qi, ki: qi >= ki, lambda b, h, qi, ki: ki < prefix)
    mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = flex_attention(q, k, v, block_mask=mask)
    torch.testing.assert_close(p(q, k, v, prefix=prefix, backend="reference"), want, atol=2e-6, rtol=2e-5)


def test_inter_chunk_matches_flex_attention():
    from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention
    p = attnc.load(os.path.join(EXAMPLES, "inter_chunk.attn"))
    L, chunk = 80, 16
    q, k, v = (t.detach() for t in qkv(1, 2, 2, L, L, 16))
    mask_mod = and_masks(lambda b, h, qi, ki: qi >= ki, lambda b, h, qi, ki: qi // chunk != ki // chunk)
    mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = flex_attention(q, k, v, block_mask=mask)
    got = p(q, k, v, chunk=chunk, backend="reference")
    assert bool((got[:, :, :chunk] == 0).all())   # the first chunk sees no key
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


# --------------------------------------------------------------------------- the fuzzer's strategies

def _calls(e) -> list[A.Call]:
    """The pattern calls in an AST (calls of names that are not built-in functions)."""
    if isinstance(e, (list, tuple)):
        return [c for x in e for c in _calls(x)]
    if not dataclasses.is_dataclass(e):
        return []
    here = [e] if isinstance(e, A.Call) and e.func not in FUNCTIONS else []
    return here + [c for f in dataclasses.fields(e) for c in _calls(getattr(e, f.name))]


def test_the_fuzzer_calls_patterns_in_masks():
    """Generated modules call a helper of the file and stdlib patterns in masks (`not` among the
    forms); each checks and prints back."""
    seen = []

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz_modules(depth=1))
    def draw(m):
        text = print_module(m)
        assert parse(text) == m
        calls = _calls(m)
        if calls:
            attnc.compile(text, name="fuzzed")
            seen.extend((c.func, "mask not " in text) for c in calls)
    draw()
    callees = {f for f, _ in seen}
    assert "helper" in callees and callees & {"causal", "sliding_window", "chunked", "prefix_lm"}, seen
    assert any(negated for _, negated in seen), seen
