"""Forward+backward attention throughput: attnc's generated kernels vs FlexAttention, one process.

    python bench/backward.py                 # needs a CUDA GPU; prints a Markdown table
    python bench/backward.py --n 4096 --patterns causal,gaussian_mixture
    TRITON_INTERPRET=1 python bench/backward.py --smoke   # CPU: tiny shapes, checks gradients only

One timed step is `out = attention(q, k, v); out.backward(dO)` with q, k, v (and, for
gaussian_mixture, α and σ) requiring grad. TFLOP/s count 3.5 × the forward's flops
(FlashAttention's convention: the backward does 2.5 × the forward's matmul work), dense-equivalent
(4·N²·D per head for the forward, as if nothing were skipped) for both backends, and over the
tiles attnc computes. Patterns and their Flex equivalents come from bench/forward.py. Before
timing, every gradient of both backends is compared (max |Δ| printed, relative to max |grad|).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import add_throughput, bench_main, fmt  # noqa: E402

PATTERNS = ("causal", "sliding_window", "document", "alibi_causal", "gaussian_mixture", "neighborhood_2d")
LEARNABLE = {"gaussian_mixture": ("alpha", "sigma")}


def _forward_bench():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forward.py")
    spec = importlib.util.spec_from_file_location("attnc_bench_forward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_fns(case, q, k, v, dout, flex):
    """(attnc step, Flex step or None), each returning the gradients it produced."""
    learn = [case.args[n] for n in LEARNABLE.get(case.name, ())]
    leaves = [q, k, v, *learn]

    def attnc_step():
        out = case.pattern(q, k, v, backend="triton", **case.args)
        return torch.autograd.grad(out, leaves, dout)

    def flex_step():
        out = flex(q, k, v)
        return torch.autograd.grad(out, leaves, dout)
    return attnc_step, (flex_step if flex is not None else None)


def max_rel_diff(a, b) -> float:
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12)).item()
               for x, y in zip(a, b))


def run(args) -> list[dict]:
    fwd = _forward_bench()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    rows = []
    for N in args.n:
        for name in args.patterns:
            B, H, D = args.batch, args.heads, args.head_dim
            case = fwd.make_case(name, B, H, N, device)
            for n in LEARNABLE.get(name, ()):
                case.args[n].requires_grad_(True)  # the Flex score_mod captures the same tensors
            g = torch.Generator(device="cpu").manual_seed(1)
            q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_(True)
                       for _ in range(3))
            dout = torch.randn(B, H, N, D, generator=g).to(device, dtype)
            visited, bm, bn, density = fwd.computed_tiles(case, q, k, v)
            flops_dense = 3.5 * 4.0 * B * H * N * N * D
            flops_tiles = 3.5 * 4.0 * visited * bm * bn * D
            flex = None
            if case.mask_mod is not None or case.score_mod is not None:
                flex = fwd.flex_fns(case, B, H, N, device, args.smoke)
            ours, theirs = step_fns(case, q, k, v, dout, flex)
            row = dict(pattern=name, N=N, density=density)
            mine = ours()
            if args.smoke:  # the generated backward against autograd through the reference
                ref = [case.pattern(q, k, v, backend="reference", **case.args)]
                want = torch.autograd.grad(ref, [q, k, v] + [case.args[n] for n in LEARNABLE.get(name, ())],
                                           dout)
                row["ref_err"] = max_rel_diff(mine, want)
            row["attnc_ms"] = fwd.timed(ours, args.smoke)
            if theirs is not None:
                try:
                    row["flex_err"] = max_rel_diff(mine, theirs())
                    row["flex_ms"] = fwd.timed(theirs, args.smoke)
                except Exception as e:  # e.g. a Flex version without gradients for captured tensors
                    row["flex_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            add_throughput(row, ("attnc", "flex"), flops_dense, flops_tiles)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = ("| pattern | N | density | attnc ms | attnc TFLOP/s (tiles / dense) | Flex ms | "
          "Flex TFLOP/s (dense) | attnc / Flex | max rel |Δ| grads vs Flex (vs reference) |\n"
          "|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    a, f = r.get("attnc_ms"), r.get("flex_ms")
    speed = f / a if a and f and a == a and f == f else None
    note = f" {r['flex_note']}" if "flex_note" in r else ""
    return (f"| {r['pattern']} | {r['N']} | {r['density']:.3f} | {fmt(a, '.3f')} | "
            f"{fmt(r.get('attnc_tflops_tiles'), '.1f')} / {fmt(r.get('attnc_tflops_dense'), '.1f')} | "
            f"{fmt(f, '.3f')} | {fmt(r.get('flex_tflops_dense'), '.1f')} | {fmt(speed, '.2f')}× | "
            f"{fmt(r.get('flex_err'), '.2e')} ({fmt(r.get('ref_err'), '.2e')}){note} |")


def main(argv=None) -> int:
    return bench_main(__doc__, PATTERNS, (64, 1, 2, 16), "gradients", "forward+backward", HEADER, run, argv)


if __name__ == "__main__":
    sys.exit(main())
