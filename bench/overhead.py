"""Host overhead of one cached call: the time from `p(q, k, v)` to the kernel launch and back.

    TRITON_INTERPRET=1 python bench/overhead.py        # CPU: the kernel launch is a no-op
    python bench/overhead.py                           # GPU: real launches on a tiny input

On the CPU the generated kernel is replaced by a no-op, so what is timed is attnc's own Python
work per call (validation, planning, binding, launch set-up): the part a compiled graph or a
cache must keep small. On a GPU the call runs for real on a 1×1×128×64 input, synchronized
once at the end (kernel time is negligible there; Triton's launcher is included), next to
SDPA on the same input. Prints microseconds per call (median of several runs of N calls).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import attnc  # noqa: E402
from attnc.runtime import dispatch  # noqa: E402

PATTERNS = {"causal": {}, "sliding_window": {"window": 64},
            "alibi": {"slopes": None}, "document": {"doc": None}}


def _arguments(p, name, B, H, L, device):
    args = dict(PATTERNS[name])
    if "slopes" in args:
        args["slopes"] = torch.rand(H, device=device)
    if "doc" in args:
        args["doc"] = (torch.arange(L, device=device) // 32).expand(B, L).contiguous()
    return args


def per_call_us(fn, calls: int, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=list(PATTERNS))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("without a GPU run it under TRITON_INTERPRET=1 (the launch is then a no-op)",
              file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:  # time attnc's host work only: the interpreted kernel would take seconds
        real = dispatch.run_launch
        dispatch.run_launch = lambda compiled, launch: None
    B, H, L, D = 1, 1, 128, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for _ in range(3))
    print(f"# host overhead per call, {'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU, no-op launch'}, "
          f"torch {torch.__version__}, attnc {attnc.__version__}; {B}x{H}x{L}x{D}")
    print("| call | µs per call, no grad | µs per call, q requires grad (forward only) |")
    print("|---|---|---|")
    qg = q.detach().requires_grad_()
    for name in args.patterns:
        p = attnc.std(name)
        a = _arguments(p, name, B, H, L, device)
        us = per_call_us(lambda: p(q, k, v, backend="triton", **a), args.calls, args.repeats, sync)
        grad = per_call_us(lambda: p(qg, k, v, backend="triton", **a), args.calls, args.repeats,
                           sync)
        print(f"| {name} | {us:.1f} | {grad:.1f} |", flush=True)
    # a decode step: one query placed at the end of the cache, by an int or per-sequence tensors
    q1, lens = q[:, :, :1], torch.full((B,), L, device=device)
    p = attnc.std("causal")
    for label, kw in (("causal decode step, `q_start=` int", {"q_start": L - 1}),
                      ("causal decode step, `q_start=`/`k_lens=` tensors",
                       {"q_start": lens - 1, "k_lens": lens})):
        us = per_call_us(lambda kw=kw: p(q1, k, v, backend="triton", **kw), args.calls,
                         args.repeats, sync)
        print(f"| {label} | {us:.1f} | — |", flush=True)
    if cuda:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        us = per_call_us(lambda: sdpa(q, k, v, is_causal=True), args.calls, args.repeats, sync)
        grad = per_call_us(lambda: sdpa(qg, k, v, is_causal=True), args.calls, args.repeats, sync)
        print(f"| SDPA (causal) | {us:.1f} | {grad:.1f} |")
    else:
        dispatch.run_launch = real
    return 0


if __name__ == "__main__":
    sys.exit(main())
