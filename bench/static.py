"""What the generated kernels cost on an NVIDIA GPU, read from the compiler, without a GPU.

    python bench/static.py                       # sm_90, the benchmark patterns, D=128 bf16
    python bench/static.py --cap 80 --head-dim 64 --patterns causal,document

For each pattern of bench/forward.py and bench/backward.py, builds the launches the CUDA backend
makes for a B=2, H=16, N=4096 call (`runtime/aot.py`: the same builders as at run time, the same
CUDA tile table), compiles each kernel through Triton's NVIDIA pipeline for the target, and
prints a Markdown table of what `ptxas -v` allocated (registers per thread, spill bytes) and what
the kernel uses: shared memory per block and its MMA instructions (`wgmma` is Hopper's
warpgroup MMA; `mma.sync` is the Ampere-style MMA, much slower on Hopper). Spills and `mma.sync`
on sm_90 are the static signs of a slow kernel; throughput itself needs a GPU
(bench/forward.py, bench/backward.py). Must run without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attnc  # noqa: E402
from attnc.runtime import aot  # noqa: E402

from backward import LEARNABLE  # noqa: E402  (the tensor arguments bench/backward.py learns)
from forward import PATTERNS, make_case  # noqa: E402

HEADER = ("| pattern | kernel | BM×BN | warps | stages | registers | spill st / ld (B) | "
          "shared (KiB) | wgmma | mma.sync |\n|---|---|---|---|---|---|---|---|---|---|")


def launches(name: str, args) -> list:
    """The forward and backward launches of one benchmark pattern (cases from bench/forward.py)."""
    case = make_case(name, args.batch, args.heads, args.n, "cpu")
    shape = dict(batch=args.batch, heads=args.heads, kv_heads=args.heads, q_len=args.n,
                 k_len=args.n, head_dim=args.head_dim, v_dim=args.head_dim)
    dtype = getattr(torch, args.dtype)
    out = aot.forward_launches(case.pattern, shape, dtype, case.args,
                               case.pattern.ir.normalizer == "softmax", args.cap)
    if not args.forward_only:
        out += aot.backward_launches(case.pattern, shape, dtype, case.args,
                                     LEARNABLE.get(name, ()), capability=args.cap)
    return out


def row(name: str, launch, stats: dict) -> str:
    m = launch.meta
    return (f"| {name} | {launch.name} | {m['BLOCK_M']}×{m['BLOCK_N']} | {m['num_warps']} | "
            f"{m['num_stages']} | {stats['registers']} | {stats['spill_stores']} / "
            f"{stats['spill_loads']} | {stats['shared'] / 1024:.1f} | {stats['wgmma']} | "
            f"{stats['mma_sync']} |")


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
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench/static.py compiles for a GPU target: run it without TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    import triton
    print(f"# static kernel statistics, {datetime.date.today()}, sm_{args.cap} (compiled, not run), "
          f"torch {torch.__version__}, triton {triton.__version__}, attnc {attnc.__version__}, "
          f"python {platform.python_version()}")
    print(f"# B={args.batch} H={args.heads} N={args.n} D={args.head_dim} {args.dtype}\n")
    print(HEADER)
    failed = 0
    for name in args.patterns:
        for launch in launches(name, args):
            start = time.monotonic()
            try:
                stats = aot.kernel_statistics(aot.compile_launch(launch, args.cap))
            except Exception as e:  # a kernel that does not compile is a finding, not a crash
                failed += 1
                print(f"| {name} | {launch.name} | failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''} |||||||||", flush=True)
                continue
            print(row(name, launch, stats), flush=True)
            print(f"compiled {name}/{launch.name} in {time.monotonic() - start:.1f} s",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
