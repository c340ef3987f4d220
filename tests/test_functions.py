"""The trigonometric functions and erf: `sin cos tan erf` in the reference (against formulas
written here and FlexAttention), in the kernels (forward and backward, under the interpreter),
in the derivatives, and in the analysis (interval rules sound and tight, layouts sound)."""
from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.lowering import ops
from attnc.lowering.intervals import Iv

from test_backward import check_fp32, qkv
from test_sparsity import assert_sound, compare

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")

ALL = """
pattern trig(w: float = 0.3):
    tensor phase: float[heads]
    score += sin(w * q + phase[h]) * cos(0.2 * k) - 0.5 * tan(tanh(score))
    score = score + erf(0.5 * score) * w
    mask q >= k
"""


def _dense(q, k, v, score_fn, allowed):
    s = score_fn((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.double()


def _causal(L):
    i = torch.arange(L)
    return i.view(L, 1) >= i.view(1, L)


def test_reference_matches_the_formula():
    p = attnc.compile(ALL)
    q, k, v = (t.detach() for t in qkv(2, 3, 3, 17, 17, 8))
    phase = torch.tensor([0.1, -0.7, 2.0], dtype=torch.float64)
    qi, ki = (torch.arange(17, dtype=torch.float64).view(17, 1), torch.arange(17, dtype=torch.float64).view(1, 17))

    def score(s):
        s = s + torch.sin(0.3 * qi + phase.view(1, 3, 1, 1)) * torch.cos(0.2 * ki) - 0.5 * torch.tan(torch.tanh(s))
        return s + torch.erf(0.5 * s) * 0.3

    want = _dense(q, k, v, score, _causal(17))
    got = p(q.double(), k.double(), v.double(), phase=phase.double(), backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("example,score_mod", [
    ("gelu_score", lambda s, b, h, q, k: 2.0 * s * 0.5 * (1 + torch.erf(s / math.sqrt(2.0)))),
    ("sandwich", lambda s, b, h, q, k: s + 0.125 * sum(torch.cos((q - k) / 10000.0 ** (i / 8)) for i in range(8))),
])
def test_gallery_examples_match_flex_attention(example, score_mod):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    p = attnc.load(os.path.join(EXAMPLES, f"{example}.attn"))
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 40, 40, 16))
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, B=None, H=None, Q_LEN=40, KV_LEN=40, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask)
    got = p(q, k, v, backend="reference")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_kernels_forward_and_backward_match_the_reference():
    p = attnc.compile(ALL)
    q, k, v = qkv(1, 2, 2, 37, 37, 16, seed=2)
    phase = torch.tensor([0.4, -1.1]).requires_grad_(True)
    got = check_fp32(p, q, k, v, {"phase": phase})  # dq, dk, dv and the gradient of `phase`
    assert got["phase"].abs().sum() > 0


def test_derivatives_are_the_textbook_ones():
    x = torch.linspace(-1.3, 1.3, 11, dtype=torch.float64, requires_grad=True)
    for name, fn in (("sin", torch.sin), ("cos", torch.cos), ("tan", torch.tan), ("erf", torch.erf)):
        p = attnc.compile(f"pattern d:\n    score = {name}(score)\n")
        q = x.view(1, 1, 11, 1)
        k = torch.ones(1, 1, 1, 1, dtype=torch.float64)
        v = torch.ones(1, 1, 1, 1, dtype=torch.float64)
        # one key: output is v whatever the score; the LSE is the score itself
        _, lse = p(q, k, v, scale=1.0, backend="reference", return_lse=True)
        (got,) = torch.autograd.grad(lse.sum(), [x])
        (want,) = torch.autograd.grad(fn(x).sum(), [x])
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("name", ["sin", "cos", "tan", "erf"])
def test_interval_rules_are_sound_and_tight(name):
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(400, generator=g, dtype=torch.float64) * 20 - 10
    width = torch.rand(400, generator=g, dtype=torch.float64) ** 3 * 8
    hi = lo + width
    iv = ops.TABLE[name].interval(None, Iv(lo, hi))
    t = torch.linspace(0, 1, 2001, dtype=torch.float64).view(1, -1)
    values = getattr(torch, name)(lo.view(-1, 1) + t * width.view(-1, 1))
    vmin, vmax = values.min(1).values, values.max(1).values
    assert bool((iv.lo <= vmin + 1e-12).all() and (iv.hi >= vmax - 1e-12).all()), "unsound"
    if name == "tan":  # tight wherever no pole is inside
        bounded = torch.isfinite(iv.lo)
        assert bounded.sum() > 100
        assert torch.allclose(iv.lo[bounded], vmin[bounded], atol=1e-3)
        assert torch.allclose(iv.hi[bounded], vmax[bounded], atol=1e-3)
    else:  # tight up to the sampling
        assert torch.allclose(iv.lo, vmin, atol=1e-3) and torch.allclose(iv.hi, vmax, atol=1e-3)
    unbounded = ops.TABLE[name].interval(None, Iv(torch.tensor([-math.inf]), torch.tensor([0.0])))
    assert bool(unbounded.lo <= -1 if name != "erf" else unbounded.lo == -1)


def test_layouts_of_trigonometric_masks_are_sound():
    p = attnc.compile("pattern wave(f: float = 0.05):\n    mask q >= k\n"
                      "    mask cos(f * (q - k)) > 0.0 or q - k < 4\n")
    lay, got, exact = compare(p, 256, 256, 16, 16, f=0.05)
    assert_sound(got, exact)
    assert bool((got == 0).any()) and bool((got == 2).any())  # the rule proves EMPTY and FULL tiles
