"""Paged KV caches: ``p(q, k_pages, v_pages, block_table=..., k_lens=...)``.

Pools of pages in shuffled order, page sizes 16 and 64, against the same call on the
contiguous cache (and so against the reference); the kernels gather the pages themselves.
"""
from __future__ import annotations

import pytest
import torch

import attnc
from attnc.runtime import dispatch

from decoding import DEVICE, needs_kernels, qkv

def paged(k, v, page: int, seed: int = 0, spare: int = 3):
    """The contiguous cache k, v [B, Hkv, L, D] (L a multiple of `page`) as page pools in a
    shuffled order (with `spare` unused pages), and its block table."""
    B, Hkv, L, _D = k.shape
    n = L // page
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(B * n + spare, generator=gen)[:B * n].to(k.device)
    table = order.view(B, n).to(torch.int32)

    def pool(t):
        out = torch.randn(B * n + spare, Hkv, page, t.shape[-1], generator=gen).to(t.device, t.dtype)
        out[order] = t.view(B, Hkv, n, page, -1).permute(0, 2, 1, 3, 4).reshape(B * n, Hkv, page, -1)
        return out
    return pool(k), pool(v), table


CASES = [  # (pattern, arguments, page, q_len, pages per sequence, k_lens, heads, kv_heads, splits)
    ("causal", {}, 16, 1, 12, [192, 77], 8, 2, 1),
    ("streaming", {"window": 40, "sinks": 4}, 64, 1, 5, [320, 150], 4, 1, 1),
    ("alibi", {"slopes": "heads"}, 16, 3, 9, [144, 20], 4, 4, 1),
    ("topk", {"top": 6}, 64, 2, 3, [192, 70], 4, 2, 1),
    ("sigmoid", {}, 16, 4, 6, [96, 40], 4, 2, 1),
    ("document", {"doc": "ids"}, 16, 2, 8, [128, 50], 4, 2, 1),
    ("causal", {}, 64, 1, 4, [256, 100], 8, 2, 3),
    ("topk", {"top": 5}, 16, 1, 8, [128, 33], 4, 2, 2),
]


@needs_kernels
@pytest.mark.parametrize("name,args,page,Lq,n,lens,H,Hkv,splits", CASES,
                         ids=[f"{c[0]}-page{c[2]}-q{c[3]}-s{c[8]}" for c in CASES])
def test_paged_equals_contiguous(name, args, page, Lq, n, lens, H, Hkv, splits):
    B = len(lens)
    q, k, v = qkv(B, H, Hkv, Lq, n * page)
    gen = torch.Generator().manual_seed(1)
    args = dict(args)
    for key, x in args.items():
        if x == "heads":
            args[key] = (torch.rand(H, generator=gen) * 0.3).to(DEVICE)
        elif x == "ids":
            args[key] = torch.randint(0, 3, (B, n * page), generator=gen).sort(-1).values.to(DEVICE)
    k_lens = torch.tensor(lens, device=DEVICE)
    args.update(q_start=k_lens - Lq, k_lens=k_lens)
    k_pages, v_pages, table = paged(k, v, page)
    p = attnc.std(name)
    opts = {"forward": {"splits": splits}} if splits > 1 else None
    got = p(q, k_pages, v_pages, block_table=table, backend="triton", kernel_options=opts, **args)
    want = p(q.double(), k.double(), v.double(), backend="reference", **args)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    ref = p(q, k_pages, v_pages, block_table=table, backend="reference", **args)
    torch.testing.assert_close(ref.double(), want, rtol=2e-5, atol=2e-5)


@needs_kernels
def test_paged_calls_reuse_their_launch_and_read_the_new_table():
    q, k, v = qkv(2, 4, 2, 1, 64)
    k_pages, v_pages, table = paged(k, v, 16)
    p = attnc.std("causal")
    kw = {"q_start": 63, "backend": "triton"}
    first = p(q, k_pages, v_pages, block_table=table, **kw)
    swapped = table.flip(0).contiguous()   # sequence 0 now reads sequence 1's pages
    second = p(q, k_pages, v_pages, block_table=swapped, **kw)
    torch.testing.assert_close(second, p(q, k.flip(0), v.flip(0), **kw))
    assert not torch.equal(first, second)


