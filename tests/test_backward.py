"""Generated backward kernels vs autograd through the reference interpreter.

Runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1 is set here before anything
imports triton, as in test_kernels.py). Sizes are small because the interpreter is slow.
"""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.lowering.derivative import differentiable_tensors, sink_tensors
from attnc.runtime import backward, jit, policy
from attnc.runtime.backward import triton_attention_backward
from attnc.runtime.binding import sizes_for
from attnc.runtime.samples import sample_arguments

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- helpers

def make_arguments(p, B, H, Lq, seed=0):
    """The shared sample arguments of a pattern (parameters for small sizes, random tensors),
    float tensors requiring grad."""
    args = sample_arguments(p.ir, sizes_for((B, H, Lq, 16), (B, H, Lq, 16)), seed=seed, device=DEVICE)
    return {n: t.requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for n, t in args.items()}


def qkv(B, H, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    shapes = ((B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv))
    return tuple(torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_(True) for s in shapes)


def gradients(p, q, k, v, args, backend, tiles=(16, 16), dtype=None, with_lse=False, seed=1):
    """Gradients of sum(out * W) (+ sum(lse * W') over finite lse) w.r.t. q, k, v and every
    float tensor argument, computed in `dtype` (default: q's)."""
    dtype = dtype or q.dtype
    leaves = {"q": q, "k": k, "v": v}
    leaves.update({n: t for n, t in args.items() if isinstance(t, torch.Tensor) and t.requires_grad})
    cast = {n: t.detach().to(dtype if n in "qkv" else (torch.float64 if dtype == torch.float64 else t.dtype))
            .requires_grad_(True) for n, t in leaves.items()}
    call = dict(args, **{n: t for n, t in cast.items() if n not in "qkv"})
    with policy.tile_override(*tiles) if tiles else contextlib.nullcontext():
        res = p(cast["q"], cast["k"], cast["v"], backend=backend, return_lse=with_lse, **call)
    out, lse = res if with_lse else (res, None)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g).to(out.device, torch.float64)
    loss = (out.to(torch.float64) * w).sum()
    if lse is not None:
        wl = torch.randn(lse.shape, generator=g).to(out.device, torch.float64)
        loss = loss + torch.where(torch.isfinite(lse), lse.to(torch.float64) * wl, 0.0).sum()
    # a pattern may cut q, k out of the graph (e.g. `floor(score)`): their gradient is zero
    got = torch.autograd.grad(loss, list(cast.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(cast, got))


def assert_grads_close(got, want, atol=1e-5, rtol=1e-4):
    assert sorted(got) == sorted(want)
    for name in want:
        g, w = got[name], want[name]
        assert not torch.isnan(g).any(), f"NaN in the gradient of {name}"
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double(), w.double(), atol=atol * scale, rtol=rtol,
                                   msg=lambda m: f"gradient of {name}: {m}")


def check_fp32(p, q, k, v, args, tiles=(16, 16), with_lse=None):
    with_lse = p.ir.normalizer == "softmax" if with_lse is None else with_lse
    got = gradients(p, q, k, v, args, "triton", tiles, with_lse=with_lse)
    want = gradients(p, q, k, v, args, "reference", tiles, with_lse=with_lse)
    assert_grads_close(got, want)
    return got


# --------------------------------------------------------------------------- every stdlib pattern


@pytest.mark.parametrize("name", attnc.std_names())
def test_every_stdlib_pattern_fp32(name):
    p = attnc.std(name)
    B, H, L, tiles = 2, 2, 37, (16, 32)
    if p.ir.topk is not None:  # tl.sort is slow in the interpreter
        B, H, L, tiles = 1, 1, 37, (16, 16)
    q, k, v = qkv(B, H, H, L, L, 16)
    args = make_arguments(p, B, H, L)
    got = check_fp32(p, q, k, v, args, tiles)
    for n in differentiable_tensors(p.ir) + sink_tensors(p.ir):
        assert got[n].abs().sum() > 0, f"no gradient reached `{n}`"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["causal", "alibi", "softcap", "gaussian_mixture", "relative_bias",
                                  "sigmoid", "document"])
