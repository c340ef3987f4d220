"""Decoding throughput: one step of generation against a KV cache, attnc vs FlexAttention vs SDPA.

    python bench/decode.py                      # needs a CUDA GPU; prints a Markdown table
    python bench/decode.py --k-len 32768 --q-len 1 --patterns causal
    TRITON_INTERPRET=1 python bench/decode.py --smoke   # CPU: tiny shapes, checks agreement only

Each row is one call: queries [batch, heads, q_len, D] placed at the end of a cache of k_len keys
per sequence ([batch, kv_heads, k_len, D], GQA), bf16; `paged` rows read the same cache from a
pool of 64-row pages in shuffled order through a block table (FlexAttention and SDPA read the
contiguous cache: the paged attnc row is compared with them as the same step). `causal` attends to the whole cache
(bottom-right), `streaming` to a window of 4096 plus 4 sinks. attnc is called with positions
(`q_start = k_len - q_len`), as a decoder would; its split-K count and launches are its own
policy's. The memory traffic that bounds a decode step is reading K and V: GB/s is the bytes of K
and V the pattern reads (every cached key for causal, the window and the sinks for streaming)
over the time, and `of copy` compares it with this device's copy bandwidth (a large
device-to-device copy, read + write, measured here). FlexAttention is `torch.compile`d with its
block mask built outside the timed region; SDPA runs where it needs no dense mask (causal at
q_len 1). Every backend's output is checked against attnc's before timing.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import attnc  # noqa: E402
import common  # noqa: E402

PATTERNS = ("causal", "streaming")
WINDOW, SINKS = 4096, 4
PAGE = 64


def paged(k, v, page: int):
    """k and v [B, Hkv, L, D] as pools of `page`-row pages in a shuffled order, and the block
    table [B, L // page] (L a multiple of `page`)."""
    B, Hkv, L, D = k.shape
    n = L // page
    order = torch.randperm(B * n, generator=torch.Generator().manual_seed(0)).to(k.device)

    def pool(t):
        out = torch.empty(B * n, Hkv, page, t.shape[-1], dtype=t.dtype, device=t.device)
        out[order] = t.view(B, Hkv, n, page, -1).permute(0, 2, 1, 3, 4).reshape(B * n, Hkv, page, -1)
        return out
    return pool(k), pool(v), order.view(B, n).to(torch.int32)


def timed(fn, smoke: bool) -> float:
    """Milliseconds per call (a decode step is short: 25 ms of warm-up, 100 of repeats)."""
    return common.timed(fn, smoke, warmup=25, rep=100)


def copy_bandwidth(device) -> float:
    """The device's copy bandwidth in GB/s (bytes read + written by a 1 GiB copy)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), False)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def kv_bytes(pattern: str, B, Hkv, k_len, q_len, D, itemsize) -> int:
    """Bytes of K and V the pattern reads."""
    keys = k_len if pattern == "causal" else min(k_len, WINDOW + q_len - 1 + SINKS)
    return 2 * B * Hkv * keys * D * itemsize


def mask_mod(pattern: str, offset: int):
    if pattern == "causal":
        return lambda b, h, q, k: q + offset >= k
    return lambda b, h, q, k: (q + offset >= k) & ((q + offset - k < WINDOW) | (k < SINKS))


def run(args) -> list[dict]:
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    rows = []
    for k_len in args.k_len:
        for q_len in args.q_len:
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(B, H, q_len, D, generator=gen).to(device, dtype)
            k = torch.randn(B, Hkv, k_len, D, generator=gen).to(device, dtype)
            v = torch.randn(B, Hkv, k_len, D, generator=gen).to(device, dtype)
            pools = paged(k, v, PAGE) if "paged" in args.caches else None
            for name, cache in itertools.product(args.patterns, args.caches):
                p = attnc.std(name)
                kw = dict(q_start=k_len - q_len)
                if name == "streaming":
                    kw.update(window=WINDOW, sinks=SINKS)
                if args.smoke:
                    kw["backend"] = "triton"
                kv = (k, v) if cache == "contiguous" else pools[:2]
                if cache == "paged":
                    kw["block_table"] = pools[2]

                def ours(p=p, kw=kw, kv=kv):
                    with torch.no_grad():
                        return p(q, *kv, **kw)
                out = ours()
                row = dict(pattern=name if cache == "contiguous" else f"{name} (paged)",
                           k_len=k_len, q_len=q_len,
                           bytes=kv_bytes(name, B, Hkv, k_len, q_len, D, q.element_size()))
                if args.smoke:  # agreement with the reference: that is all a smoke run checks
                    ref = p(q, *kv, **dict(kw, backend="reference"))
                    row["max_diff"] = float((out.float() - ref.float()).abs().max())
                row["attnc_ms"] = timed(ours, args.smoke)
                row.update(flex(name, q, k, v, k_len - q_len, out, args.smoke))
                if name == "causal" and q_len == 1:
                    from torch.nn.functional import scaled_dot_product_attention as sdpa
                    got = sdpa(q, k, v, enable_gqa=True)
                    row["sdpa_diff"] = float((got.float() - out.float()).abs().max())
                    row["sdpa_ms"] = timed(lambda: sdpa(q, k, v, enable_gqa=True), args.smoke)
                rows.append(row)
    return rows


def flex(name: str, q, k, v, offset: int, out, smoke: bool) -> dict:
    """FlexAttention (compiled; block mask built once) on the same call."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return {}
    B, H, Lq, _ = q.shape
    mask = create_block_mask(mask_mod(name, offset), B, H, Lq, k.shape[2], device=q.device)
    fn = flex_attention if smoke else torch.compile(flex_attention)
    got = fn(q, k, v, block_mask=mask, enable_gqa=True)
    return dict(flex_diff=float((got.float() - out.float()).abs().max()),
                flex_ms=timed(lambda: fn(q, k, v, block_mask=mask, enable_gqa=True), smoke))


def fmt(x, spec: str) -> str:
    return "—" if x is None or x != x else format(x, spec)


def table(rows, copy_gbps: float | None) -> str:
    head = ("| pattern | k_len | q_len | attnc ms | GB/s | of copy | Flex ms | SDPA ms | "
            "attnc vs Flex | max diff |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        gbps = r["bytes"] / r["attnc_ms"] / 1e6 if r["attnc_ms"] == r["attnc_ms"] else None
        share = gbps / copy_gbps if gbps is not None and copy_gbps else None
        speed = (r["flex_ms"] / r["attnc_ms"] if r.get("flex_ms") and gbps is not None else None)
        diff = max(x for x in (r.get("max_diff", 0.0), r.get("flex_diff", 0.0),
                               r.get("sdpa_diff", 0.0)))
        lines.append(f"| {r['pattern']} | {r['k_len']} | {r['q_len']} | "
                     f"{fmt(r['attnc_ms'], '.3f')} | {fmt(gbps, '.0f')} | {fmt(share, '.0%')} | "
                     f"{fmt(r.get('flex_ms'), '.3f')} | {fmt(r.get('sdpa_ms'), '.3f')} | "
                     f"{fmt(speed, '.2f')}× | {diff:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--k-len", type=ints, default=[4096, 32768, 131072])
    ap.add_argument("--q-len", type=ints, default=[1, 4])
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=list(PATTERNS))
    ap.add_argument("--caches", type=lambda s: s.split(","), default=["contiguous", "paged"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU run under TRITON_INTERPRET=1: checks agreement, times nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        args.k_len, args.q_len, args.batch, args.heads, args.kv_heads, args.head_dim = (
            [320], [1, 4], 2, 4, 2, 16)
    elif not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA GPU (none found); nothing measured. "
              "Use --smoke under TRITON_INTERPRET=1 for a CPU correctness run.")
        return 0
    else:
        from torch import _dynamo  # FlexAttention recompiles per length: off its eager path
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(_dynamo.config, name):
                setattr(_dynamo.config, name, 1024)
    import triton
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (interpreter)"
    print(f"# decode, {datetime.date.today()}, {device_name}, torch {torch.__version__}, "
          f"triton {triton.__version__}, attnc {attnc.__version__}, "
          f"python {platform.python_version()}")
    print(f"# B={args.batch} H={args.heads} KV heads={args.kv_heads} D={args.head_dim} "
          f"{'fp32 (smoke)' if args.smoke else 'bf16'}")
    copy_gbps = None if args.smoke else copy_bandwidth("cuda")
    if copy_gbps:
        print(f"# copy bandwidth: {copy_gbps:.0f} GB/s (device-to-device copy, read + write)")
    print()
    rows = run(args)
    print(table(rows, copy_gbps))
    worst = max(max(r.get("max_diff", 0.0), r.get("flex_diff", 0.0), r.get("sdpa_diff", 0.0))
                for r in rows)
    tol = 1e-4 if args.smoke else 5e-2
    if worst > tol:
        print(f"\nbackends disagree: max difference {worst:.2e} > {tol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
