"""Calling a pattern as a PyTorch user does: torch.compile over changing lengths, the per-call
plan and launch caches, broadcast tensor arguments, and errors raised at the door."""
from __future__ import annotations

import traceback

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import attnc
from attnc.runtime import dispatch


def _qkv(L, B=1, H=2, Hkv=2, D=16, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).requires_grad_(grad)
    k = torch.randn(B, Hkv, L, D, generator=g).requires_grad_(grad)
    v = torch.randn(B, Hkv, L, D, generator=g).requires_grad_(grad)
    return q, k, v


def _grads(out, inputs):
    return torch.autograd.grad(out.square().sum(), inputs)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend,lengths", [("reference", (32, 48, 64)), ("triton", (20, 28, 40))])
@pytest.mark.parametrize("how", ["dynamic", "mark_dynamic"])
def test_compiled_call_takes_every_length_with_one_graph(backend, lengths, how):
    p = attnc.std("alibi")
    slopes = torch.rand(2, requires_grad=True)

    def f(q, k, v):
        return p(q, k, v, slopes=slopes, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter, dynamic=(how == "dynamic") or None)
    for L in lengths:
        q, k, v = _qkv(L)
        if how == "mark_dynamic":
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
        out = compiled(q, k, v)
        want = p(q, k, v, slopes=slopes, backend="reference")
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        for got, ref in zip(_grads(out, (q, k, v, slopes)), _grads(want, (q, k, v, slopes))):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for {len(lengths)} lengths"


def test_compiled_call_without_dynamic_recompiles_once_then_stays_dynamic():
    p = attnc.std("sliding_window")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda q, k, v: p(q, k, v, window=8), fullgraph=True, backend=counter)
    for L in (32, 48, 64, 80):
        q, k, v = _qkv(L)
        out = compiled(q, k, v)
        torch.testing.assert_close(out, p(q, k, v, window=8))
        out.sum().backward()
    assert counter.frame_count == 2  # the second length makes torch mark lengths dynamic