def test_low_precision(name, dtype):
    """Error vs an fp64 reference within a few times the low-precision reference's own error."""
    p = attnc.std(name)
    B, H, L = 1, 2, 64
    q, k, v = qkv(B, H, H, L, L, 32, dtype=dtype, seed=2)
    args = make_arguments(p, B, H, L)
    truth = gradients(p, q, k, v, args, "reference", dtype=torch.float64)
    ref = gradients(p, q, k, v, args, "reference")
    got = gradients(p, q, k, v, args, "triton", tiles=(32, 32))
    eps = torch.finfo(dtype).eps
    for n in truth:
        assert not torch.isnan(got[n]).any()
        ref_err = (ref[n].double() - truth[n]).abs().max().item()
        got_err = (got[n].double() - truth[n]).abs().max().item()
        scale = truth[n].abs().max().item()
        assert got_err <= 4 * ref_err + eps * scale, f"{n}: kernel error {got_err:.3g} vs reference {ref_err:.3g}"


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("L", [37, 128, 200])
def test_lengths(L):
    p = attnc.std("sliding_window")
    q, k, v = qkv(1, 1, 1, L, L, 16)
    tiles = (32, 32) if L > 100 else (16, 16)
    check_fp32(p, q, k, v, {"window": 50}, tiles)


def test_gqa_sums_dk_dv_over_the_group():
    p = attnc.std("alibi")
    B, H, Hkv, L = 1, 4, 2, 40
    q, k, v = qkv(B, H, Hkv, L, L, 16)
    slopes = torch.linspace(0.1, 0.6, H, device=DEVICE).requires_grad_(True)
    check_fp32(p, q, k, v, {"slopes": slopes})


@pytest.mark.parametrize("Lq,Lk", [(37, 100), (100, 37)])
def test_q_len_differs_from_k_len(Lq, Lk):
    p = attnc.compile("pattern bottom_right:\n    tensor w: float[heads]\n"
                      "    mask q + k_len - q_len >= k\n    score -= w[h] * 0.01 * abs(q - k)\n")
    q, k, v = qkv(1, 2, 2, Lq, Lk, 16)
    w = torch.tensor([0.5, 2.0], device=DEVICE, requires_grad=True)
    check_fp32(p, q, k, v, {"w": w}, tiles=(16, 32))


def test_value_head_dim_differs():
    p = attnc.std("causal")
    q, k, v = qkv(1, 2, 2, 40, 40, 40, Dv=24)
    check_fp32(p, q, k, v, {})


def test_fully_masked_rows_have_zero_gradients():
    p = attnc.compile("pattern late:\n    mask k <= q - 20\n")
    q, k, v = qkv(1, 2, 2, 50, 50, 16)
    got = check_fp32(p, q, k, v, {}, with_lse=True)
    assert torch.all(got["q"][:, :, :20] == 0)
    everything = attnc.compile("pattern nothing:\n    mask k > q + 1000\n")
    got = gradients(everything, q, k, v, {}, "triton", with_lse=True)
    assert all(torch.all(g == 0) for g in got.values())


# --------------------------------------------------------------------------- the chain rule


