"""Context parallelism on paper: what each rank sends and computes for a sharded call, attnc's
sparsity-aware transfers against plain ring attention that passes every shard.

    python bench/ring_scale.py            # the tables of docs/distributed.md (CPU, seconds)
    python bench/ring_scale.py --smoke    # small N: the tile counts checked against p.layout

Nothing here runs attention. The (query chunk, key chunk) pairs are attnc's own sharding plan
(`runtime/ring_plan.py: plan_for`, the pattern's block layout at chunk granularity, exactly what a
call would use); the work of a pair is its non-empty 128 × 128 tiles, counted from each query
tile's key range (the masks of these patterns allow one contiguous key range per row), and
turned into time with attnc's *measured* single-GPU speed (../shared/gpu-baseline.md, H200,
N = 16384: TFLOP/s over computed tiles, 4·128·128·D·H flop per tile forward and 3.5× that
forward + backward). Links move `LINKS` bytes per second per direction per GPU.

The model, per rank:
- attnc posts its transfers in rounds by rank distance, one round ahead of the compute
  (runtime/ring_transfers.py), so a rank takes max(compute, the larger of what it sends and
  what it receives over its link), and holds its own shard and at most two rounds' chunks
  (`K/V held`). Its backward streams K/V again, runs each pair's backward kernels against the
  merged rows (3.5× forward flop in all, as a single-GPU forward + backward) and sends dK/dV
  home: 3× the forward's bytes in all.
- attnc makes one attention call per (query chunk, key chunk) pair a rank computes, forward
  and backward, each with attnc's measured host cost (`CALL_SECONDS`); that cost is listed, not
  added to the times (it overlaps the GPU's work when the GPU's share is longer).
- plain ring attention takes P − 1 steps; in each, every rank passes on the shard it holds
  while computing its queries against it, and the ranks move in lockstep, so a step takes the
  largest of the ranks' compute and one shard's transfer. It holds its own shard and the one
  passing through. Its backward passes K/V and dK/dV (twice the bytes per step). Its kernel
  is assumed to skip empty tiles as attnc's does, and to run at the same speed: the two differ
  in what they send and in how the ranks wait for each other.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import attnc  # noqa: E402
from attnc.lowering.sparsity import EMPTY  # noqa: E402
from attnc.runtime.ring_plan import chunks_of, plan_for  # noqa: E402

#: one attention layer of a Llama-3-8B-sized model, bf16
BATCH, HEADS, KV_HEADS, HEAD_DIM, ELEMENT = 1, 32, 8, 128, 2
TILE = 128
WINDOW = 4096
#: attnc's measured TFLOP/s on an H200 (gpu-baseline.md, N = 16384): forward, forward + backward
RATES = {"causal": (155, 135), "sliding_window": (133, 111), "document": (137, 108)}
#: FlexAttention's, measured in the same runs (where attnc's kernels are headed)
FLEX_RATES = {"causal": (426, 402), "sliding_window": (358, 345), "document": (323, 324)}
LINKS = {"NVLink": 450e9, "InfiniBand": 50e9}
#: attnc's measured host cost of one cached call: 168 µs on the H200's host with the baseline's
#: code (gpu-baseline.md), 34.4 µs for a call placed with int positions with today's code on
#: the 2-core CPU machine, launch replaced by a no-op (bench/RESULTS.md, host overhead)
CALL_SECONDS = (168e-6, 34.4e-6)
ORDER = {"causal": "zigzag", "sliding_window": "contiguous", "document": "contiguous"}


def documents(n: int, seed: int = 0) -> np.ndarray:
    """Document ids of n packed positions: lengths log-uniform in [1K, 64K] (mean about 15K)."""
    rng = np.random.default_rng(seed)
    ids, at, d = np.empty(n, dtype=np.int64), 0, 0
    while at < n:
        length = int(np.exp(rng.uniform(np.log(1024), np.log(65536))))
        ids[at:at + length] = d
        at, d = at + length, d + 1
    return ids


def key_ranges(name: str, n: int, doc: np.ndarray | None):
    """The first and last key tile of every query tile (causal in all three patterns)."""
    first_row = np.arange(0, n, TILE)
    if name == "causal":
        lo = np.zeros_like(first_row)
    elif name == "sliding_window":
        lo = np.maximum(first_row - (WINDOW - 1), 0)
    else:  # a document's first position (rows are causal within their document)
        starts = np.r_[0, np.flatnonzero(np.diff(doc)) + 1]
        lo = starts[np.searchsorted(starts, first_row, side="right") - 1]
    return lo // TILE, np.arange(len(first_row))


def pair_tiles(name: str, n: int, chunks: int, doc) -> np.ndarray:
    """[query chunk, key chunk] counts of non-empty tiles."""
    lo, hi = key_ranges(name, n, doc)
    per = n // chunks // TILE
    lo, hi = lo.reshape(chunks, per, 1), hi.reshape(chunks, per, 1)
    k_lo = (np.arange(chunks) * per).reshape(1, 1, chunks)
    return np.clip(np.minimum(hi, k_lo + per - 1) - np.maximum(lo, k_lo) + 1, 0, None).sum(1)


def arguments(name: str, doc) -> dict:
    if name == "sliding_window":
        return {"window": WINDOW}
    if name == "document":
        return {"doc": torch.from_numpy(doc).view(1, -1)}
    return {}


def shard_of(n: int, world: int, heads: int, device="cpu", head_dim: int = HEAD_DIM):
    """A stand-in shard of the right shape (no memory behind it)."""
    return torch.empty(1, 1, 1, 1, device=device).expand(BATCH, heads, n // world, head_dim)


def estimate(name: str, n: int, world: int, doc=None) -> dict:
    order = ORDER[name]
    held = chunks_of(world, order)
    chunks = world * len(held[0])
    plan = plan_for(attnc.std(name), world, order, shard_of(n, world, HEADS),
                    shard_of(n, world, KV_HEADS), arguments(name, doc))
    tiles = pair_tiles(name, n, chunks, doc)
    live = {(i, j) for i in range(chunks) for j in range(chunks) if tiles[i, j]}
    assert plan.pairs == live, (name, n, world, "the plan and the tile counts disagree")
    chunk_bytes = 2 * BATCH * KV_HEADS * (n // chunks) * HEAD_DIM * ELEMENT  # K and V
    sent = [sum(chunk_bytes for c in held[r] for d in range(world) if d != r
                and c in plan.needed(d)) for r in range(world)]
    received = [sum(chunk_bytes for c in plan.needed(r) if c not in held[r]) for r in range(world)]
    flop = 4 * TILE * TILE * HEAD_DIM * HEADS * BATCH
    work = np.array([sum(tiles[i, j] for i in held[r] for j in range(chunks)) for r in range(world)])
    # plain ring: at step s rank r computes against the shard of rank (r - s) mod P
    steps = np.array([[sum(tiles[i, j] for i in held[r] for j in held[(r - s) % world])
                       for s in range(world)] for r in range(world)])
    calls = max(plan.computed(r) for r in range(world))
    return dict(name=name, n=n, world=world, order=order, pairs=len(plan.pairs), calls=calls,
                total=chunks * chunks, sent=max(sent), received=max(received),
                held=max(chunk_bytes * (len(held[r]) + _two_rounds(plan, r)) for r in range(world)),
                plain=(world - 1) * chunk_bytes * len(held[0]), shard=chunk_bytes * len(held[0]),
                work=work * flop, steps=steps * flop)


def _two_rounds(plan, rank: int) -> int:
    """The most chunks of two consecutive rounds that `rank` receives (what it holds besides
    its own shard): round d brings the chunks of rank − d that its queries reach."""
    reach = set(plan.needed(rank))
    got = [len(reach & set(plan.held[(rank - d) % plan.world])) for d in range(1, plan.world)]
    return max((a + b for a, b in zip(got, got[1:] + [0])), default=0)


def times(e: dict, bandwidth: float, rates: tuple[int, int]) -> dict:
    """Seconds of the forward and of forward + backward, for attnc and plain ring (see the
    docstring). The backward's seconds per forward flop come from the two measured rates:
    3.5 / fwd+bwd rate − 1 / fwd rate."""
    per_flop = {"fwd": 1 / (rates[0] * 1e12),
                "bwd": 3.5 / (rates[1] * 1e12) - 1 / (rates[0] * 1e12)}
    moved = {"fwd": 1, "bwd": 2}  # K/V; then K/V again (attnc) or K/V passing on (plain), dK/dV
    phases = {}
    for phase, cost in per_flop.items():
        compute = float((e["work"] * cost).max())
        comm = moved[phase] * max(e["sent"], e["received"]) / bandwidth
        step_compute = (e["steps"] * cost).max(0)  # the ranks move in lockstep: the slowest
        shard = moved[phase] * e["shard"] / bandwidth
        plain = float(np.maximum(step_compute[:-1], shard).sum() + step_compute[-1])
        phases[phase] = dict(compute=compute, attnc=max(compute, comm), comm=comm, plain=plain,
                             step_compute=float(step_compute.mean()), step_comm=shard)
    both = {key: phases["fwd"][key] + phases["bwd"][key] for key in phases["fwd"]}
    return {"fwd": phases["fwd"], "fwd+bwd": both}


def check_tiles(n: int = 8192) -> None:
    """The analytic tile counts equal the non-empty tiles of `p.layout` (small n)."""
    doc = np.repeat(np.arange(n // 700 + 1), 700)[:n]  # documents of 700 positions
    for name in RATES:
        layout = attnc.std(name).layout(n, n, block=(TILE, TILE), batch=1, heads=1,
                                        **arguments(name, doc))
        want = int((layout.classes != EMPTY).sum())
        got = int(pair_tiles(name, n, 1, doc).sum())
        assert want == got, (name, want, got)
        print(f"{name}: {got} non-empty tiles of {(n // TILE) ** 2} at N={n}, as p.layout says")


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s:.0f} s"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small sizes; check the tile counts")
    args = ap.parse_args(argv)
    check_tiles()
    lengths, worlds = ((32768,), (4,)) if args.smoke else ((131072, 1048576), (8, 64))
    rows = []
    for n in lengths:
        doc = documents(n)
        for world in worlds:
            for name in RATES:
                rows.append(estimate(name, n, world, doc if name == "document" else None))
    print(f"\nB={BATCH}, heads {HEADS}, kv heads {KV_HEADS}, D={HEAD_DIM}, bf16; window {WINDOW}; "
          f"documents log-uniform 1K-64K; attnc's measured H200 speed\n")
    print("| pattern | N | P | order | pairs computed | attnc sends / rank | plain ring sends / rank "
          "| K/V held / rank: attnc, plain | compute / rank, fwd ms | pair calls / rank "
          "| their host ms at 168 / 34 µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for e in rows:
        t = times(e, LINKS["NVLink"], RATES[e["name"]])
        print(f"| {e['name']} | {e['n'] // 1024}K | {e['world']} | {e['order']} | "
              f"{e['pairs']} of {e['total']} | {fmt_bytes(e['sent'])} | {fmt_bytes(e['plain'])} | "
              f"{fmt_bytes(e['held'])}, {fmt_bytes(2 * e['shard'])} | "
              f"{fmt_time(t['fwd']['compute'])} | {e['calls']} | "
              + " / ".join(f"{e['calls'] * c * 1e3:.1f}" for c in CALL_SECONDS) + " |")
    for rates_name, rates in (("attnc's measured speed", RATES), ("FlexAttention's measured speed", FLEX_RATES)):
        print(f"\nforward + backward, ms, at {rates_name}: attnc's compute alone, attnc and plain "
              f"ring with their transfers, and plain ring's mean step (compute vs transfer)\n")
        print("| pattern | N | P | attnc compute | NVLink: attnc | NVLink: plain | NVLink step | "
              "IB: attnc | IB: plain | IB step |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for e in rows:
            cells = []
            for link in LINKS.values():
                t = times(e, link, rates[e["name"]])["fwd+bwd"]
                cells += [fmt_time(t["attnc"]), fmt_time(t["plain"]),
                          f"{fmt_time(t['step_compute'])} vs {fmt_time(t['step_comm'])}"]
            t = times(e, LINKS["NVLink"], rates[e["name"]])["fwd+bwd"]
            print(f"| {e['name']} | {e['n'] // 1024}K | {e['world']} | {fmt_time(t['compute'])} | "
                  + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
