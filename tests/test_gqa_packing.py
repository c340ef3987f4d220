"""GQA packing: with fewer queries than a tile's rows (decoding), the query heads that share a
kv head share its forward programs, their rows (query, head) pairs, so each K and V tile is read
once per kv head. Checked against the reference under the interpreter, with the launch grids
that say whether a call was packed.
"""
from __future__ import annotations

import pytest
import torch

import attnc

from decoding import DEVICE, needs_kernels, qkv

pytestmark = needs_kernels


def _arguments(name, H, gen):
    if name in ("alibi", "learned_sinks"):  # per-head tensors: each packed row reads its own
        key = "slopes" if name == "alibi" else "sinks"
        return {key: (torch.rand(H, generator=gen) * 0.3).to(DEVICE)}
    if name == "streaming":
        return {"window": 40, "sinks": 3}
    if name == "sliding_window":
        return {"window": 50}
    return {}


CASES = [  # (pattern, heads, kv_heads, q_len, k_len, k_lens, splits)
    ("causal", 8, 1, 1, 300, [300, 41], 1),
    ("causal", 8, 2, 3, 200, [200, 64], 1),
    ("streaming", 8, 2, 1, 400, [400, 77], 1),
    ("alibi", 8, 2, 4, 150, [150, 20], 1),
    ("learned_sinks", 4, 1, 2, 120, [120, 9], 1),
    ("sigmoid", 8, 2, 16, 90, None, 1),
    ("sliding_window", 8, 1, 1, 300, [300, 100], 3),
    ("alibi", 8, 2, 1, 200, [200, 31], 4),
]


@pytest.mark.parametrize("name,H,Hkv,Lq,Lk,lens,splits", CASES,
                         ids=[f"{c[0]}-gqa{c[1] // c[2]}-q{c[3]}-k{c[4]}-s{c[6]}" for c in CASES])
def test_packed_decoding_matches_the_reference(name, H, Hkv, Lq, Lk, lens, splits,
                                               forward_grids):
    B = 2
    q, k, v = qkv(B, H, Hkv, Lq, Lk)
    gen = torch.Generator().manual_seed(1)
    args = _arguments(name, H, gen)
    if lens is not None:
        k_lens = torch.tensor(lens, device=DEVICE)
        args.update(q_start=k_lens - Lq, k_lens=k_lens)
    p = attnc.std(name)
    softmax = p.ir.normalizer == "softmax"
    opts = {"forward": {"splits": splits}} if splits > 1 else None
    got = p(q, k, v, backend="triton", return_lse=softmax, kernel_options=opts, **args)
    want = p(q.double(), k.double(), v.double(), backend="reference", return_lse=softmax, **args)
    got, want = (got, want) if softmax else ((got,), (want,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)
    fwd = dict(forward_grids)["attn_fwd"]
    assert fwd[1] == B * Hkv, "the kv head's query heads share its programs"
    assert fwd[2] == splits


def test_prefill_and_layout_patterns_stay_unpacked(forward_grids):
    """Rows that fill a tile, a pattern without a closed form (documents: the layout's query
    tiles are per query) and top-k (its keep decisions use every pass's tiles) are not packed,
    and still match."""
    B, H, Hkv = 1, 4, 1
    q, k, v = qkv(B, H, Hkv, 64, 64)
    attnc.std("causal")(q, k, v, backend="triton")
    assert dict(forward_grids)["attn_fwd"][1] == B * H
    forward_grids.clear()
    q1 = q[:, :, :2]
    doc = torch.zeros(1, 64, dtype=torch.long, device=DEVICE)
    attnc.std("document")(q1, k, v, doc=doc, q_start=62, backend="triton")
    assert dict(forward_grids)["attn_fwd"][1] == B * H
    forward_grids.clear()
    got = attnc.std("topk")(q1, k, v, top=5, q_start=62, backend="triton")
    assert dict(forward_grids)["attn_fwd"][1] == B * H
    torch.testing.assert_close(got.double(), attnc.std("topk")(
        q1.double(), k.double(), v.double(), top=5, q_start=62, backend="reference"),
        rtol=2e-5, atol=2e-5)


def test_packed_forward_trains():
    """A packed forward's LSE feeds the (unpacked) backward."""
    q, k, v = qkv(1, 4, 1, 2, 70, seed=3)
    p = attnc.std("alibi")
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4], device=DEVICE)
    grads = []
    for backend, dt in (("triton", torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dt, copy=True).requires_grad_() for t in (q, k, v)]
        out = p(*leaves, slopes=slopes.to(dt), q_start=68, backend=backend)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape).to(dt)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
