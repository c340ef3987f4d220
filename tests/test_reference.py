"""The reference interpreter: the semantics of docs/language.md, checked against plain torch."""
import math
import os

import pytest
import torch

import attnc
from attnc.dsl.diagnostics import SpecError

SPECS = os.path.join(os.path.dirname(__file__), "specs")


def _qkv(B=2, H=4, Hkv=2, Lq=37, Lk=37, D=16, Dv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv or D, generator=g, dtype=dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _dense(q, k, v, allowed, bias=None, scale=None):
    """Masked softmax attention in plain torch; allowed/bias broadcast to [B, H, Lq, Lk]."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, 1)
    v = v.repeat_interleave(H // Hkv, 1)
    s = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


def _grid(Lq, Lk):
    return torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]


def test_issue_examples_load_and_run():
    path = os.path.join(SPECS, "issue_examples.attn")
    q, k, v = _qkv(B=2, H=4, Hkv=2, Lq=36, Lk=36)
    args = {
        "streaming": dict(window=5, sinks=2),
        "alibi_softcap": dict(slopes=torch.rand(4, dtype=torch.float64)),
        "gaussian_mixture": dict(side=6, alpha=torch.rand(4, 3), sigma=torch.rand(4, 3) + 0.5),
        "packed_documents": dict(doc=torch.tensor([[0] * 10 + [1] * 26, [0] * 20 + [1] * 16])),
        "neighborhood_2d": dict(height=6, width=6, kernel=3),
        "dilated_causal": dict(window=4, dilation=3),
        "sharp_topk": dict(top=5),
        "sigmoid_attention": dict(),
    }
    for name, kw in args.items():
        p = attnc.load(path, name=name)
        out = p(q, k, v, backend="reference", **kw)
        assert out.shape == (2, 4, 36, 16) and not out.isnan().any(), name
    p = attnc.load(os.path.join(SPECS, "causal_window.attn"))
    out = p(q, k, v, window=3)
    i, j = _grid(36, 36)
    ref, _ = _dense(q, k, v, (i >= j) & (i - j < 3))
    torch.testing.assert_close(out, ref)


def test_streaming_matches_dense_with_gqa_and_lse():
    p = attnc.std("streaming") if "streaming" in attnc.std_names() else attnc.load(
        os.path.join(SPECS, "issue_examples.attn"), name="streaming")
    q, k, v = _qkv(H=8, Hkv=2, Lq=50, Lk=50)
    out, lse = p(q, k, v, window=7, sinks=3, return_lse=True)
    i, j = _grid(50, 50)
    ref, ref_lse = _dense(q, k, v, (i >= j) & ((i - j < 7) | (j < 3)))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_q_len_differs_from_k_len_and_value_dim():
    p = attnc.compile("pattern br:\n    mask q + k_len - q_len >= k\n")
    q, k, v = _qkv(Lq=13, Lk=40, Dv=24)
    out, lse = p(q, k, v, return_lse=True)
    i, j = _grid(13, 40)
    ref, ref_lse = _dense(q, k, v, i + 40 - 13 >= j)
    assert out.shape == (2, 4, 13, 24)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_fully_masked_rows_give_zero_and_minus_inf_without_nan():
    p = attnc.compile("pattern p:\n    mask q >= 10 and k <= q\n")
    q, k, v = _qkv(grad=True)
    out, lse = p(q, k, v, return_lse=True)
    assert torch.all(out[:, :, :10] == 0)
    assert torch.all(lse[:, :, :10] == float("-inf"))
    assert torch.isfinite(lse[:, :, 10:]).all()
    (out.sum() + lse[:, :, 10:].sum()).backward()
    for t in (q, k, v):
        assert not t.grad.isnan().any()


def test_integer_division_and_modulo_follow_python_floor_semantics():
    p = attnc.compile("pattern p:\n    mask (q - k) // 3 == -2 or (k - q) % 4 == 3\n")
    q, k, v = _qkv(Lq=20, Lk=20)
    out = p(q, k, v)
    allowed = torch.tensor([[((i - j) // 3 == -2) or ((j - i) % 4 == 3) for j in range(20)] for i in range(20)])
    ref, _ = _dense(q, k, v, allowed)
    torch.testing.assert_close(out, ref)


def test_topk_keeps_ties():
    # scores 0,0,1,1,2,2,...: the 3rd largest allowed score ties with the 4th, so 4 keys are kept
    p = attnc.compile("pattern p(n: int = 3):\n    score = floor(k / 2) * 1.0\n    mask k <= q\n    select topk(n)\n")
    q, k, v = _qkv(Lq=12, Lk=12)
    out = p(q, k, v)
    i, j = _grid(12, 12)
    s = torch.div(j, 2, rounding_mode="floor").double().expand(12, 12)
    allowed = j <= i
    kth = torch.topk(s.masked_fill(~allowed, float("-inf")), 3, -1).values[:, -1:]
    keep = allowed & (s >= kth)
    assert keep[7].sum() == 4 and keep[1].sum() == 2  # ties kept; rows with few keys keep all
    ref, _ = _dense(q, k, v, keep, bias=s - (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4)
    torch.testing.assert_close(out, ref)


def test_sigmoid_normalizer():
    p = attnc.compile("pattern p:\n    mask q >= k\n    normalize sigmoid(bias = -log(k_len))\n")
    q, k, v = _qkv()
    out = p(q, k, v)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) / 4 - math.log(37)
    i, j = _grid(37, 37)
    ref = (torch.sigmoid(s) * (i >= j)) @ vv
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="softmax"):
        p(q, k, v, return_lse=True)


def test_chunking_does_not_change_results_and_bounds_memory():
    from attnc.runtime.reference import reference_attention
    p = attnc.compile("pattern p(w: int = 9):\n    tensor s: float[heads]\n    score -= s[h] * abs(q - k)\n"
                      "    mask q - k < w\n")
    q, k, v = _qkv(Lq=45, Lk=45)
    slopes = torch.rand(4, dtype=torch.float64)
    bound = p.bind(q, k, v, dict(s=slopes))
    full, l1 = reference_attention(p.ir, q, k, v, bound, scale=0.25, return_lse=True)
    chunked, l2 = reference_attention(p.ir, q, k, v, bound, scale=0.25, return_lse=True, chunk=7)
    torch.testing.assert_close(full, chunked)
    torch.testing.assert_close(l1, l2)


def test_gradients_flow_to_tensor_arguments_through_chunks():
    from attnc.runtime import reference
    p = attnc.compile("pattern alibi:\n    tensor slopes: float[heads]\n    score -= slopes[h] * abs(q - k)\n"
                      "    mask q >= k\n")
    q, k, v = _qkv(Lq=30, Lk=30, grad=True)
    slopes = torch.rand(4, dtype=torch.float64, requires_grad=True)
    old = reference.CHUNK_ELEMENTS
    reference.CHUNK_ELEMENTS = 2 * 4 * 30 * 4  # force several chunks (checkpointed)
    try:
        out = p(q, k, v, slopes=slopes)
    finally:
        reference.CHUNK_ELEMENTS = old
    (out ** 2).sum().backward()
    i, j = _grid(30, 30)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    s2 = slopes.detach().clone().requires_grad_(True)
    ref, _ = _dense(q2, k2, v2, i >= j, bias=-s2[None, :, None, None] * (i - j).abs())
    (ref ** 2).sum().backward()
    torch.testing.assert_close(slopes.grad, s2.grad)
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


def test_gradcheck_fp64():
    p = attnc.compile("pattern p(cap: float = 2.0):\n    tensor t: float[heads, 3]\n"
                      "    score = cap * tanh(score / cap) + t[h, (q - k) % 3]\n    mask q >= k\n")
    q, k, v = _qkv(B=1, H=2, Hkv=1, Lq=5, Lk=5, D=4, grad=True)
    t = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, t: p(q, k, v, t=t), (q, k, v, t))


def test_use_with_imports_by_path_and_alias():
    p = attnc.load(os.path.join(SPECS, "uses_helpers.attn"))
    q, k, v = _qkv(Lq=20, Lk=20)
    out = p(q, k, v, width=4)
    i, j = _grid(20, 20)
    ref, _ = _dense(q, k, v, (i - j >= 0) & (i - j < 5), bias=-0.5 * (i - j))
    torch.testing.assert_close(out, ref)


def test_out_of_range_tensor_index_is_reported():
    p = attnc.compile("pattern p:\n    tensor t: float[heads]\n    score += t[q]\n")
    q, k, v = _qkv()
    with pytest.raises(SpecError, match="out of range") as e:
        p(q, k, v, t=torch.zeros(4))
    assert e.value.span.line == 3


def test_integer_division_by_zero_is_defined():
    # x // 0 == 0 and x % 0 == x (docs/language.md): total, and x == (x // d) * d + x % d holds
    p = attnc.compile("pattern p(d: int = 0):\n    mask q // d == 0 and q % d == q\n")
    q, k, v = _qkv()
    torch.testing.assert_close(p(q, k, v, d=0), attnc.compile("pattern p:\n    mask true\n")(q, k, v))
    i, j = _grid(37, 37)
    ref, _ = _dense(q, k, v, i < 5)
    torch.testing.assert_close(p(q, k, v, d=5), ref)


def test_bad_tensors_are_value_errors_naming_the_argument():
    p = attnc.compile("pattern p:\n    tensor doc: int[batch, q_len]\n    mask doc[b, q] == doc[b, k]\n")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"`doc` must have shape \[batch, q_len\] = \[2, 37\]"):
        p(q, k, v, doc=torch.zeros(2, 36, dtype=torch.long))
    with pytest.raises(ValueError, match="`doc` must have int elements"):
        p(q, k, v, doc=torch.zeros(2, 37))
    with pytest.raises(ValueError, match="`k`"):
        p(q, k[..., :8], v, doc=torch.zeros(2, 37, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple"):
        p(q, k[:, :1].expand(2, 3, 37, 16), v[:, :1].expand(2, 3, 37, 16), doc=torch.zeros(2, 37, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compute_in_fp32(dtype):
    p = attnc.compile("pattern p:\n    mask q >= k\n")
    q, k, v = _qkv(dtype=torch.float32)
    out = p(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    ref = p(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float())
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
