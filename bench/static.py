"""What the generated kernels cost on an NVIDIA GPU, read from the compiler, without a GPU.

    python bench/static.py                       # sm_90, the benchmark patterns, D=128 bf16
    python bench/static.py --cap 80 --head-dim 64 --patterns causal,document
    python bench/static.py --search --patterns causal --head-dim 128   # tile configurations

For each pattern of bench/forward.py and bench/backward.py, builds the launches the CUDA backend
makes for a B=2, H=16, N=4096 call (`runtime/aot.py`: the same builders as at run time, the same
launch policy), compiles each kernel through Triton's NVIDIA pipeline for the target, and prints
a Markdown table. The memory path comes first: scalar 2-byte global loads / stores (a tile moved
element by element: slow), 16-byte vector ones, 16-byte asynchronous copies into shared memory
(Triton's pipeliner) and TMA copies, then `ex2` (the softmax's exponentials), registers and
spill bytes per thread (`ptxas -v`), shared memory per block (with the tile sizes it tells how
many pipeline stages were allocated) and the MMA instructions (`wgmma` is Hopper's warpgroup
MMA; `mma.sync` the Ampere-style one, much slower on Hopper). Throughput itself needs a GPU
(bench/forward.py, bench/backward.py).

`--search` compiles each kernel of the first pattern under every candidate configuration of
`CANDIDATES` (in parallel processes) and prints one row per candidate; the launch policy's
tables (`runtime/policy.py`) were chosen from such runs: no spills, then the largest tiles, then
the most stages that fit. Must run without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attnc  # noqa: E402
from attnc.runtime import aot, policy  # noqa: E402

from backward import LEARNABLE  # noqa: E402  (the tensor arguments bench/backward.py learns)
from forward import PATTERNS, make_case  # noqa: E402

HEADER = ("| pattern | kernel | BM×BN | warps | stages | ld/st 2B | ld/st 16B | cp.async 16B | "
          "TMA | ex2 | registers | spill st / ld (B) | shared (KiB) | wgmma | mma.sync |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

#: configurations `--search` tries per kernel: (BLOCK_M, BLOCK_N, warps, stages)
CANDIDATES = {
    "forward": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3),
                (64, 128, 4, 2), (128, 64, 4, 3)],
    "dq": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3),
           (64, 64, 8, 3)],
    "dkdv": [(32, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3),
             (16, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 2), (32, 64, 8, 3), (16, 128, 8, 2)],
}
_KERNEL_OF = {"attn_fwd": "forward", "attn_kth": "forward", "attn_bwd_dq": "dq",
              "attn_bwd_dkdv": "dkdv"}


def launches(name: str, args, configs: dict | None = None) -> list:
    """The forward and backward launches of one benchmark pattern (cases from bench/forward.py),
    under forced configurations if given."""
    case = make_case(name, args.batch, args.heads, args.n, "cpu")
    shape = dict(batch=args.batch, heads=args.heads, kv_heads=args.heads, q_len=args.n,
                 k_len=args.n, head_dim=args.head_dim, v_dim=args.head_dim)
    dtype = getattr(torch, args.dtype)
    with policy.override(configs or {}):
        out = aot.forward_launches(case.pattern, shape, dtype, case.args,
                                   case.pattern.ir.normalizer == "softmax", args.cap)
        if not args.forward_only:
            out += aot.backward_launches(case.pattern, shape, dtype, case.args,
                                         LEARNABLE.get(name, ()), capability=args.cap)
    return out


def row(name: str, launch, stats: dict) -> str:
    m = launch.meta
    return (f"| {name} | {launch.name} | {m['BLOCK_M']}×{m['BLOCK_N']} | {m['num_warps']} | "
            f"{m['num_stages']} | {stats['ld_b16']} / {stats['st_b16']} | {stats['ld_16B']} / "
            f"{stats['st_16B']} | {stats['cp_async_16B']} | {stats['tma']} | {stats['ex2']} | "
            f"{stats['registers']} | {stats['spill_stores']} / {stats['spill_loads']} | "
            f"{stats['shared'] / 1024:.1f} | {stats['wgmma']} | {stats['mma_sync']} |")


def _compile(name: str, args, configs: dict | None, only: str | None) -> list[str]:
    """Rows for the launches of `name` (only kernel `only` if given): a child process's job."""
    rows = []
    for launch in launches(name, args, configs):
        if only is not None and launch.name != only:
            continue
        try:
            stats = aot.kernel_statistics(aot.compile_launch(launch, args.cap))
        except Exception as e:  # a kernel that does not compile is a finding, not a crash
            first = str(e).splitlines()[0][:200] if str(e) else ""
            rows.append(f"| {name} | {launch.name} | failed: {type(e).__name__}: {first} "
                        f"||||||||||||")
            continue
        rows.append(row(name, launch, stats))
    return rows


def search(args) -> int:
    name = args.patterns[0]
    jobs = []
    for launch in launches(name, args):
        kernel = _KERNEL_OF[launch.name]
        if kernel == "forward" and launch.name == "attn_kth":
            continue
        for bm, bn, warps, stages in CANDIDATES[kernel]:
            jobs.append(({kernel: policy.Config(bm, bn, warps, stages)}, launch.name))
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_compile, name, args, cfg, only) for cfg, only in jobs]
        for f in futures:
            for line in f.result():
                failed += "failed" in line
                print(line, flush=True)
    return 1 if failed == len(jobs) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=list(PATTERNS))
    ap.add_argument("--cap", type=int, default=90, help="compute capability, e.g. 90 or 80")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--search", action="store_true",
                    help="compile the first pattern's kernels under every candidate configuration")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="parallel compiles for --search (default: one per core)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench/static.py compiles for a GPU target: run it without TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    import triton
    print(f"# static kernel statistics, {datetime.date.today()}, sm_{args.cap} (compiled, not run), "
          f"torch {torch.__version__}, triton {triton.__version__}, attnc {attnc.__version__}, "
          f"python {platform.python_version()}")
    print(f"# B={args.batch} H={args.heads} N={args.n} D={args.head_dim} {args.dtype}"
          + (" (configuration search)" if args.search else "") + "\n")
    print(HEADER)
    if args.search:
        return search(args)
    failed = 0
    for name in args.patterns:
        start = time.monotonic()
        rows = _compile(name, args, None, None)
        failed += sum("failed" in r for r in rows)
        for r in rows:
            print(r, flush=True)
        print(f"compiled {name} in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
