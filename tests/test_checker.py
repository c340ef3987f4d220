"""Checker behaviour beyond the golden diagnostics: collection, `use` binding and visibility."""
import pytest
import torch

import attnc
from attnc.dsl.diagnostics import SpecError

BAND = "pattern band(lo: int, hi: int):\n    let d = q - k\n    mask d >= lo and d < hi\n"


def _errors(src):
    with pytest.raises(SpecError) as e:
        attnc.compile(src, path="t.attn")
    return e.value.diagnostics


def test_all_errors_in_a_file_are_reported_once_each():
    diags = _errors("pattern p:\n    mask q >= kk\n    score = q >= k\n    mask exp(q, k) > 0\n"
                    "    let x = undefined_name + 1\n    mask x > 0\n")
    assert [(d.span.line, d.span.col) for d in diags] == [(2, 15), (3, 13), (4, 10), (5, 13)]


def test_a_used_pattern_can_be_included_twice_with_different_arguments():
    p = attnc.compile(BAND + "pattern two:\n    use band(lo=0, hi=3)\n    use band(lo=-2, hi=1)\n", name="two")
    q = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    out = p(q, q, q)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    allowed = (i - j >= 0) & (i - j < 1)
    s = (q @ q.transpose(-1, -2) / 2).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ q)


def test_an_ambiguous_included_let_cannot_be_referenced():
    diags = _errors(BAND + "pattern two:\n    use band(lo=0, hi=3)\n    use band(lo=-2, hi=1)\n    score -= d\n")
    assert len(diags) == 1 and "ambiguous" in diags[0].message and "line 5" in diags[0].message


def test_included_lets_and_tensors_are_visible_after_use():
    p = attnc.compile(BAND + "pattern w:\n    tensor s: float[heads]\n    use band(lo=0, hi=4)\n"
                      "    score -= s[h] * d\n", name="w")
    q = torch.randn(1, 2, 6, 4)
    assert p(q, q, q, s=torch.ones(2)).shape == (1, 2, 6, 4)


def test_use_argument_errors():
    diags = _errors(BAND + "pattern w:\n    use band(lo=1.5, hii=2)\n")
    messages = " | ".join(d.message for d in diags)
    assert "`lo` of `band` is int, given float" in messages
    assert "no parameter `hii`" in messages
    assert "needs a value for its parameter `hi`" in messages


def test_parameters_shadowing_builtins_and_duplicates_are_rejected():
    diags = _errors("pattern p(q: int = 1, w: int = 2, w: int = 3):\n    let exp = 1\n    mask k >= 0\n")
    messages = [d.message for d in diags]
    assert any("`q` is a built-in name" in m for m in messages)
    assert any("declared twice" in m for m in messages)
    assert any("`exp` is a function name" in m for m in messages)


def test_static_requirements():
    diags = _errors("pattern p:\n    select topk(q)\n    score += sum(1.0 for i in range(k))\n"
                    "    tensor t: float[q]\n")
    assert len(diags) == 3 and all("before the kernel runs" in d.message or "only sizes" in d.message
                                   for d in diags)


def test_score_visibility():
    diags = _errors("pattern p:\n    let s = score * 2\n    mask score > 0\n")
    assert len(diags) == 1 and diags[0].span.line == 2


def test_masks_see_the_final_score():
    p = attnc.compile("pattern p:\n    mask score > 0.0\n    score = score - 100.0\n")
    q = torch.randn(1, 1, 5, 4)
    assert torch.all(p(q, q, q) == 0)  # every final score is below zero: all rows empty


def test_import_cycles_between_files(tmp_path):
    (tmp_path / "a.attn").write_text('import "b.attn"\npattern a:\n    mask q >= k\n')
    (tmp_path / "b.attn").write_text('import "a.attn"\npattern b:\n    mask q >= k\n')
    with pytest.raises(SpecError, match=r"import cycle: a\.attn -> b\.attn -> a\.attn"):
        attnc.load(tmp_path / "a.attn")


def test_load_picks_a_pattern_by_name(tmp_path):
    f = tmp_path / "two.attn"
    f.write_text("pattern a:\n    mask q >= k\n\npattern b:\n    mask q <= k\n")
    assert attnc.load(f, name="b").name == "b"
    with pytest.raises(SpecError, match="defines 2 patterns"):
        attnc.load(f)
    with pytest.raises(SpecError, match="did you mean `a`"):
        attnc.load(f, name="aa")


def test_a_let_of_parameters_and_sizes_is_static():
    # it may size a tensor, bound a `sum` and appear in a `require`; a let of positions may not
    p = attnc.compile("pattern p(w: int = 2):\n    let n = w + 1\n    tensor t: float[n]\n"
                      "    require n <= q_len\n    score += sum(t[i] for i in range(n))\n")
    q = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    s = q @ q.transpose(-1, -2) / 2 + t.sum()
    torch.testing.assert_close(p(q, q, q, t=t), torch.softmax(s, -1) @ q)
    diags = _errors("pattern p:\n    let n = q + 1\n    tensor t: float[n]\n    mask q >= k\n")
    assert len(diags) == 1 and "may use only sizes, parameters and literals" in diags[0].message


def test_a_let_brought_in_by_use_is_not_static():
    # its value depends on the arguments of the `use`, which need not be static (floats, bools)
    helper = "pattern two(causal: bool = true):\n    let m = 1 if causal else 2\n"
    attnc.compile(helper + "pattern p:\n    use two(causal = false)\n    mask q - k < m\n", name="p")
    diags = _errors(helper + "pattern p:\n    use two(causal = q > k)\n    require m > 0\n")
    assert len(diags) == 1 and "`require` may use only" in diags[0].message
