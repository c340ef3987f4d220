"""Positions (`q_start=`, `k_start=`, `k_lens=`): decoding and chunked prefill against a KV cache.

The reference interpreter and the generated kernels (under Triton's interpreter) are checked
against dense formulas written here, per sequence, from the patterns' definitions: row i of q
sits at q_start[b] + i, row j of k at k_start[b] + j, keys j >= k_lens[b] are never attended and
the pattern's `k_len` is k_lens[b].
"""
from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.runtime import jit
from attnc.runtime.layout import build_layout
from attnc.runtime.positions import positions_of

from decoding import needs_kernels, qkv

NEG_INF = float("-inf")


# ------------------------------------------------------------------ dense formulas


def _causal(b, h, qp, kp, a):
    return qp >= kp


def _window(b, h, qp, kp, a):
    return (qp >= kp) & (qp - kp < a["window"])


def _streaming(b, h, qp, kp, a):
    return (qp >= kp) & ((qp - kp < a["window"]) | (kp < a["sinks"]))


def _document(b, h, qp, kp, a):
    doc = a["doc"][b if a["doc"].shape[0] > 1 else 0]
    return (doc[qp] == doc[kp]) & (qp >= kp)


def _alibi_bias(b, h, qp, kp, a, n):
    return -a["slopes"][h].double().view(-1, 1, 1) * (qp - kp).abs()


def _sigmoid_bias(b, h, qp, kp, a, n):
    return -math.log(n)


#: pattern -> (allowed(b, heads, qpos, kpos, args), score bias or None, normalizer, top-k arg)
FORMULAS = {
    "causal": (_causal, None, "softmax", None),
    "sliding_window": (_window, None, "softmax", None),
    "streaming": (_streaming, None, "softmax", None),
    "document": (_document, None, "softmax", None),
    "alibi": (_causal, _alibi_bias, "softmax", None),
    "topk": (None, None, "softmax", "top"),
    "sigmoid": (None, _sigmoid_bias, "sigmoid", None),
}


def dense(name, q, k, v, args, q_start, k_start, k_lens, scale=None):
    """The output of pattern `name` by its formula, one sequence at a time (fp64)."""
    allowed_fn, bias_fn, normalizer, top = FORMULAS[name]
    B, H, Lq, D = q.shape
    scale = 1 / math.sqrt(D) if scale is None else scale
    group = H // k.shape[1]
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        n = int(k_lens[b])
        kb = k[b if k.shape[0] > 1 else 0, :, :n].double().repeat_interleave(group, 0)
        vb = v[b if v.shape[0] > 1 else 0, :, :n].double().repeat_interleave(group, 0)
        qp = (int(q_start[b]) + torch.arange(Lq)).view(1, Lq, 1)
        kp = (int(k_start[b]) + torch.arange(n)).view(1, 1, n)
        heads = torch.arange(H)
        s = q[b].double() @ kb.transpose(-1, -2) * scale
        if bias_fn is not None and normalizer == "softmax":
            s = s + bias_fn(b, heads, qp, kp, args, n)
        keep = torch.ones(H, Lq, n, dtype=torch.bool)
        if allowed_fn is not None:
            keep = keep & allowed_fn(b, heads, qp, kp, args)
        if top is not None and n:
            masked = s.masked_fill(~keep, NEG_INF)
            kth = masked.topk(min(args[top], n), dim=-1).values[..., -1:]
            keep = keep & (s >= kth)
        if normalizer == "sigmoid":
            p = torch.sigmoid(s + bias_fn(b, heads, qp, kp, args, n)) * keep
        else:
            s = s.masked_fill(~keep, NEG_INF)
            m = s.amax(-1, keepdim=True).clamp_min(-1e300) if n else s.new_zeros(H, Lq, 1)
            e = torch.exp(s - m)
            p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
        out[b] = p @ vb
    return out


def _arguments(name, B, H, L, gen):
    if name == "sliding_window":
        return {"window": 37}
    if name == "streaming":
        return {"window": 40, "sinks": 3}
    if name == "document":
        return {"doc": torch.randint(0, 4, (B, L), generator=gen).sort(-1).values}
    if name == "alibi":
        return {"slopes": torch.rand(H, generator=gen) * 0.2}
    if name == "topk":
        return {"top": 9}
    return {}


