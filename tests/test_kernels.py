"""Generated Triton forward kernels vs the reference interpreter.

Runs on the CPU under Triton's interpreter: TRITON_INTERPRET=1 is set here, before anything
imports triton (conftest.py belongs to another module; setdefault keeps a caller's choice).
Shapes are small because the interpreter is slow; tiles are 16 or 32.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.runtime import dispatch, jit, policy
from attnc.runtime.binding import sizes_for
from attnc.runtime.layout import BlockLayout
from attnc.runtime.maskview import brute_force_layout
from attnc.runtime.samples import sample_arguments

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


# --------------------------------------------------------------------------- helpers

def qkv(B, H, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def run_triton(p, q, k, v, tiles=(32, 32), lse=True, **args):
    with policy.tile_override(*tiles):
        return p(q, k, v, backend="triton", return_lse=lse, **args)


def run_reference(p, q, k, v, lse=True, **args):
    return p(q, k, v, backend="reference", return_lse=lse, **args)


def assert_fp32_close(p, q, k, v, tiles=(32, 32), **args):
    softmax = p.ir.normalizer == "softmax"
    got = run_triton(p, q, k, v, tiles, lse=softmax, **args)
    want = run_reference(p, q, k, v, lse=softmax, **args)
    if not softmax:
        got, want = (got, None), (want, None)
    out, lse = got
    ref_out, ref_lse = want
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    if softmax:
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=2e-5, rtol=2e-5)
    return out, lse


def assert_low_precision_close(p, q, k, v, factor=4.0, tiles=(32, 32), **args):
    """Error vs an fp64 reference must stay within `factor` × the low-precision reference's own
    error (FlexAttention's criterion), plus a tiny floor for rows where that error is 0."""
    truth = run_reference(p, q.double(), k.double(), v.double(), lse=False, **_to64(args))
    ref = run_reference(p, q, k, v, lse=False, **args)
    got = run_triton(p, q, k, v, tiles, lse=False, **args)
    assert not torch.isnan(got).any()
    ref_err = (ref.double() - truth).abs().max().item()
    got_err = (got.double() - truth).abs().max().item()
    eps = torch.finfo(q.dtype).eps
    assert got_err <= factor * ref_err + eps, f"kernel error {got_err:.3g} vs reference {ref_err:.3g}"


def _to64(args):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}


def pattern_cases():
    cases = []
    for name in attnc.std_names():
        cases.append(pytest.param(("std", name), id=f"std-{name}"))
    for f in sorted(os.listdir(EXAMPLES)) if os.path.isdir(EXAMPLES) else []:
        if f.endswith(".attn"):
            cases.append(pytest.param(("example", f), id=f"example-{f[:-5]}"))
    return cases


def load_case(case):
    kind, name = case
    if kind == "std":
        return attnc.std(name)
    return attnc.load(os.path.join(EXAMPLES, name))


def case_arguments(p, B, H, Lq, Lk):
    """The shared sample arguments (parameters for small sizes, random tensors) of a pattern."""
    return sample_arguments(p.ir, sizes_for((B, H, Lq, 32), (B, H, Lk, 32)), device=DEVICE)


# --------------------------------------------------------------------------- every pattern


@pytest.mark.parametrize("case", pattern_cases())
def test_every_pattern_fp32(case):
    p = load_case(case)
    B, H, L, tiles = 2, 2, 100, (32, 32)
    if p.ir.topk is not None:  # tl.sort is slow in the interpreter: fewer, smaller tiles
        B, H, L, tiles = 1, 2, 64, (16, 16)
    q, k, v = qkv(B, H, H, L, L, 32)
    assert_fp32_close(p, q, k, v, tiles=tiles, **case_arguments(p, B, H, L, L))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["causal", "alibi", "softcap", "document", "gaussian_mixture",
                                  "topk", "sigmoid", "neighborhood_2d"])
def test_low_precision(name, dtype):
    p = attnc.std(name)
    B, H, L, tiles = 1, 2, 100, (32, 32)
    if p.ir.topk is not None:
        B, H, L, tiles = 1, 1, 64, (16, 16)
    q, k, v = qkv(B, H, H, L, L, 32, dtype=dtype, seed=1)
    assert_low_precision_close(p, q, k, v, tiles=tiles, **case_arguments(p, B, H, L, L))


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("Lq,Lk", [(1, 200), (37, 100), (100, 37)], ids=["decode", "prefill", "q>k"])
def test_document_kv_decoding(Lq, Lk):
    """Packed documents with a KV cache: the queries are the last Lq positions (GQA 4:2)."""
    p = attnc.std("document_kv")
    q, k, v = qkv(2, 4, 2, Lq, Lk, 32)
    k_doc = torch.cumsum((torch.rand(2, Lk, generator=torch.Generator().manual_seed(3)) < 0.05)
                         .to(torch.int64), dim=1)
    q_doc = k_doc[:, Lk - Lq:] if Lq <= Lk else torch.cat([k_doc, k_doc[:, -1:].expand(2, Lq - Lk)], 1)
    assert_fp32_close(p, q, k, v, tiles=(16, 32), q_doc=q_doc.to(DEVICE), k_doc=k_doc.to(DEVICE))