# --------------------------------------------------------------------------- plan caches


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cached_calls_follow_every_argument_change(backend):
    """A call that hits a cached plan (and, on Triton, a prepared launch) still sees a changed
    float parameter, int parameter (0-dim tensor too), scale, stride and tensor content."""
    p = attnc.compile("pattern p(window: int, cap: float = 20.0):\n"
                      "    tensor doc: int[batch, q_len]\n"
                      "    score = cap * tanh(score / cap)\n"
                      "    mask q >= k and q - k < window and doc[b, q] == doc[b, k]\n")
    q, k, v = _qkv(24, grad=False)
    doc = (torch.arange(24) // 10).unsqueeze(0)

    def check(**kw):
        args = dict(window=5, doc=doc)
        args.update(kw)
        ref_args = {n: (x.item() if isinstance(x, torch.Tensor) and x.dim() == 0 else x)
                    for n, x in args.items()}
        qq, kk = args.pop("q", q), args.pop("k", k)
        ref_args.pop("q", None), ref_args.pop("k", None)
        got = p(qq, kk, v, backend=backend, **args)
        want = p(qq.contiguous(), kk.contiguous(), v, backend="reference", **ref_args)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return got

    first = check()
    assert not torch.equal(check(cap=2.0), first)
    assert not torch.equal(check(window=3), first)
    check(window=torch.tensor(7))
    check(window=torch.tensor(2))
    assert not torch.equal(check(scale=0.5), first)
    check(q=q.transpose(2, 3).contiguous().transpose(2, 3))  # same shape, other strides
    check(doc=(torch.arange(24) // 4).unsqueeze(0))
    mutated = doc.clone()
    check(doc=mutated)
    mutated[0, 12:] = 7  # in place: same tensor object, new content
    check(doc=mutated)


def test_a_cached_call_still_raises_for_a_bad_tensor():
    p = attnc.std("alibi")
    q, k, v = _qkv(16, grad=False)
    p(q, k, v, slopes=torch.rand(2))
    with pytest.raises(ValueError, match="slopes"):
        p(q, k, v, slopes=torch.rand(3))
    with pytest.raises(ValueError, match="float"):
        p(q, k, v, slopes=torch.ones(2, dtype=torch.long))


# --------------------------------------------------------------------------- broadcasting


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_size_one_batch_and_heads_dims_broadcast(backend):
    q, k, v = _qkv(20, B=2, H=4, Hkv=2)
    alibi = attnc.std("alibi")
    slopes = torch.rand(1, requires_grad=True)
    got = alibi(q, k, v, slopes=slopes, backend=backend)
    want = alibi(q, k, v, slopes=slopes.expand(4), backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_got, g_want = _grads(got, (q, slopes)), _grads(want, (q, slopes))
    assert g_got[1].shape == (1,)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    document = attnc.std("document")
    doc = (torch.arange(20) >= 9).long().unsqueeze(0)   # [1, q_len] for batch 2
    torch.testing.assert_close(document(q, k, v, doc=doc, backend=backend),
                               document(q, k, v, doc=doc.expand(2, 20), backend="reference"),
                               atol=1e-5, rtol=1e-5)


def test_other_shape_mistakes_keep_their_error():
    q, k, v = _qkv(20, B=2, H=4, Hkv=2, grad=False)
    with pytest.raises(ValueError, match=r"`slopes` must have shape \[heads\] = \[4\] \(size 1"):
        attnc.std("alibi")(q, k, v, slopes=torch.rand(2))
    with pytest.raises(ValueError, match=r"`doc` must have shape \[batch, max\(q_len, k_len\)\] = \[2, 20\]"):
        attnc.std("document")(q, k, v, doc=torch.zeros(1, 19, dtype=torch.long))


# --------------------------------------------------------------------------- errors at the door


def test_nested_tensors_get_a_value_error():
    q = torch.nested.nested_tensor([torch.randn(2, 5, 8), torch.randn(2, 7, 8)], layout=torch.jagged)
    _, k, v = _qkv(5, D=8, grad=False)
    with pytest.raises(ValueError, match="`q` must be a dense .*nested"):
        attnc.std("causal")(q, k, v)
    q, k, v = _qkv(5, D=8, grad=False)
    doc = torch.nested.nested_tensor([torch.zeros(5, dtype=torch.long)], layout=torch.jagged)
    with pytest.raises(ValueError, match="`doc` must be a dense"):
        attnc.std("document")(q, k, v, doc=doc)


@pytest.mark.parametrize("keyword,hint", [("is_causal", "causality is part of a pattern"),
                                          ("enable_gqa", "GQA is automatic"),
                                          ("attn_mask", "mask")])
def test_sdpa_keywords_get_a_hint(keyword, hint):
    q, k, v = _qkv(8, grad=False)
    with pytest.raises(attnc.ArgumentError) as info:
        attnc.std("sliding_window")(q, k, v, window=4, **{keyword: True})
    assert hint in str(info.value)
    assert isinstance(info.value, attnc.SpecError) and isinstance(info.value, TypeError)


def test_cpu_tensors_on_triton_without_the_interpreter_fail_before_the_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as info:
        attnc.std("causal")(q, k, v, backend="triton")
    frames = [f.filename for f in traceback.extract_tb(info.value.__traceback__)]
    assert not any("torch" in f for f in frames), frames


def test_an_unwritable_cache_directory_is_named(kernel_cache_dir, monkeypatch):
    blocker = kernel_cache_dir / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(blocker / "cache"))
    q, k, v = _qkv(8, grad=False)
    with pytest.raises(OSError) as info:
        attnc.std("causal")(q, k, v, backend="triton")
    assert str(blocker / "cache") in str(info.value) and "ATTNC_CACHE_DIR" in str(info.value)


def test_eager_calls_skip_the_custom_op_but_compiled_graphs_hold_it():
    p = attnc.std("causal")
    q, k, v = _qkv(8)
    calls = []

    def backend(gm, inputs):
        calls.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    torch.compile(lambda q, k, v: p(q, k, v), fullgraph=True, backend=backend)(q, k, v)
    assert any("attnc.attention" in c for c in calls), calls
    before = dispatch.LAUNCHES.copy()
    out = p(q, k, v)  # eager, with gradients, reference backend on the CPU
    assert out.grad_fn is not None and "EagerAttention" in type(out.grad_fn).__name__
    assert dispatch.LAUNCHES == before