def _inputs(B, H, Hkv, Lq, Lk, dtype=torch.float32, seed=0):
    """q, k, v on the CPU (the formulas run there) and a generator for the pattern's tensors."""
    q, k, v = qkv(B, H, Hkv, Lq, Lk, dtype, seed, device="cpu")
    return q, k, v, torch.Generator().manual_seed(seed + 1000)


# ------------------------------------------------------------------ reference = definition


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("Lq", [1, 3, 16, 64])
def test_reference_decoding_matches_the_formulas(name, Lq):
    """Bottom-right decoding (q_start = k_lens - q_len) against a cache of 1500 keys with
    per-sequence lengths (none a tile multiple), GQA 4:1."""
    B, H, Hkv, Lk = 3, 8, 2, 1500
    q, k, v, gen = _inputs(B, H, Hkv, Lq, Lk, torch.float64)
    k_lens = torch.tensor([1500, 777, 65])
    q_start = k_lens - Lq
    args = _arguments(name, B, H, Lk, gen)
    out = attnc.std(name)(q, k, v, q_start=q_start, k_lens=k_lens, backend="reference", **args)
    want = dense(name, q, k, v, args, q_start, torch.zeros(B, dtype=torch.long), k_lens)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["causal", "streaming", "document", "sigmoid"])