CHAINS = {
    "softcap_alibi": ("pattern p(cap: float = 3.0):\n    tensor slopes: float[heads]\n"
                      "    score = cap * tanh(score / cap)\n    score -= slopes[h] * abs(q - k)\n    mask q >= k\n",
                      {"slopes": (2,)}),
    "minmax_where": ("pattern p(t: float = 0.7):\n    score /= t\n    score = max(score, -2.0) + min(score, 1.0)\n"
                     "    score = score if q > k else sigmoid(score) * 2.0\n", {}),
    "sum_reads_score": ("pattern p:\n    tensor w: float[3]\n"
                        "    score = sum(w[i] * score * 0.3 + exp(-abs(score)) for i in range(3))\n"
                        "    score = log(1.0 + softplus(score)) + sqrt(1.0 + score * score)\n", {"w": (3,)}),
    "table_by_q": ("pattern p:\n    tensor rows: float[heads, 64]\n    tensor cols: float[64]\n"
                   "    score += rows[h, q % 64] - cols[k // 2]\n    mask q >= k\n", {"rows": (2, 64), "cols": (64,)}),
    "score_mask": ("pattern p:\n    mask score > -0.5 or q == k\n", {}),
    "sigmoid_bias": ("pattern p:\n    tensor bb: float[heads]\n    score *= 0.5\n    mask q >= k\n"
                     "    normalize sigmoid(bias = bb[h] - 0.01 * (q - k))\n", {"bb": (2,)}),
    # float `%`: gradient 1 for the dividend, -floor(a / b) for a learnable divisor
    "float_mod": ("pattern p:\n    tensor m: float[heads]\n    score = score % (m[h] + 0.5) - 0.3 * score\n"
                  "    mask q >= k\n", {"m": (2,)}),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_score_chains_and_tensor_reads(name):
    src, shapes = CHAINS[name]
    p = attnc.compile(src)
    g = torch.Generator().manual_seed(4)
    args = {n: (0.5 + torch.rand(s, generator=g)).to(DEVICE).requires_grad_(True) for n, s in shapes.items()}
    q, k, v = qkv(1, 2, 2, 45, 45, 16, seed=3)
    check_fp32(p, q, k, v, args)


def test_topk_keeps_the_forward_selection_with_ties():
    # coarse scores: many ties at the threshold; dV shows exactly which keys were kept
    p = attnc.compile("pattern tied(n: int = 5):\n    score = floor(score * 2.0) * 0.5\n    mask q >= k\n"
                      "    select topk(n)\n")
    q, k, v = qkv(1, 1, 1, 24, 24, 16, seed=5)
    got = check_fp32(p, q, k, v, {"n": 4})
    assert got["v"].abs().sum() > 0


# --------------------------------------------------------------------------- modes


def _direct(p, q, k, v, args, deterministic):
    bound = p.bind(q, k, v, args)
    out, lse = p(q, k, v, backend="triton", return_lse=True, **args)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    with policy.tile_override(16, 16):
        return triton_attention_backward(p.ir, q.detach(), k.detach(), v.detach(), out, lse, dout, None,
                                         bound, 0.25, ["alpha", "sigma", "bias"], deterministic)


@pytest.mark.parametrize("name", ["gaussian_mixture", "relative_bias"])
def test_deterministic_mode_matches_atomics(name):
    p = attnc.std(name)
    B, H, L = 2, 2, 40
    q, k, v = qkv(B, H, H, L, L, 16)
    args = {n: t.detach() if isinstance(t, torch.Tensor) else t
            for n, t in make_arguments(p, B, H, L).items()}
    atomic = _direct(p, q, k, v, args, False)
    det = _direct(p, q, k, v, args, True)
    again = _direct(p, q, k, v, args, True)
    for a, b, c in zip(atomic[:3], det[:3], again[:3]):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert atomic[3].keys() == det[3].keys() and atomic[3]
    for n in atomic[3]:
        torch.testing.assert_close(det[3][n], atomic[3][n], atol=1e-5, rtol=1e-5)
        assert torch.equal(det[3][n], again[3][n])


def test_deterministic_algorithms_switch_the_mode(monkeypatch):
    seen = []
    real = backward.run_launch

    def spy(compiled, launch):
        seen.append(launch.meta.get("DETERMINISTIC"))
        return real(compiled, launch)

    monkeypatch.setattr(backward, "run_launch", spy)
    p = attnc.std("alibi")
    q, k, v = qkv(1, 2, 2, 20, 20, 16)
    slopes = torch.rand(2, device=DEVICE, requires_grad=True)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        p(q, k, v, slopes=slopes, backend="triton").sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert True in seen


def test_gradcheck_fp64_kernel():
    """torch.autograd.gradcheck of the generated backward (run in fp64 by the interpreter)
    against numerical derivatives of the fp64 reference forward."""
    if DEVICE != "cpu":
        pytest.skip("fp64 kernels run under the interpreter only")
    p = attnc.compile(CHAINS["softcap_alibi"][0].replace("mask q >= k", "mask q >= k - 2"))

    class Attn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, slopes):
            out, lse = p(q, k, v, slopes=slopes, backend="reference", return_lse=True)
            ctx.save_for_backward(q, k, v, slopes, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, slopes, out, lse = ctx.saved_tensors
            bound = p.bind(q, k, v, {"slopes": slopes})
            with policy.tile_override(16, 16):
                dq, dk, dv, grads = triton_attention_backward(p.ir, q, k, v, out, lse, dout.contiguous(),
                                                              None, bound, 0.5, ["slopes"])
            return dq, dk, dv, grads["slopes"]

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slopes = (0.2 + torch.rand(2, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: Attn.apply(*a), (q, k, v, slopes), fast_mode=True)


def test_backward_kernel_is_cached_per_gradient_set():
    p = attnc.std("gaussian_mixture")
    before = jit.STATS.generated
    a = jit.backward_kernel(p.ir, {"width": 8, "n": 2}, ("alpha",))
    assert jit.backward_kernel(p.ir, {"width": 8, "n": 2}, ("alpha",)) is a
    b = jit.backward_kernel(p.ir, {"width": 8, "n": 2}, ("alpha", "sigma"))
    assert a is not b and "grd_sigma" in b.kernel.source and "grd_sigma" not in a.kernel.source
    assert jit.STATS.generated <= before + 2


def test_torch_compile_traces_the_triton_backward():
    p = attnc.compile(CHAINS["softcap_alibi"][0])
    q, k, v = qkv(1, 2, 2, 20, 20, 16)
    slopes = torch.tensor([0.3, 0.6], device=DEVICE, requires_grad=True)

    def f(q, k, v, s):
        return p(q, k, v, slopes=s, backend="triton").square().sum()

    eager = torch.autograd.grad(f(q, k, v, slopes), (q, k, v, slopes))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    traced = torch.autograd.grad(compiled(q, k, v, slopes), (q, k, v, slopes))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "alibi", "gaussian_mixture",
                                  "relative_bias", "topk", "sigmoid"])
def test_gpu_bf16_long(name):
    p = attnc.std(name)
    B, H, L = 2, 4, 1000
    q, k, v = qkv(B, H, H, L, L, 128, dtype=torch.bfloat16)
    args = make_arguments(p, B, H, L)
    if name == "sliding_window":
        args["window"] = 256
    truth = gradients(p, q, k, v, args, "reference", dtype=torch.float64)
    ref = gradients(p, q, k, v, args, "reference")
    got = gradients(p, q, k, v, args, "triton", tiles=None)  # the GPU's own tile choice
    for n in truth:
        ref_err = (ref[n].double() - truth[n]).abs().max().item()
        got_err = (got[n].double() - truth[n]).abs().max().item()
        assert got_err <= 4 * ref_err + 1e-2 * truth[n].abs().max().item(), n


def test_int_arithmetic_beyond_int32_gradients():
    """The int64 kernels (see test_kernels.py::test_int_arithmetic_beyond_int32_...) backward."""
    from test_kernels import WIDE_INDEX
    p = attnc.load(WIDE_INDEX)
    q, k, v = qkv(1, 2, 2, 70, 70, 16)
    check_fp32(p, q, k, v, {"m": 40_000_000})  # q * m reaches 2.8e9 > 2**31
