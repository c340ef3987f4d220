"""k and v of batch 1 serve every query batch (a shared prefix, one cache for several
continuations): the same outputs and LSE as the expanded tensors, dK and dV summed over the
batch, on both backends; any other batch mismatch is a ValueError naming the shapes."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc

from test_backward import qkv


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name,args", [("causal", {}), ("alibi", {"slopes": torch.tensor([0.3, 0.1, 0.5, 0.2])}),
                                       ("learned_sinks", {"sinks": torch.tensor([0.5, -1.0, 0.0, 2.0])})])
def test_batch_one_kv_equals_the_expanded_kv(backend, name, args):
    p = attnc.std(name)
    q, _, _ = qkv(3, 4, 2, 19, 23, 16)
    _, k1, v1 = qkv(1, 4, 2, 19, 23, 16, seed=1)  # one cache, GQA 4:2
    k1, v1 = k1.detach().requires_grad_(), v1.detach().requires_grad_()
    out, lse = p(q, k1, v1, backend=backend, return_lse=True, **args)
    kx, vx = (t.detach().expand(3, -1, -1, -1).clone().requires_grad_() for t in (k1, v1))
    want_out, want_lse = p(q, kx, vx, backend=backend, return_lse=True, **args)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    dq, dk, dv = torch.autograd.grad((out * w).sum() + lse.sum(), [q, k1, v1])
    wq, wk, wv = torch.autograd.grad((want_out * w).sum() + want_lse.sum(), [q, kx, vx])
    assert dk.shape == k1.shape and dv.shape == v1.shape
    torch.testing.assert_close(dq, wq, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dk, wk.sum(0, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dv, wv.sum(0, keepdim=True), atol=1e-5, rtol=1e-4)


def test_other_batch_mismatches_name_both_shapes():
    p = attnc.std("causal")
    q = torch.randn(3, 2, 8, 16)
    k = v = torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match=r"batch sizes differ: q \[3, 2, 8, 16\], k \[2, 2, 8, 16\]"):
        p(q, k, v)
    with pytest.raises(ValueError, match="batch sizes differ"):
        p(q, torch.randn(1, 2, 8, 16), torch.randn(3, 2, 8, 16))


def test_batch_one_kv_under_torch_compile():
    p = attnc.std("causal")
    q = torch.randn(2, 2, 12, 16)
    k = v = torch.randn(1, 2, 12, 16)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, k, v):
        return p(q, k, v, backend="triton")

    torch.testing.assert_close(f(q, k, v), p(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                                                backend="reference"), atol=1e-6, rtol=1e-5)