def test_reference_with_both_starts(name):
    """q_start and k_start per sequence (a chunk of queries against a window of the cache)."""
    B, H, Lq, Lk = 2, 2, 5, 90
    q, k, v, gen = _inputs(B, H, H, Lq, Lk, torch.float64, seed=1)
    q_start, k_start, k_lens = torch.tensor([95, 20]), torch.tensor([10, 0]), torch.tensor([90, 25])
    args = _arguments(name, B, H, 120, gen)
    out = attnc.std(name)(q, k, v, q_start=q_start, k_start=k_start, k_lens=k_lens,
                          backend="reference", **args)
    want = dense(name, q, k, v, args, q_start, k_start, k_lens)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_ints_are_every_sequences_positions():
    q, k, v, _ = _inputs(2, 2, 2, 4, 50, torch.float64)
    p = attnc.std("causal")
    got = p(q, k, v, q_start=46, k_lens=50, backend="reference")
    want = p(q, k, v, q_start=torch.tensor([46, 46]), k_lens=torch.tensor([50, 50]),
             backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    bottom_right = attnc.compile("pattern br:\n    mask q + k_len - q_len >= k\n")
    torch.testing.assert_close(got, bottom_right(q, k, v, backend="reference"), rtol=1e-12,
                               atol=1e-12)


def test_an_empty_sequence_gives_zero_and_lse_minus_inf():
    q, k, v, _ = _inputs(2, 2, 2, 3, 40, torch.float64)
    out, lse = attnc.std("causal")(q, k, v, q_start=torch.tensor([37, 0]),
                                   k_lens=torch.tensor([40, 0]), backend="reference",
                                   return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == NEG_INF)
    assert torch.isfinite(lse[0]).all()


# ------------------------------------------------------------------ generated kernels


KERNEL_CASES = [  # (pattern, q_len, k_len, k_lens, heads, kv_heads)
    ("causal", 1, 2500, [2500, 1031], 8, 1),
    ("streaming", 1, 2500, [2500, 1999], 8, 2),
    ("sliding_window", 3, 700, [700, 130], 4, 1),
    ("document", 16, 300, [300, 77], 8, 2),
    ("alibi", 3, 333, [333, 100], 4, 4),
    ("topk", 1, 300, [300, 33], 4, 1),
    ("sigmoid", 64, 200, [200, 64], 2, 1),
    ("causal", 64, 130, [130, 64], 2, 2),
]


@needs_kernels
@pytest.mark.parametrize("name,Lq,Lk,lens,H,Hkv", KERNEL_CASES,
                         ids=[f"{c[0]}-q{c[1]}-k{c[2]}-gqa{c[4] // c[5]}" for c in KERNEL_CASES])
def test_kernels_match_the_formulas(name, Lq, Lk, lens, H, Hkv):
    B = len(lens)
    q, k, v, gen = _inputs(B, H, Hkv, Lq, Lk)
    k_lens = torch.tensor(lens)
    q_start = k_lens - Lq
    args = _arguments(name, B, H, Lk, gen)
    p = attnc.std(name)
    softmax = p.ir.normalizer == "softmax"
    got = p(q, k, v, q_start=q_start, k_lens=k_lens, backend="triton", return_lse=softmax, **args)
    out = got[0] if softmax else got
    want = dense(name, q, k, v, args, q_start, torch.zeros(B, dtype=torch.long), k_lens)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    if softmax:
        _, ref_lse = p(q.double(), k.double(), v.double(), q_start=q_start, k_lens=k_lens,
                       backend="reference", return_lse=True, **args)
        torch.testing.assert_close(got[1].double(), ref_lse, rtol=2e-5, atol=2e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_decoding(dtype):
    """fp16/bf16 against the fp64 reference, with the tolerance scaled by the error the
    reference itself makes in that dtype."""
    q, k, v, _ = _inputs(2, 8, 2, 1, 600, dtype, seed=3)
    k_lens = torch.tensor([600, 257])
    kw = {"q_start": k_lens - 1, "k_lens": k_lens, "window": 100, "sinks": 4}
    p = attnc.std("streaming")
    exact = p(q.double(), k.double(), v.double(), backend="reference", **kw)
    ref_err = (p(q, k, v, backend="reference", **kw).double() - exact).abs().max()
    err = (p(q, k, v, backend="triton", **kw).double() - exact).abs().max()
    ulp = torch.finfo(dtype).eps * exact.abs().max()  # rounding the output to dtype
    assert err <= 3 * ref_err + ulp


@needs_kernels
@pytest.mark.parametrize("name", ["causal", "document", "alibi", "sliding_window", "topk"])
def test_chunked_prefill_trains(name):
    """Gradients of q, k, v (and of learnable tensors) with positions equal the reference's."""
    B, H, Hkv, Lq, Lk = 2, 4, 2, 24, 90
    if name == "topk":  # the threshold passes are slow under the interpreter
        H, Hkv, Lq = 2, 1, 8
    q, k, v, gen = _inputs(B, H, Hkv, Lq, Lk, seed=4)
    k_lens = torch.tensor([90, 50])
    q_start = k_lens - Lq
    args = _arguments(name, B, H, Lk, gen)
    p = attnc.std(name)
    grads = {}
    for backend, dt in (("triton", torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dt, copy=True).requires_grad_() for t in (q, k, v)]
        extra = {n: (x.detach().to(dt, copy=True).requires_grad_() if x.is_floating_point() else x)
                 if isinstance(x, torch.Tensor) else x for n, x in args.items()}
        out = p(*leaves, q_start=q_start, k_lens=k_lens, backend=backend, **extra)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape).to(dt)).sum().backward()
        grads[backend] = [t.grad for t in leaves] + [x.grad for x in extra.values()
                                                     if isinstance(x, torch.Tensor) and x.requires_grad]
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # keys past a sequence's k_lens get no gradient
    assert torch.all(grads["triton"][1][1, :, 50:] == 0)


@needs_kernels
def test_positions_compile_a_placed_kernel_once():
    """Calls with positions share one placed module whatever the values; calls without keep
    theirs."""
    q, k, v, _ = _inputs(2, 2, 2, 2, 64)
    p = attnc.std("causal")
    p(q, k, v, backend="triton")
    for lens in ([64, 10], [40, 2]):
        k_lens = torch.tensor(lens)
        p(q, k, v, q_start=k_lens - 2, k_lens=k_lens, backend="triton")
    keys = [key for key in jit._MEMORY if key[0] == "forward" and key[1] == p.ir]
    assert sorted(key[-1] for key in keys) == [False, True]


