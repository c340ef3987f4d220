"""`select topk(n)`'s threshold pass (skeletons/common.py.in: `_topk_merge`) under the interpreter:
both ways of merging a tile (one candidate at a time, and the bitonic top-k for tiles with many
candidates) against the reference, with ties, short rows, counts that are not powers of two and
counts wider than a key tile."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.runtime import policy

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOPK = "pattern t(top: int = 5):\n    mask q >= k\n    select topk(top)\n"
TIES = ("pattern ties(top: int = 5):\n    score = floor(score * 2.0) * 1.0\n    mask q >= k\n"
        "    select topk(top)\n")


def _qkv(L, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, L, D, generator=g).to(dtype).to(DEVICE) for _ in range(3))


def _check(spec, L, top, tiles, dtype=torch.float32):
    p = attnc.compile(spec)
    q, k, v = _qkv(L, dtype=dtype)
    with policy.tile_override(*tiles):
        out, lse = p(q, k, v, top=top, backend="triton", return_lse=True)
    ref, ref_lse = p(q, k, v, top=top, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("top, L", [(1, 70), (5, 100), (16, 64)])
def test_threshold_matches_the_reference(top, L):
    """Long causal rows: early tiles have many candidates (bitonic merge), later ones few
    (one at a time); rows shorter than `top` keep every key."""
    _check(TOPK, L, top, (16, 16))


def test_ties_are_kept_as_the_reference_keeps_them():
    """floor(2s) makes many equal scores: the TOPK-th largest counts multiplicity."""
    _check(TIES, 90, 6, (16, 16))


def test_a_count_wider_than_the_key_tile_widens_the_tile():
    """top=20 needs a 32-wide threshold buffer: the launch takes 32-key tiles although 16 were
    asked for (Constraints.min_block_n)."""
    p = attnc.compile(TOPK)
    from attnc.runtime import jit
    compiled = jit.forward_kernel(p.ir, {"top": 20})
    assert compiled.kernel.constraints.min_block_n == 32
    _check(TOPK, 80, 20, (16, 16))


def test_gradients_flow_through_the_kept_keys_only():
    p = attnc.compile(TIES)
    q, k, v = (t.requires_grad_(True) for t in _qkv(50))
    with policy.tile_override(16, 16):
        out = p(q, k, v, top=4, backend="triton")
        got = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = p(q, k, v, top=4, backend="reference")
    want = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
