"""Integer bit operators (`& | ^ ~ << >>`, Python semantics) and `any(...)` / `all(...)` over
static ranges: the reference against formulas written here, the kernels (interpreter) against the
reference, the analysis (interval rules sound, layouts sound, `any` exact as an `or`), the
parser and checker's errors, and a Morton-ordered neighbourhood against FlexAttention."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.lowering import ops
from attnc.lowering.intervals import Iv

from test_backward import check_fp32, qkv
from spec_errors import assert_body_error
from test_sparsity import assert_sound, compare

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")

BITS = """
pattern bits(s: int = 2):
    score += 0.05 * (((q - k) >> 1) & 7) - 0.01 * (~(q - k) | 3) + 0.02 * ((q ^ k) % 5)
    score -= 0.001 * ((q << s) >> 3)
    mask ((q - k) & -4) != 8 and q >= k
"""


def _dense(q, k, v, score_fn, allowed):
    s = score_fn((q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.double()


def test_reference_matches_python_semantics():
    p = attnc.compile(BITS)
    L = 23
    q, k, v = (t.detach().double() for t in qkv(1, 2, 2, L, L, 8))
    # the formula, element by element with Python ints: negative numbers included
    add = torch.zeros(L, L, dtype=torch.float64)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            add[i, j] = (0.05 * (((i - j) >> 1) & 7) - 0.01 * (~(i - j) | 3) + 0.02 * ((i ^ j) % 5)
                         - 0.001 * ((i << 2) >> 3))
            allowed[i, j] = ((i - j) & -4) != 8 and i >= j
    want = _dense(q, k, v, lambda s: s + add, allowed)
    got = p(q, k, v, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_kernels_match_the_reference_forward_and_backward():
    p = attnc.compile(BITS)
    q, k, v = qkv(1, 2, 2, 45, 45, 16, seed=3)
    check_fp32(p, q, k, v, {"s": 3})


def test_long_shifts_in_int32_and_int64_modules():
    # counts past 30 go through helpers that keep an int32 module defined; 40 forces int64
    p = attnc.compile("pattern far(c: int = 31):\n    score += 1e-12 * ((q << c) >> c) + 0.1 * ((q - k) >> c)\n"
                      "    mask q >= k\n")
    q, k, v = qkv(1, 1, 1, 40, 40, 16)
    for c in (30, 31, 40, 62):
        check_fp32(p, q, k, v, {"c": c})


def test_any_and_all_match_their_terms():
    p = attnc.compile("pattern dil(w: int = 4, d: int = 3):\n"
                      "    mask any(q - k == d * i for i in range(w)) and all(k != 5 * j + 1 for j in range(2))\n")
    L = 30
    q, k, v = (t.detach().double() for t in qkv(1, 1, 1, L, L, 8))
    i, j = torch.arange(L).view(L, 1), torch.arange(L).view(1, L)
    allowed = ((i - j == 0) | (i - j == 3) | (i - j == 6) | (i - j == 9)) & (j != 1) & (j != 6)
    got = p(q, k, v, backend="reference")
    want = _dense(q, k, v, lambda s: s, allowed)
    ok = allowed.any(-1)
    assert torch.equal(got[:, :, ~ok], torch.zeros_like(got[:, :, ~ok]))  # empty rows give 0
    torch.testing.assert_close(got[:, :, ok], want[:, :, ok], atol=1e-12, rtol=1e-12)
    qf, kf, vf = qkv(1, 1, 1, 50, 50, 16)
    check_fp32(p, qf, kf, vf, {})


def test_any_over_affine_terms_is_exact_in_the_analysis():
    p = attnc.compile("pattern dil(w: int = 5, d: int = 7):\n    mask any(q - k == d * i for i in range(w))\n")
    for tiles in ((16, 16), (32, 16)):
        lay, got, exact = compare(p, 160, 160, *tiles, w=5, d=7)
        assert torch.equal(got, exact)


@pytest.mark.parametrize("src", [
    "pattern m:\n    mask ((q ^ k) & 8) == 0\n",
    "pattern m:\n    mask (q | 7) - (k | 7) < 9 and (q >> 2) >= (k >> 2)\n",
    "pattern m:\n    mask ~(q - k) < -3 and ((q - k) << 1) < 40\n",
])
def test_layouts_of_bit_masks_are_sound(src):
    p = attnc.compile(src)
    for tiles in ((16, 16), (32, 64)):
        lay, got, exact = compare(p, 150, 130, *tiles)
        assert_sound(got, exact)


@pytest.mark.parametrize("op", ["bitand", "bitor", "bitxor", "lshift", "rshift"])
def test_binary_interval_rules_are_sound(op):
    g = torch.Generator().manual_seed(1)
    fn = {"bitand": torch.bitwise_and, "bitor": torch.bitwise_or, "bitxor": torch.bitwise_xor,
          "lshift": torch.bitwise_left_shift, "rshift": torch.bitwise_right_shift}[op]
    for _ in range(200):
        a_lo = int(torch.randint(-300, 300, (), generator=g))
        a_hi = a_lo + int(torch.randint(0, 200, (), generator=g))
        if op in ("lshift", "rshift"):
            b_lo = int(torch.randint(0, 8, (), generator=g))
            b_hi = b_lo + int(torch.randint(0, 4, (), generator=g))
        else:
            b_lo = int(torch.randint(-300, 300, (), generator=g))
            b_hi = b_lo + int(torch.randint(0, 200, (), generator=g))
        iv = ops.TABLE[op].interval(None, Iv(torch.tensor(float(a_lo)), torch.tensor(float(a_hi))),
                                    Iv(torch.tensor(float(b_lo)), torch.tensor(float(b_hi))))
        a = torch.arange(a_lo, a_hi + 1).view(-1, 1)
        b = torch.arange(b_lo, b_hi + 1).view(1, -1)
        values = fn(a, b)
        assert iv.lo <= values.min() and iv.hi >= values.max(), (op, a_lo, a_hi, b_lo, b_hi)
    inv = ops.TABLE["invert"].interval(None, Iv(torch.tensor(-5.0), torch.tensor(9.0)))
    assert (float(inv.lo), float(inv.hi)) == (-10.0, 4.0)


def test_morton_neighborhood_matches_flex_attention_and_its_layout_is_sound():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    p = attnc.load(os.path.join(EXAMPLES, "morton_neighborhood.attn"))
    L, bits, r = 256, 4, 1

    def decode(x, parity):
        return sum(((x >> (2 * i + parity)) & 1) << i for i in range(bits))

    def mask_mod(b, h, qi, ki):
        return ((decode(qi, 0) - decode(ki, 0)).abs() <= r) & ((decode(qi, 1) - decode(ki, 1)).abs() <= r)

    q, k, v = (t.detach() for t in qkv(1, 2, 2, L, L, 16))
    block = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = flex_attention(q, k, v, block_mask=block)
    torch.testing.assert_close(p(q, k, v, backend="reference", bits=bits, r=r), want, atol=2e-6, rtol=2e-5)
    lay, got, exact = compare(p, L, L, 32, 32, bits=bits, r=r)
    assert_sound(got, exact)
    assert bool((got == 0).any())


@pytest.mark.parametrize("src,message", [
    ("    mask (q >= k) & (k < 3)\n", "`&` is a bit operator on ints"),
    ("    mask q >= k && k < 3\n", "`&&` is not an operator"),
    ("    mask q >= k || k < 3\n", "`||` is not an operator"),
    ("    mask ~(q >= k)\n", "`~` (bitwise not) needs an int"),
    ("    score += 1.5 & 1\n", "`&` is a bit operator on ints"),
    ("    mask q << k > 0\n", "the count of `<<` must be known"),
    ("    mask sum(q > i for i in range(3))\n", "`sum` needs numbers, not booleans"),
    ("    mask any(q - i for i in range(3))\n", "`any` needs booleans, not int"),
    ("    mask q < 0x10000000000000000\n", "does not fit in 64 bits"),
])
def test_mistakes_are_spec_errors(src, message):
    assert_body_error(src, message)


def test_a_shift_count_out_of_range_is_an_error_at_the_call():
    p = attnc.compile("pattern s(c: int = 3):\n    score += 0.1 * (q << c)\n", path="s.attn")
    q = k = v = torch.randn(1, 1, 4, 8)
    for c in (-1, 63):
        with pytest.raises(attnc.SpecError, match=f"shift count {c} is outside 0..62") as e:
            p(q, k, v, c=c, backend="reference")
        assert "s.attn:2:" in str(e.value)


def test_printer_round_trips_bit_operators_with_their_precedence():
    from attnc.dsl.parser import parse
    from attnc.dsl.printer import print_module
    src = ("pattern p:\n    mask (q | k ^ 3 & q << 1 >> 2) == (~q & (k | 1)) and any(k == i for i in range(2))"
           " and all(q != i for i in range(0x3))\n")
    m = parse(src)
    assert parse(print_module(m)) == m
    assert "q | k ^ 3 & q << 1 >> 2" in print_module(m)
    # inside a comparison chain a bit operation prints in parentheses, which the parser requires
    from attnc.dsl import ast as A
    chain = A.Compare(("<=", "<"), (A.Num(0), A.Binary("&", A.Name("q"), A.Name("k")), A.Name("q")))
    m = A.Module((), (A.Pattern("p", (), (A.Mask(chain),)),))
    assert "0 <= (q & k) < q" in print_module(m) and parse(print_module(m)) == m