def test_layout_is_per_sequence():
    """The block layout of a pattern that reads tensors is built per sequence from its
    positions; key tiles past a sequence's keys are EMPTY."""
    p = attnc.std("document")
    doc = torch.zeros(2, 256, dtype=torch.long)
    doc[:, 128:] = 1
    q, k = torch.zeros(2, 1, 32, 16), torch.zeros(2, 1, 256, 16)
    k_lens = torch.tensor([256, 64])
    bound = p.bind(q, k, k, {"doc": doc})
    bound.positions = positions_of(q, k, q_start=k_lens - 32, k_lens=k_lens)
    layout = build_layout(p.ir, bound, 32, 256, 32, 32, "cpu")
    classes = layout.classes
    assert classes.shape[0] == 2
    # sequence 0: queries 224..255 (document 1) see key tiles 4..7 only
    assert classes[0, 0, 0].tolist() == [0, 0, 0, 0, 2, 2, 2, 1]
    # sequence 1: queries 32..63 (document 0) see key tiles 0..1, nothing past its 64 keys
    assert classes[1, 0, 0].tolist() == [2, 1, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernels)])
def test_the_decoding_example_matches_full_sequences(backend):
    """examples/decode.py: prefill, then one token per step into a KV cache, equals one call
    over the whole sequences."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    got, expected = module.generate(heads=4, kv_heads=1, head_dim=16, prompt=(20, 9), steps=5,
                                    backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ errors at the door


@pytest.mark.parametrize("kwargs,match", [
    ({"k_lens": torch.tensor([41, 3])}, r"`k_lens` must lie in \[0, 40\]"),
    ({"k_lens": torch.tensor([-1, 3])}, r"`k_lens` must lie in \[0, 40\]"),
    ({"q_start": -2}, r"`q_start` must be nonnegative"),
    ({"k_start": torch.tensor([0, -1])}, r"`k_start` must be nonnegative"),
    ({"q_start": torch.tensor([1.0, 2.0])}, r"`q_start` must have int elements"),
    ({"k_lens": torch.tensor([4, 4, 4])}, r"`k_lens` must be an int or an int tensor of shape \[batch\] = \[2\]"),
    ({"q_start": 1.5}, r"`q_start` must be an int or an int tensor"),
    ({"q_start": True}, r"`q_start` must be an int or an int tensor"),
    ({"q_start": 2**31}, r"must stay below 2\*\*31"),
])
def test_bad_positions_are_value_errors(kwargs, match):
    q, k, v, _ = _inputs(2, 2, 2, 3, 40)
    with pytest.raises(ValueError, match=match):
        attnc.std("causal")(q, k, v, backend="reference", **kwargs)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("name", ["streaming", "document"])
def test_positions_under_torch_compile(backend, name):
    """A traced call with positions: one graph, the positions a tensor argument of the op (the
    kernels then never see the values on the host: a layout is built from them when the op
    runs)."""
    p = attnc.std(name)
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v, _ = _inputs(2, 2, 2, 1, 48, dtype)
    args = ({"window": 8, "sinks": 2} if name == "streaming" else
            {"doc": (torch.arange(48) // 10).expand(2, 48).contiguous()})

    def step(q, k, v, k_lens):
        return p(q, k, v, q_start=k_lens - 1, k_lens=k_lens, backend=backend, **args)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for lens in ([48, 20], [30, 7]):
        k_lens = torch.tensor(lens)
        torch.testing.assert_close(compiled(q, k, v, k_lens), step(q, k, v, k_lens))



def test_pattern_layout_takes_positions():
    """`p.layout(..., q_start=...)` shows the tiles a placed call visits: per sequence when the
    placements differ."""
    p = attnc.std("sliding_window")
    lay = p.layout(1, 512, block=(16, 64), window=100, q_start=511)
    assert lay.classes.shape == (1, 1, 1, 8)
    assert lay.classes[0, 0, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 2]  # keys 412..511
    per = p.layout(1, 512, block=(16, 64), window=100, batch=2,
                   q_start=torch.tensor([511, 99]), k_lens=torch.tensor([512, 100]))
    assert per.classes.shape[0] == 2
    assert per.classes[1, 0, 0].tolist() == [2, 2, 0, 0, 0, 0, 0, 0]  # keys 0..99, all seen