@pytest.mark.parametrize("L", [1, 37, 128, 200])
def test_lengths(L):
    p = attnc.std("streaming")
    q, k, v = qkv(1, 2, 2, L, L, 16)
    assert_fp32_close(p, q, k, v, window=50, sinks=2)


@pytest.mark.parametrize("Lq,Lk", [(37, 100), (100, 37), (1, 200)])
def test_q_len_differs_from_k_len(Lq, Lk):
    p = attnc.compile("pattern bottom_right:\n    mask q + k_len - q_len >= k\n    score -= 0.01 * abs(q - k)\n")
    q, k, v = qkv(1, 2, 2, Lq, Lk, 32)
    assert_fp32_close(p, q, k, v, tiles=(16, 32))


def test_gqa_four_to_one():
    p = attnc.std("alibi")
    B, H, Hkv, L = 1, 8, 2, 64
    q, k, v = qkv(B, H, Hkv, L, L, 16)
    slopes = torch.linspace(0.05, 0.5, H, device=DEVICE)
    out, _ = assert_fp32_close(p, q, k, v, slopes=slopes)
    # query head h reads kv head h // 4: heads 0..3 agree with a dense MHA over kv head 0
    ref = attnc.std("alibi")(q[:, :4], k[:, :1].expand(-1, 4, -1, -1), v[:, :1].expand(-1, 4, -1, -1),
                             slopes=slopes[:4], backend="reference")
    torch.testing.assert_close(out[:, :4], ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("D,Dv", [(16, 16), (40, 24), (100, 64)])
def test_head_dims(D, Dv):
    p = attnc.std("causal")
    q, k, v = qkv(1, 1, 1, 50, 50, D, Dv)
    assert_fp32_close(p, q, k, v)


def test_non_contiguous_inputs():
    p = attnc.std("alibi")
    B, H, L, D = 2, 2, 50, 32
    g = torch.Generator().manual_seed(3)
    # [B, L, H, D] storage viewed as [B, H, L, D]; k and v share one packed [B, L, 2, H, D] buffer
    q = torch.randn(B, L, H, D, generator=g).to(DEVICE).transpose(1, 2)
    kv = torch.randn(B, L, 2, H, D, generator=g).to(DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    slopes = torch.rand(2 * H, generator=g).to(DEVICE)[::2]
    assert not (q.is_contiguous() or k.is_contiguous() or slopes.is_contiguous())
    assert_fp32_close(p, q, k, v, slopes=slopes)


def test_fully_masked_rows_give_zero_and_minus_inf():
    p = attnc.compile("pattern late:\n    mask k <= q - 40\n")
    q, k, v = qkv(1, 2, 2, 100, 100, 16)
    out, lse = assert_fp32_close(p, q, k, v, tiles=(16, 16))
    assert torch.all(out[:, :, :40] == 0)
    assert torch.all(lse[:, :, :40] == float("-inf"))
    assert torch.isfinite(lse[:, :, 40:]).all()


def test_everything_masked():
    p = attnc.compile("pattern nothing:\n    mask k > q + 1000\n")
    q, k, v = qkv(1, 1, 1, 37, 37, 16)
    out, lse = run_triton(p, q, k, v)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


# --------------------------------------------------------------------------- features


def test_floor_division_and_modulo_of_negative_numbers():
    src = ("pattern signs:\n"
           "    score += 0.1 * ((q - k) // 3) + 0.01 * ((q - k) % 5) + 0.001 * ((k - q) // -4)\n"
           "    mask (q - k) % 7 != 3 and (k - q) // 5 != -2\n")
    p = attnc.compile(src)
    q, k, v = qkv(1, 1, 1, 60, 60, 16)
    assert_fp32_close(p, q, k, v, tiles=(16, 16))


def test_functions_and_float_parameters():
    src = ("pattern fancy(t: float = 0.5, c: float = 3.0):\n"
           "    score = c * tanh(score / c) + softplus(score) * t - sigmoid(score) ** 2\n"
           "    score += log(1.0 + abs(q - k)) * 0.1 - sqrt(1.0 + k) * 0.01 + exp2(-abs(q - k)) * t\n"
           "    score -= (0.5 * abs(q - k) + 1.0) ** 1.5 * 0.01 + (floor(0.3 * k) + ceil(0.7 * q)) * 0.01\n"
           "    mask max(q, k) - min(q, k) < 30 and not (q == k + 5)\n")
    p = attnc.compile(src)
    q, k, v = qkv(1, 2, 2, 70, 70, 16)
    assert_fp32_close(p, q, k, v, tiles=(16, 32), t=0.3, c=2.5)


def test_sum_is_unrolled():
    p = attnc.compile("pattern s(n: int = 4):\n    score += sum(0.1 * i * (q - k) / (1 + q) for i in range(n))\n    mask q >= k\n")
    q, k, v = qkv(1, 1, 1, 40, 40, 16)
    assert_fp32_close(p, q, k, v, n=3)


def test_topk_ties_are_kept():
    # scores rounded to a coarse grid: many equal values straddle the threshold
    p = attnc.compile("pattern tied(n: int = 5):\n    score = floor(score * 2.0) * 0.5\n    mask q >= k\n    select topk(n)\n")
    q, k, v = qkv(1, 1, 1, 48, 48, 16, seed=5)
    for n in (1, 5, 12):
        assert_fp32_close(p, q, k, v, tiles=(16, 16), n=n)
    q, k, v = qkv(1, 1, 1, 12, 12, 16, seed=5)
    assert_fp32_close(p, q, k, v, tiles=(16, 16), n=16)  # more than any row has: keep all


def test_topk_wider_than_tile():
    p = attnc.std("topk")
    q, k, v = qkv(1, 1, 1, 64, 64, 16, seed=6)
    assert_fp32_close(p, q, k, v, tiles=(16, 16), top=20)  # the tile widens to 32 keys


def test_sigmoid_with_mask_and_bias_of_indices():
    p = attnc.compile("pattern sig(b0: float = -2.0):\n    mask q >= k\n    normalize sigmoid(bias = b0 - 0.01 * (q - k))\n")
    q, k, v = qkv(1, 2, 2, 50, 50, 16)
    assert_fp32_close(p, q, k, v, b0=-1.0)


def test_tensor_indices_are_clamped_in_kernels():
    # the reference rejects an out-of-range index; the kernel clamps it and never reads outside
    p = attnc.compile("pattern t:\n    tensor w: float[8]\n    score += w[q % 8]\n")
    q, k, v = qkv(1, 1, 1, 30, 30, 16)
    w = torch.arange(8.0, device=DEVICE) * 0.1
    assert_fp32_close(p, q, k, v, w=w)


def test_block_layout_full_partial_and_empty_tiles(monkeypatch):
    """A brute-force layout (FULL tiles skip the mask, EMPTY tiles are absent) gives the same
    answer as the reference; a wrong FULL claim would show, which proves masks are skipped."""
    p = attnc.std("document")
    B, H, L, tiles = 2, 2, 100, (16, 16)
    q, k, v = qkv(B, H, H, L, L, 16)
    args = case_arguments(p, B, H, L, L)
    monkeypatch.setattr(dispatch, "build_layout", brute_force_layout)
    assert_fp32_close(p, q, k, v, tiles=tiles, **args)
    lay = brute_force_layout(p.ir, p.bind(q, k, v, args), L, L, *tiles, DEVICE)
    assert lay.kv_full_num.sum() > 0 and lay.kv_partial_num.sum() > 0
    # claiming every listed tile FULL must change the answer (the mask really is skipped)
    monkeypatch.setattr(dispatch, "build_layout", lambda *a: all_full(brute_force_layout(*a)))
    out = run_triton(p, q, k, v, tiles, lse=False, **args)
    assert not torch.allclose(out, run_reference(p, q, k, v, lse=False, **args), atol=1e-3)


def all_full(lay):
    """The same layout with every PARTIAL tile claimed FULL (a deliberately wrong layout)."""
    classes = torch.where(lay.classes == 1, 2, lay.classes).to(torch.int8)
    return BlockLayout(classes, lay.block_m, lay.block_n, lay.q_len, lay.k_len, (), (), (), None, lay.device)


# --------------------------------------------------------------------------- recompilation


def test_float_parameters_do_not_recompile_and_lengths_do_not_either():
    p = attnc.compile("pattern warm(tau: float = 1.0, w: int = 30):\n    score /= tau\n    mask q - k < w\n")
    q, k, v = qkv(1, 1, 1, 37, 37, 16)
    assert_fp32_close(p, q, k, v, tau=1.0)
    before = jit.STATS.generated
    assert_fp32_close(p, q, k, v, tau=0.25)
    assert_fp32_close(p, q, k, v, tau=3.0)
    q2, k2, v2 = qkv(1, 1, 1, 100, 90, 16)
    assert_fp32_close(p, q2, k2, v2, tau=2.0)
    assert jit.STATS.generated == before, "a float parameter or a length caused a new kernel"
    assert_fp32_close(p, q, k, v, tau=1.0, w=10)  # int parameters are specialized
    assert jit.STATS.generated == before + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_float_parameter_reuses_the_triton_binary():
    p = attnc.compile("pattern warm2(tau: float = 1.0):\n    score /= tau\n    mask q >= k\n")
    q, k, v = qkv(1, 2, 2, 256, 256, 64, dtype=torch.float16)
    p(q, k, v, tau=1.0, backend="triton")
    compiled = jit.forward_kernel(p.ir, {})
    fn = compiled.module.attn_fwd
    count = sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in fn.device_caches.values())
    for tau in (0.5, 2.0, 3.0):
        p(q, k, v, tau=tau, backend="triton")
    q, k, v = qkv(1, 2, 2, 300, 300, 64, dtype=torch.float16)
    p(q, k, v, tau=0.7, backend="triton")
    after = sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in fn.device_caches.values())
    assert after == count


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "alibi", "topk"])
def test_gpu_bf16_long(name):
    p = attnc.std(name)
    B, H, L = 2, 4, 1000
    q, k, v = qkv(B, H, H, L, L, 128, dtype=torch.bfloat16)
    args = case_arguments(p, B, H, L, L)
    truth = p(q.double(), k.double(), v.double(), backend="reference", **_to64(args))
    ref = p(q, k, v, backend="reference", **args)
    got = p(q, k, v, backend="triton", **args)
    ref_err = (ref.double() - truth).abs().max().item()
    assert (got.double() - truth).abs().max().item() <= 4 * ref_err + 1e-2


