"""Time and peak memory of the reference interpreter at long sequence length, on the CPU.

The reference backend evaluates query rows in chunks, so its memory is O(chunk x k_len), not
O(q_len x k_len). Issue 2 requires B=1, H=8, N=16384, D=64 fp32 (causal) to run with a peak
resident set under 4 GiB.

    python bench/reference_memory.py            # the issue's configuration
    python bench/reference_memory.py --n 4096   # smaller, quicker
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

import torch

import attnc

LIMIT_GIB = 4.0


def peak_rss_gib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 30) if sys.platform == "darwin" else rss / (1 << 20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--n", type=int, default=16384, help="q_len = k_len")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--pattern", default="causal", help="a standard-library pattern (default causal)")
    args = ap.parse_args(argv)

    pattern = attnc.std(args.pattern)
    B, H, N, D = args.batch, args.heads, args.n, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    inputs_gib = 3 * q.numel() * q.element_size() / (1 << 30)
    before = peak_rss_gib()

    t0 = time.perf_counter()
    with torch.no_grad():
        out = pattern(q, k, v, backend="reference")
    elapsed = time.perf_counter() - t0
    peak = peak_rss_gib()

    print(f"reference interpreter, std.{args.pattern}, B={B} H={H} N={N} D={D} fp32, CPU "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"time            {elapsed:.1f} s")
    print(f"peak RSS        {peak:.2f} GiB (before the call: {before:.2f} GiB; q, k, v: {inputs_gib:.2f} GiB)")
    print(f"dense N x N fp32 scores would need {B * H * N * N * 4 / (1 << 30):.1f} GiB")
    ok = bool(torch.isfinite(out).all())
    print(f"output finite   {ok}")
    within = peak < LIMIT_GIB
    print(f"requirement     peak RSS < {LIMIT_GIB:.0f} GiB: {'met' if within else 'NOT met'}")
    return 0 if within and ok else 1


if __name__ == "__main__":
    sys.exit(main())
