"""One rank of a sharded call, timed on one GPU: what bench/ring_scale.py assumes, measured.

    python bench/ring_rank.py                          # needs a CUDA GPU; a Markdown table
    TRITON_INTERPRET=1 python bench/ring_rank.py --smoke   # CPU: tiny; checks, times nothing

A sharded call (`attnc.parallel.ring_attention`) attends each rank's query chunks to the key
chunks they reach, one call per (query chunk, key chunk) pair, and merges the partials; its
backward runs each pair's backward kernels against the merged rows. bench/ring_scale.py models
that work at the single-GPU kernel speed. Here the busiest rank of each case does exactly that
work with every key chunk already on the GPU (the same code as a sharded call, without the
transfers: `Calls.attend` and `Gradients.pairs`), timed against one call per query chunk over
the whole sequence (the same tiles in one launch) and against the model's estimate. The
difference is what pair-by-pair calls and merges cost: launches, host time and merging.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))
sys.path.insert(0, HERE)

import attnc  # noqa: E402
import common  # noqa: E402
import ring_scale as scale  # noqa: E402
from attnc.runtime.ring_backward import Gradients  # noqa: E402
from attnc.runtime.ring_patterns import Calls  # noqa: E402
from attnc.runtime.ring_plan import chunks_of, plan_for  # noqa: E402

CASES = [(name, 131072, world) for world in (8, 64) for name in scale.RATES]
SMOKE = [(name, 512, 4) for name in scale.RATES]


def run_case(name: str, n: int, world: int, device, dtype, heads, kv_heads, head_dim, smoke):
    order = scale.ORDER[name]
    pattern = attnc.std(name)
    doc = scale.documents(n) if name == "document" else None
    if smoke and doc is not None:  # documents short enough to cross the tiny chunks
        doc = torch.arange(n).numpy() // 40
    args = {key: (x.to(device) if isinstance(x, torch.Tensor) else x)
            for key, x in scale.arguments(name, doc).items()}
    per = len(chunks_of(world, order)[0])
    plan = plan_for(pattern, world, order, scale.shard_of(n, world, heads, device, head_dim),
                    scale.shard_of(n, world, kv_heads, device, head_dim), args)
    rank, chunk = max(range(world), key=plan.computed), plan.chunk
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, chunk * per, head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(1, kv_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
            for _ in range(2))
    chunks = [(c, k[:, :, c * chunk:(c + 1) * chunk], v[:, :, c * chunk:(c + 1) * chunk])
              for c in plan.needed(rank)]
    calls = Calls(pattern, plan, rank, {"scale": None, "backend": "triton", **args})
    out, lse = calls.attend(q, k, v, chunks)
    # the same rows by one call per query chunk over the whole sequence
    whole = [pattern(calls.rows(q, qc), k, v, q_start=qc * chunk, backend="triton",
                     return_lse=True, **args) for qc in plan.held[rank]]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out, torch.cat([o for o, _ in whole], dim=2), rtol=tol, atol=tol)
    grad_out = torch.randn_like(out)

    own = [t.detach().requires_grad_() for t in (q, k[:, :, :chunk * per], v[:, :, :chunk * per])]

    def backward():
        grads = Gradients(calls, *own, out, lse, grad_out, None, [], ())
        for c, kk, vv in chunks:
            grads.pairs(c, kk, vv, home=False)
        return grads.dq

    def whole_backward():
        dq = []
        for qc in plan.held[rank]:
            leaves = [t.detach().requires_grad_() for t in (calls.rows(q, qc), k, v)]
            o = pattern(*leaves, q_start=qc * chunk, backend="triton", **args)
            dq.append(torch.autograd.grad(o, leaves, calls.rows(grad_out, qc))[0])
        return torch.cat(dq, dim=2)

    torch.testing.assert_close(backward(), whole_backward(), rtol=tol, atol=tol)

    row = dict(name=name, n=n, world=world, rank=rank, calls=plan.computed(rank))
    row["fwd"] = common.timed(lambda: calls.attend(q, k, v, chunks), smoke, 25, 100)
    row["fwd_whole"] = common.timed(lambda: [pattern(calls.rows(q, qc), k, v,
                                                     q_start=qc * chunk, backend="triton", **args)
                                             for qc in plan.held[rank]], smoke, 25, 100)
    row["bwd"] = common.timed(backward, smoke, 25, 100)
    row["fwd_bwd_whole"] = common.timed(whole_backward, smoke, 25, 100)
    if not smoke:
        est = scale.estimate(name, n, world, doc)
        t = scale.times(est, scale.LINKS["NVLink"], scale.RATES[name])
        row["model_fwd"] = t["fwd"]["compute"] * 1e3
        row["model_fwd_bwd"] = t["fwd+bwd"]["compute"] * 1e3
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("ring_rank.py needs a CUDA GPU (none found); nothing measured. Use --smoke under "
              "TRITON_INTERPRET=1 for a CPU check.")
        return 0
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    dims = (2, 1, 16) if args.smoke else (scale.HEADS, scale.KV_HEADS, scale.HEAD_DIM)
    print(f"# one rank of a sharded call, {device}, heads/kv heads/D = {dims}, {dtype}\n")
    print("| pattern | N | P | rank | pair calls | fwd ms: pairs | one call per chunk | model "
          "| bwd ms: pairs | fwd+bwd, one call per chunk | model fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, world in (SMOKE if args.smoke else CASES):
        r = run_case(name, n, world, device, dtype, *dims, args.smoke)
        cells = [common.fmt(r.get(key), ".2f") for key in
                 ("fwd", "fwd_whole", "model_fwd", "bwd", "fwd_bwd_whole", "model_fwd_bwd")]
        length = f"{n // 1024}K" if n >= 1024 else str(n)
        print(f"| {name} | {length} | {world} | {r['rank']} | {r['calls']} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
