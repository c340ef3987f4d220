"""What the GPU benchmarks share: the throughput benchmarks' command line and header line, and
the timer."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch


def parse_args(description: str, patterns, smoke: tuple, what: str, argv=None):
    """Options of a GPU throughput benchmark; `smoke` = (n, batch, heads, head_dim) for `--smoke`.
    Returns the namespace, or an exit code when there is nothing to run."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384])
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=list(patterns))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny CPU run under TRITON_INTERPRET=1: checks {what}, times nothing")
    args = ap.parse_args(argv)
    script = os.path.basename(sys.argv[0]) or "the benchmark"
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        n, args.batch, args.heads, args.head_dim = smoke
        args.n = [n]
    else:
        # FlexAttention compiles once per pattern and length; past the default limit dynamo
        # silently falls back to its slow eager path, which would be timed instead
        import torch._dynamo
        for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                            ("accumulated_recompile_limit", 4096),
                            ("accumulated_cache_size_limit", 4096)):
            if hasattr(torch._dynamo.config, name):  # the names changed across torch versions
                setattr(torch._dynamo.config, name, value)
    if not args.smoke and not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU (none found); nothing measured. "
              "Use --smoke under TRITON_INTERPRET=1 for a CPU correctness run.")
        return 0
    return args


def bench_main(doc: str, patterns, smoke: tuple, what: str, kind: str, header: str, run, argv=None) -> int:
    """A throughput benchmark's `main`: options, the header line, the table from `run(args)`."""
    args = parse_args(doc.splitlines()[0], patterns, smoke, what, argv)
    if isinstance(args, int):
        return args
    print_header(kind, args)
    print(header)
    run(args)
    return 0


def print_header(kind: str, args) -> None:
    """The device, date and versions line every result table starts with."""
    import triton

    import attnc
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (interpreter)"
    print(f"# {kind}, {datetime.date.today()}, {device_name}, torch {torch.__version__}, "
          f"triton {triton.__version__}, attnc {attnc.__version__}, python {platform.python_version()}")
    print(f"# B={args.batch} H={args.heads} D={args.head_dim} bf16\n")


def add_throughput(row: dict, keys, flops_dense: float, flops_tiles: float) -> None:
    """TFLOP/s columns from each backend's `<key>_ms`: as if dense, and over computed tiles."""
    for key in keys:
        ms = row.get(f"{key}_ms")
        if ms is not None and ms == ms:
            row[f"{key}_tflops_dense"] = flops_dense / ms / 1e9
            row[f"{key}_tflops_tiles"] = flops_tiles / ms / 1e9


def fmt(x, spec: str) -> str:
    """A table cell: '—' for a missing or NaN value."""
    return "—" if x is None or x != x else format(x, spec)


def timed(fn, smoke: bool, warmup: int = 50, rep: int = 200) -> float:
    """Milliseconds per call (median of Triton's do_bench), or nan in smoke mode (one call)."""
    if smoke:
        fn()
        return float("nan")
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep)
