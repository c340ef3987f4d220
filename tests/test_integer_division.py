"""Integer `//` and `%` by zero are defined, the same on every backend: `x // 0 == 0` and
`x % 0 == x` (so `x == (x // d) * d + x % d` still holds), in constant folding, the reference
interpreter and the generated kernels (docs/language.md).

Runs the kernels under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)
or on a GPU, where a hardware division by zero would otherwise give garbage.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import attnc  # noqa: E402

KERNELS = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                             reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# divisors that are 0 somewhere at run time: a tensor, a position difference, a size expression
SOURCE = ("pattern p(c: int = 0):\n"
          "    tensor d: int[k_len]\n"
          "    score += (q // d[k]) * 0.25 - (q % d[k]) * 0.5\n"
          "    score += ((q - 9) // (k - q)) * 0.125 + ((q + 3) % (k - 5)) * 0.0625\n"
          "    score += (k // (q_len - 20)) * 0.5 + (k % (q_len - 20)) * 0.25 + (q // c + q % c) * 0.03125\n"
          "    mask (q * 7) % (k - 3 * (k // 3)) != 1\n")


def _divmod0(a, b):
    """Python's floor `//` and `%`, with x // 0 == 0 and x % 0 == x: the language's rule."""
    safe = torch.where(b == 0, torch.ones_like(b), b)
    return (torch.where(b == 0, 0, torch.div(a, safe, rounding_mode="floor")),
            torch.where(b == 0, a, torch.remainder(a, safe)))


def _inputs(L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    d = torch.tensor([0, 1, -2, 3, 0, 5, -1, 0, 2, 0, 3, 0, 4, 0, 5, 0, -3, 0, 7, 0])[:L]
    return q, k, v, d


def _dense(q, k, v, d, c=0):
    """The pattern's meaning written out in torch."""
    L = q.shape[2]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    dk = d[None, :].expand(L, L)
    s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    fd, md = _divmod0(i.expand(L, L), dk)
    s = s + fd * 0.25 - md * 0.5
    s = s + _divmod0(i - 9, j - i)[0] * 0.125 + _divmod0(i + 3, (j - 5).expand(L, L))[1] * 0.0625
    lq = torch.full((L, L), L - 20)
    fk, mk = _divmod0(j.expand(L, L), lq)
    s = s + fk * 0.5 + mk * 0.25
    fc, mc = _divmod0(i.expand(L, L), torch.full((L, L), c))
    s = s + (fc + mc) * 0.03125
    allowed = _divmod0(i * 7, j - 3 * (j // 3))[1] != 1
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ v.double()).float()


def test_the_reference_defines_division_by_zero():
    p = attnc.compile(SOURCE, path="div0.attn")
    q, k, v, d = _inputs()
    torch.testing.assert_close(p(q, k, v, d=d, backend="reference"), _dense(q, k, v, d), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p(q, k, v, d=d, c=3, backend="reference"), _dense(q, k, v, d, c=3),
                               atol=1e-5, rtol=1e-5)


@KERNELS
@pytest.mark.parametrize("c", [0, 3])
def test_kernels_agree_with_the_reference_on_division_by_zero(c):
    p = attnc.compile(SOURCE, path="div0.attn")
    q, k, v, d = (t.to(DEVICE) for t in _inputs())
    want = p(q, k, v, d=d, c=c, backend="reference")
    got = p(q, k, v, d=d, c=c, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_constant_division_by_zero_folds():
    # `3 // 0 + 2` sizes a tensor (folded before any call), `7 % 0` bounds a sum
    p = attnc.compile("pattern p:\n"
                      "    tensor t: float[3 // 0 + 2]\n"
                      "    score += t[1] + sum(1.0 for i in range(7 % 0))\n")
    assert p(*_inputs()[:3], t=torch.zeros(2)).shape == (1, 2, 20, 16)
    text = attnc.compile("pattern p(n: int = 0):\n    mask q // 0 == k % 0 or q // n == 0\n").ir_text()
    assert "mask ((0 == k) or ((q // $n) == 0))" in text
