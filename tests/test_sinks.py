"""Learned attention sinks: `normalize softmax(sink = e)` — one more logit per query row in the
softmax denominator, attending to nothing.

Checked against an explicit formula (an extra softmax column with no value), on both backends
(the Triton kernels under the interpreter), with gradients for the tensors the sink reads.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.lowering.derivative import differentiable_tensors, sink_tensors
from attnc.lowering.printer import canonical_text, format_pattern

from spec_errors import assert_body_error
from test_backward import assert_grads_close, gradients, qkv

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")

#: the sink reads a tensor, a float parameter and the query position; the same tensor also
#: reaches the score, so its gradient has a kernel part and a per-row part
RICH = """
pattern rich(offset: float = 0.25, cut: int = 9):
    tensor sinks: float[heads]
    tensor bias: float[heads]
    score += bias[h] * 0.1
    mask q >= k
    mask q < cut or k > 1000        # rows from `cut` on see no key: they keep only the sink
    normalize softmax(sink = sinks[h] + bias[h] + offset * (q % 3))
"""


def formula(q, k, v, sink, allowed, score_add=None):
    """fp64 attention with an extra column `sink` [B, H, Lq] in the softmax; (out, lse)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if score_add is not None:
        s = s + score_add
    s = s.masked_fill(~allowed, float("-inf"))
    full = torch.cat([s, sink.double()[..., None]], dim=-1)
    lse = torch.logsumexp(full, dim=-1)
    p = torch.exp(full - lse[..., None])[..., :-1]
    return p @ v, lse


def rich_formula(q, k, v, sinks, bias, offset=0.25, cut=9):
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    qi, ki = torch.arange(Lq).view(Lq, 1), torch.arange(Lk).view(1, Lk)
    allowed = (qi >= ki) & ((qi < cut) | (ki > 1000))
    sink = (sinks.double() + bias.double()).view(1, H, 1) + offset * (torch.arange(Lq) % 3).view(1, 1, Lq)
    return formula(q, k, v, sink.expand(B, H, Lq), allowed, bias.double().view(1, H, 1, 1) * 0.1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 13, 13), (1, 2, 1, 11, 19)], ids=["gqa-square", "rect"])
def test_sink_matches_the_formula_and_empty_rows_keep_only_the_sink(backend, shape):
    B, H, Hkv, Lq, Lk = shape
    p = attnc.compile(RICH)
    q, k, v = qkv(B, H, Hkv, Lq, Lk, 16)
    g = torch.Generator().manual_seed(3)
    sinks, bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
    out, lse = p(q, k, v, sinks=sinks, bias=bias, backend=backend, return_lse=True)
    want_out, want_lse = rich_formula(q, k, v, sinks, bias)
    torch.testing.assert_close(out.double(), want_out, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=2e-5)
    # rows from `cut` on allow no key: output exactly 0 and LSE exactly the sink
    assert torch.equal(out[:, :, 9:], torch.zeros_like(out[:, :, 9:]))
    sink = (sinks + bias).view(1, H, 1) + 0.25 * (torch.arange(Lq) % 3).view(1, 1, Lq)
    torch.testing.assert_close(lse[:, :, 9:], sink.expand(B, H, Lq)[:, :, 9:], atol=1e-6, rtol=0)


def test_sink_gradients_match_the_formula():
    """Both backends' gradients (q, k, v and both tensors, with an LSE term) against autograd
    through the formula in fp64."""
    p = attnc.compile(RICH)
    B, H, Hkv, Lq, Lk = 2, 4, 2, 13, 16
    q, k, v = qkv(B, H, Hkv, Lq, Lk, 16)
    g = torch.Generator().manual_seed(4)
    args = {"sinks": torch.randn(H, generator=g).requires_grad_(), "bias": torch.randn(H, generator=g).requires_grad_()}
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, args["sinks"], args["bias"])]
    out, lse = rich_formula(*leaves)
    gen = torch.Generator().manual_seed(1)  # the weights `gradients` uses
    w = torch.randn(out.shape, generator=gen).double()
    wl = torch.randn(lse.shape, generator=gen).double()
    want = dict(zip(["q", "k", "v", "sinks", "bias"],
                    torch.autograd.grad((out * w).sum() + (lse * wl).sum(), leaves)))
    for backend in ("reference", "triton"):
        got = gradients(p, q, k, v, args, backend, with_lse=True)
        assert_grads_close(got, want)
    assert sink_tensors(p.ir) == ["bias", "sinks"] and differentiable_tensors(p.ir) == ["bias"]


