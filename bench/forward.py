"""Forward attention throughput: attnc's generated kernels vs FlexAttention vs SDPA, one process.

    python bench/forward.py                 # needs a CUDA GPU; prints a Markdown table
    python bench/forward.py --n 4096 --patterns causal,document
    TRITON_INTERPRET=1 python bench/forward.py --smoke   # CPU: tiny shapes, checks agreement only

TFLOP/s are reported two ways: over the tiles the kernel computes (non-empty tiles of attnc's
block layout; 4·BM·BN·D flops each: QKᵀ and PV) and dense-equivalent (4·N²·D per head, as if
nothing were skipped). FlexAttention is `torch.compile`d, with its block mask built once outside
the timed region. SDPA runs where the pattern is expressible without a dense mask (causal).
Every backend's output is checked against attnc's before timing (max abs difference printed).
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attnc  # noqa: E402
from common import add_throughput, bench_main, fmt, timed  # noqa: E402
from attnc.runtime import dispatch  # noqa: E402
from attnc.runtime.layout import build_layout  # noqa: E402
from attnc.runtime.samples import random_tensor_arguments  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")
PATTERNS = ("causal", "sliding_window", "document", "alibi_causal", "gaussian_mixture",
            "neighborhood_2d", "sharp_topk", "tau_causal")


class Case:
    """One benchmark pattern: the attnc pattern and arguments, and its Flex / SDPA equivalents."""

    def __init__(self, name, pattern, args, mask_mod=None, score_mod=None, sdpa=None):
        self.name, self.pattern, self.args = name, pattern, args
        self.mask_mod, self.score_mod, self.sdpa = mask_mod, score_mod, sdpa


def grid_side(n: int) -> int:
    side = int(math.isqrt(n))
    return side if side * side == n else 64


def make_case(name: str, B: int, H: int, N: int, device) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    if name == "causal":
        return Case(name, attnc.std("causal"), {}, mask_mod=lambda b, h, q, k: q >= k,
                    sdpa=dict(is_causal=True))
    if name == "sliding_window":
        w = 1024
        return Case(name, attnc.std("sliding_window"), dict(window=w),
                    mask_mod=lambda b, h, q, k: (q >= k) & (q - k < w))
    if name == "document":
        # about 12 documents of random lengths per sequence, causal inside each
        p = attnc.std("document")
        sizes = dict(batch=B, heads=H, kv_heads=H, q_len=N, k_len=N, head_dim=64)
        doc = random_tensor_arguments(p.ir, sizes, {}, generator=g, device=device, documents=12)["doc"]
        return Case(name, p, dict(doc=doc), mask_mod=lambda b, h, q, k: (doc[b, q] == doc[b, k]) & (q >= k))
    if name == "alibi_causal":
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)], device=device)
        return Case(name, attnc.std("alibi"), dict(slopes=slopes),
                    mask_mod=lambda b, h, q, k: q >= k,
                    score_mod=lambda s, b, h, q, k: s - slopes[h] * (q - k).abs())
    if name == "gaussian_mixture":
        width, n = 64, 3
        alpha = (0.5 + torch.rand(H, n, generator=g)).to(device)
        sigma = (2.0 + 6.0 * torch.rand(H, n, generator=g)).to(device)

        def gmm(s, b, h, q, k):
            dy = (q // width - k // width).to(torch.float32)
            dx = (q % width - k % width).to(torch.float32)
            d2 = dx * dx + dy * dy
            w = sum(alpha[h, i] * torch.exp(-d2 / (2 * sigma[h, i] ** 2)) for i in range(n))
            return s * w
        return Case(name, attnc.std("gaussian_mixture"), dict(width=width, n=n, alpha=alpha, sigma=sigma),
                    score_mod=gmm)
    if name == "neighborhood_2d":
        side = grid_side(N)
        height, width, kernel = N // side, side, 7
        r = kernel // 2

        def nbr(b, h, q, k):
            cy = (q // width).clamp(r, height - 1 - r)
            cx = (q % width).clamp(r, width - 1 - r)
            return ((k // width - cy).abs() <= r) & ((k % width - cx).abs() <= r)
        return Case(name, attnc.std("neighborhood_2d"), dict(height=height, width=width, kernel=kernel),
                    mask_mod=nbr)
    if name == "sharp_topk":  # no FlexAttention / SDPA equivalent: top-k is not a mask_mod
        return Case(name, attnc.load(os.path.join(EXAMPLES, "sharp_topk.attn")), dict(tau=0.5, top=32))
    if name == "tau_causal":  # sharp_topk without its `select`: what top-k costs is the ratio
        return Case(name, attnc.compile("pattern tau_causal(tau: float = 0.5):\n    score /= tau\n"
                                        "    mask q >= k\n"), dict(tau=0.5),
                    mask_mod=lambda b, h, q, k: q >= k, score_mod=lambda s, b, h, q, k: s / 0.5)
    raise SystemExit(f"unknown pattern {name!r}; choose from {', '.join(PATTERNS)}")


def computed_tiles(case: Case, q, k, v) -> tuple[int, int, int, float]:
    """(non-empty tiles over all batches and heads, BLOCK_M, BLOCK_N, their share of all tiles)
    of attnc's layout."""
    B, H, N, D = q.shape
    bound = case.pattern.bind(q, k, v, case.args)
    tiles = dispatch.forward_config(case.pattern.ir, bound, q, v)
    lay = build_layout(case.pattern.ir, bound, N, N, tiles.block_m, tiles.block_n, q.device)
    Bd, Hd = lay.classes.shape[:2]
    visited = int((lay.classes != 0).sum()) * (B // Bd) * (H // Hd)
    total = B * H * math.ceil(N / tiles.block_m) * math.ceil(N / tiles.block_n)
    return visited, tiles.block_m, tiles.block_n, visited / total


def flex_fns(case: Case, B, H, N, device, smoke: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fa = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if case.mask_mod is not None:
        block_mask = create_block_mask(case.mask_mod, B, H, N, N, device=device,
                                       _compile=not smoke)
    return lambda q, k, v: fa(q, k, v, score_mod=case.score_mod, block_mask=block_mask)


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    rows = []
    for N in args.n:
        for name in args.patterns:
            B, H, D = args.batch, args.heads, args.head_dim
            case = make_case(name, B, H, N, device)
            g = torch.Generator(device="cpu").manual_seed(1)
            q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(3))
            visited, bm, bn, density = computed_tiles(case, q, k, v)
            flops_tiles = 4.0 * visited * bm * bn * D
            flops_dense = 4.0 * B * H * N * N * D

            def ours():
                return case.pattern(q, k, v, backend="triton", **case.args)
            out = ours()
            row = dict(pattern=name, N=N, density=density)
            row["attnc_ms"] = timed(ours, args.smoke)
            if case.mask_mod is not None or case.score_mod is not None:
                flex = flex_fns(case, B, H, N, device, args.smoke)
                row["flex_err"] = (flex(q, k, v).float() - out.float()).abs().max().item()
                row["flex_ms"] = timed(lambda: flex(q, k, v), args.smoke)
            if case.sdpa is not None:
                sdpa = torch.nn.functional.scaled_dot_product_attention
                row["sdpa_err"] = (sdpa(q, k, v, **case.sdpa).float() - out.float()).abs().max().item()
                row["sdpa_ms"] = timed(lambda: sdpa(q, k, v, **case.sdpa), args.smoke)
            add_throughput(row, ("attnc", "flex", "sdpa"), flops_dense, flops_tiles)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = ("| pattern | N | density | attnc ms | attnc TFLOP/s (tiles / dense) | Flex ms | Flex TFLOP/s "
          "(dense) | SDPA ms | SDPA TFLOP/s (dense) | max |Δ| vs Flex / SDPA |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['pattern']} | {r['N']} | {r['density']:.3f} | {fmt(r.get('attnc_ms'), '.3f')} | "
            f"{fmt(r.get('attnc_tflops_tiles'), '.1f')} / {fmt(r.get('attnc_tflops_dense'), '.1f')} | "
            f"{fmt(r.get('flex_ms'), '.3f')} | {fmt(r.get('flex_tflops_dense'), '.1f')} | "
            f"{fmt(r.get('sdpa_ms'), '.3f')} | {fmt(r.get('sdpa_tflops_dense'), '.1f')} | "
            f"{fmt(r.get('flex_err'), '.2e')} / {fmt(r.get('sdpa_err'), '.2e')} |")


def main(argv=None) -> int:
    return bench_main(__doc__, PATTERNS, (256, 1, 2, 32), "agreement", "forward", HEADER, run, argv)


if __name__ == "__main__":
    sys.exit(main())
