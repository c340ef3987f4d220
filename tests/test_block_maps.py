"""Block maps: tensor reads indexed by both a query and a key expression (`blocks[h, q // 64,
k // 64]`, `ancestor[q, k]`) are summarized per tile over the box of indices the tile reaches.

Layouts are compared with brute force (exact where the map's granularity and the tile agree,
sound always), the kernels with the reference, and the examples with FlexAttention."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.lowering import sparsity

from test_backward import check_fp32, qkv
from test_sparsity import assert_sound, compare

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")

MAP = """
pattern block_map(g: int = 32):
    tensor blocks: bool[batch, heads, (q_len + g - 1) // g, (k_len + g - 1) // g]
    mask blocks[b, h, q // g, k // g]
"""


def _blocks(B, H, Lq, Lk, g, seed=0, p=0.4):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, -(-Lq // g), -(-Lk // g), generator=gen) < p


@pytest.mark.parametrize("tiles", [(32, 32), (64, 64), (16, 32), (64, 16)])
@pytest.mark.parametrize("shape", [(256, 256), (200, 136)])
def test_block_map_layout_is_exact_when_the_granularity_fits_the_tiles(tiles, shape):
    p = attnc.compile(MAP)
    Lq, Lk = shape
    blocks = _blocks(2, 3, Lq, Lk, 32)
    lay, got, exact = compare(p, Lq, Lk, *tiles, B=2, H=3, g=32, blocks=blocks)
    assert torch.equal(got, exact)
    assert lay.tiers == ["data"]


@pytest.mark.parametrize("tiles", [(16, 16), (64, 64), (32, 64)])
def test_block_map_with_another_granularity_is_sound(tiles):
    p = attnc.compile(MAP)
    blocks = _blocks(1, 2, 240, 240, 24, seed=1, p=0.3)
    lay, got, exact = compare(p, 240, 240, *tiles, B=1, H=2, g=24, blocks=blocks)
    assert_sound(got, exact)
    assert bool((got == sparsity.EMPTY).any())  # still proves something


def test_tree_mask_is_sound_and_finds_empty_tiles():
    p = attnc.load(os.path.join(EXAMPLES, "tree_mask.attn"))
    L = 192
    parent = [max(0, i - 1 - (i % 5) * 7) for i in range(L)]  # a bushy tree over 192 tokens
    anc = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        j = i
        while True:
            anc[i, j] = True
            if j == 0:
                break
            j = parent[j]
    lay, got, exact = compare(p, L, L, 32, 32, ancestor=anc)
    assert_sound(got, exact)
    assert bool((got == sparsity.EMPTY).any()) and bool((exact == sparsity.EMPTY).sum() == (got == sparsity.EMPTY).sum())


def test_block_map_and_causal_compose():
    p = attnc.load(os.path.join(EXAMPLES, "block_sparse.attn"))
    blocks = _blocks(1, 2, 256, 256, 64, seed=3, p=0.5)[0]
    lay, got, exact = compare(p, 256, 256, 64, 64, B=1, H=2, block_size=64, blocks=blocks)
    assert torch.equal(got, exact)


def test_too_large_a_reduction_stays_unbounded_and_sound(monkeypatch):
    monkeypatch.setattr(sparsity, "MAX_MAP_ELEMENTS", 16)
    p = attnc.compile(MAP)
    blocks = _blocks(1, 1, 128, 128, 32, seed=4)
    lay, got, exact = compare(p, 128, 128, 32, 32, g=32, blocks=blocks)
    assert_sound(got, exact)
    assert bool((got == sparsity.PARTIAL).all())  # nothing proven, nothing wrong


def test_kernels_follow_the_block_map_layout():
    p = attnc.compile(MAP)
    q, k, v = qkv(2, 2, 2, 70, 70, 16)
    blocks = _blocks(2, 2, 70, 70, 16, seed=5, p=0.5)
    blocks[..., 0] = True  # every row keeps a key
    check_fp32(p, q, k, v, {"g": 16, "blocks": blocks}, tiles=(16, 16))


@pytest.mark.parametrize("example", ["block_sparse", "tree_mask"])
def test_examples_match_flex_attention(example):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    p = attnc.load(os.path.join(EXAMPLES, f"{example}.attn"))
    L = 96
    q, k, v = (t.detach() for t in qkv(1, 2, 2, L, L, 16))
    gen = torch.Generator().manual_seed(6)
    if example == "block_sparse":
        blocks = torch.rand(2, 2, 2, generator=gen) < 0.6
        blocks[:, :, 0] = True
        args = {"block_size": 64, "blocks": blocks}
        mask_mod = lambda b, h, qi, ki: blocks[h, qi // 64, ki // 64] & (qi >= ki)  # noqa: E731
    else:
        anc = (torch.rand(L, L, generator=gen) < 0.3).tril()
        anc.fill_diagonal_(True)
        args = {"ancestor": anc}
        mask_mod = lambda b, h, qi, ki: anc[qi, ki]  # noqa: E731
    mask = create_block_mask(mask_mod, B=None, H=2, Q_LEN=L, KV_LEN=L, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = flex_attention(q, k, v, block_mask=mask)
    got = p(q, k, v, backend="reference", **args)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