# --------------------------------------------------------------------------- int32 index math

WIDE_INDEX = os.path.join(os.path.dirname(__file__), "specs", "wide_index.attn")


@pytest.mark.parametrize("m", [3, 20_000_000], ids=["int32", "int64"])
def test_int_arithmetic_beyond_int32_matches_the_reference(m):
    """`q * m` leaves int32 at m = 2e7 (q < 150): the call gets an int64 kernel (it wrapped before)."""
    from attnc.lowering.int_range import int32_overflow
    from attnc.runtime.binding import sizes_for
    p = attnc.load(WIDE_INDEX)
    q, k, v = qkv(1, 2, 2, 150, 150, 32)
    assert (int32_overflow(p.ir, sizes_for(q.shape, k.shape), {"m": m}) is not None) == (m > 1000)
    out, lse = run_triton(p, q, k, v, m=m)
    ref, ref_lse = run_reference(p, q, k, v, m=m)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_floor_results_are_int64_in_wide_kernels():
    """`floor` of a float past 2**31 keeps its value in an int64 (WIDE) kernel, as in the
    reference; an int32 conversion would wrap it."""
    from attnc.lowering.int_range import int32_overflow
    from attnc.runtime.binding import sizes_for
    p = attnc.compile("pattern f:\n    mask floor(q * 30000017.0) % 5 == floor(k * 30000017.0) % 5\n")
    q, k, v = qkv(1, 2, 2, 120, 120, 32)
    assert int32_overflow(p.ir, sizes_for(q.shape, k.shape), {}) is not None
    out, lse = run_triton(p, q, k, v)
    ref, ref_lse = run_reference(p, q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_standard_patterns_stay_int32_at_long_lengths():
    """No false alarm: every stdlib pattern keeps int32 kernels at N = 131072."""
    from attnc.lowering.int_range import int32_overflow
    sizes = dict(batch=8, heads=64, kv_heads=8, q_len=131072, k_len=131072, head_dim=128)
    big = dict(width=256, height=512, kernel=7, n=4, window=4096, sinks=4, chunk=2048,
               dilation=4, stride=1024, summary=64, prefix=8192, top=64, max_distance=1024)
    for name in attnc.std_names():
        p = attnc.std(name)
        params = {x.name: big.get(x.name, x.default) for x in p.params}
        assert int32_overflow(p.ir, sizes, params) is None, name