def test_paged_lse_and_empty_sequences():
    q, k, v = qkv(2, 2, 2, 1, 32, torch.float64)
    k_pages, v_pages, table = paged(k, v, 16)
    out, lse = attnc.std("causal")(q, k_pages, v_pages, block_table=table,
                                   k_lens=torch.tensor([32, 0]), q_start=torch.tensor([31, 0]),
                                   return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


@pytest.mark.parametrize("make,match", [
    (lambda k, v, t: (k[..., :8, :], v[..., :8, :], t), r"page size .* multiple of 16, got 8"),
    (lambda k, v, t: (k, v[:-1], t), r"`k` and `v` page pools differ"),
    (lambda k, v, t: (k, v, t.float()), r"`block_table` must have int elements"),
    (lambda k, v, t: (k, v, t[:1]), r"`block_table` has 1 rows; q has batch 2"),
    (lambda k, v, t: (k, v, t + 100), r"`block_table` names page 1\d\d; the pools have \d+ pages"),
    (lambda k, v, t: (k[0], v[0], t), r"`k` must be a page pool"),
])
def test_bad_paged_calls_are_value_errors(make, match):
    q, k, v = qkv(2, 2, 2, 1, 32)
    k_pages, v_pages, table = paged(k, v, 16)
    kp, vp, t = make(k_pages, v_pages, table)
    with pytest.raises(ValueError, match=match):
        attnc.std("causal")(q, kp, vp, block_table=t, q_start=31)


def test_paged_calls_are_forward_only():
    q, k, v = qkv(2, 2, 2, 1, 32)
    k_pages, v_pages, table = paged(k, v, 16)
    q.requires_grad_()
    with pytest.raises(ValueError, match="for inference and has no backward"):
        attnc.std("causal")(q, k_pages, v_pages, block_table=table, q_start=31)
    with torch.no_grad():
        attnc.std("causal")(q, k_pages, v_pages, block_table=table, q_start=31)


def test_static_checks_see_paged_launches():
    """The paged forward binds its block table and page size (runtime/aot.py compiles it in
    tests/test_gpu_compile.py)."""
    from attnc.runtime import aot
    shape = {"batch": 2, "heads": 8, "kv_heads": 2, "q_len": 1, "k_len": 512, "head_dim": 64, "v_dim": 64}
    launches = aot.forward_launches(attnc.std("causal"), shape, torch.bfloat16, {}, True,
                                    page_size=64, placed=True)
    (fwd,) = [L for L in launches if L.name == "attn_fwd"]
    assert fwd.meta["PAGE"] == 64
    names = [a.name for a in dispatch.forward_kernel(attnc.std("causal").ir, {}, False, True)
             .kernel.signature("attn_fwd").args]
    table = fwd.args[names.index("Table")]
    assert tuple(table.shape) == (2, 8) and table.dtype == torch.int32


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernels)])
def test_paged_decoding_under_torch_compile(backend):
    """A compiled decode step on a paged cache: one graph, the block table an op argument."""
    q, k, v = qkv(2, 4, 2, 1, 64)
    k_pages, v_pages, table = paged(k, v, 16)
    p = attnc.std("streaming")

    def step(q, k_pages, v_pages, table, k_lens):
        return p(q, k_pages, v_pages, block_table=table, q_start=k_lens - 1, k_lens=k_lens,
                 window=20, sinks=2, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for lens in ([64, 30], [40, 9]):
            k_lens = torch.tensor(lens, device=DEVICE)
            got = compiled(q, k_pages, v_pages, table, k_lens)
            want = p(q, k, v, q_start=k_lens - 1, k_lens=k_lens, window=20, sinks=2,
                     backend="reference")
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