def test_stdlib_learned_sinks_with_broadcast_and_non_contiguous_inputs():
    p = attnc.std("learned_sinks")
    B, H, L = 2, 3, 21
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(B, H, H, L, L, 16))
    assert not q.is_contiguous()
    one = torch.tensor([0.7])  # size 1 in the `heads` dim: broadcast
    qi = torch.arange(L)
    want_out, want_lse = formula(q, k, v, torch.full((B, H, L), 0.7), qi.view(L, 1) >= qi.view(1, L))
    for backend in ("reference", "triton"):
        out, lse = p(q, k, v, sinks=one, backend=backend, return_lse=True)
        torch.testing.assert_close(out.double(), want_out, atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=2e-5)
        leaf = one.clone().requires_grad_()
        (d,) = torch.autograd.grad(p(q, k, v, sinks=leaf, backend=backend).sum(), [leaf])
        assert d.shape == (1,) and d.item() != 0.0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_keys_at_all_gives_the_sink(backend):
    p = attnc.std("learned_sinks")
    q = torch.randn(1, 2, 5, 16)
    k = v = torch.randn(1, 2, 0, 16)
    sinks = torch.tensor([0.5, -1.5], requires_grad=True)
    out, lse = p(q, k, v, sinks=sinks, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sinks.detach().view(1, 2, 1).expand(1, 2, 5))
    (d,) = torch.autograd.grad(lse.sum(), [sinks])  # the sink holds all the mass: d lse / d sink = 1
    assert torch.equal(d, torch.full((2,), 5.0))


def test_low_precision_within_the_reference_error():
    p = attnc.std("learned_sinks")
    B, H, L = 1, 2, 40
    sinks = torch.tensor([1.0, 3.0])  # large enough to take real mass
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (t.detach() for t in qkv(B, H, H, L, L, 32, dtype=dtype, seed=5))
        exact = p(q.double(), k.double(), v.double(), sinks=sinks.double(), backend="reference")
        ref = p(q, k, v, sinks=sinks, backend="reference")
        got = p(q, k, v, sinks=sinks, backend="triton")
        ref_err = (ref.double() - exact).abs().max().item()
        got_err = (got.double() - exact).abs().max().item()
        assert got_err <= 3 * ref_err + torch.finfo(dtype).eps, (dtype, got_err, ref_err)


def test_sink_under_torch_compile_fullgraph():
    p = attnc.std("learned_sinks")
    q, k, v = qkv(1, 2, 2, 12, 12, 16)
    sinks = torch.tensor([0.3, -0.2], requires_grad=True)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, k, v, sinks):
        return p(q, k, v, sinks=sinks, backend="triton")

    out = f(q, k, v, sinks)
    ref = p(q, k, v, sinks=sinks, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    got = torch.autograd.grad(out.square().sum(), [q, sinks])
    want = torch.autograd.grad(ref.square().sum(), [q, sinks])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_sink_is_part_of_the_pattern_identity():
    plain = attnc.compile("pattern a():\n    mask q >= k\n")
    sunk = attnc.compile("pattern a():\n    mask q >= k\n    normalize softmax(sink = 1.5)\n")
    assert "sink" in canonical_text(sunk.ir) and "sink" not in canonical_text(plain.ir)
    assert plain.digest != sunk.digest
    assert "normalize softmax(sink = 1.5)" in format_pattern(sunk.ir)
    # used from another pattern, the sink comes along
    outer = attnc.compile("pattern s():\n    normalize softmax(sink = 1.5)\n"
                          "pattern o():\n    use s\n    mask q >= k\n", name="o")
    assert outer.ir.sink is not None


@pytest.mark.parametrize("body,message", [
    ("    normalize softmax(sink = q - k)\n", "may not depend on the key position `k`"),
    ("    normalize softmax(sink = score)\n", "score"),
    ("    normalize sigmoid(sink = 1.0)\n", "`sigmoid` takes only keyword arguments `bias`"),
    ("    normalize softmax(bias = 1.0)\n", "`softmax` takes only keyword arguments `sink`"),
    ("    normalize softmax(sink = q > 3)\n", "must be a number"),
])
def test_sink_mistakes_are_spec_errors(body, message):
    assert_body_error(body, message)
