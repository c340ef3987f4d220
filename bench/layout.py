"""Layout build time and peak memory: attnc's analysis vs FlexAttention's `create_block_mask`.

    python bench/layout.py [--sizes 4096,16384,65536,131072] [--threads 1] [--flex-budget-s 120]

Same masks, BLOCK_SIZE 128, device cpu. Each flex variant runs in a child process (so an OOM or
a timeout kills only that measurement) and is skipped at sizes where its dense [N, N] work
would not fit: eager needs several N² boolean/int temporaries (skipped when N² * 12 bytes exceed
half the free memory); compiled is skipped when the previous size already took longer than the
budget. attnc's time is the median of 5 builds with the cache cleared (after one warm-up build at
N=1024); flex's is the median of 3 calls (1 at N > 16384), compiled after a first compiling call.
Peak memory is the growth of the child's peak RSS (ru_maxrss) over the timed calls, so it shows
N² temporaries but reads ~0 when a build fits in memory the process already touched.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

BLOCK = 128


def _doc_ids(n: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(torch.randint(256, 8192, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - n
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def _width_height(n: int):
    return 256, max(1, n // 256)


def _attnc(case: str, n: int):
    import attnc
    from attnc.runtime import layout as L
    if case == "sliding_window":
        p, args = attnc.std("sliding_window"), dict(window=1024)
    elif case == "neighborhood_2d":
        w, h = _width_height(n)
        p, args = attnc.std("neighborhood_2d"), dict(width=w, height=h, kernel=13)
    else:
        p, args = attnc.std("document"), dict(doc=_doc_ids(n).view(1, -1), causal=True)
    p.layout(q_len=1024, block=(BLOCK, BLOCK), **(args if case != "document" else dict(doc=_doc_ids(1024).view(1, -1))))
    base = _rss_mb()
    times = []
    for _ in range(5):
        L._cache.clear()
        t = time.perf_counter()
        lay = p.layout(q_len=n, block=(BLOCK, BLOCK), **args)
        times.append(time.perf_counter() - t)
    return statistics.median(times), lay.density(), _rss_mb() - base


def _flex(case: str, n: int, compiled: bool):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    if case == "sliding_window":
        def mask_mod(b, h, q, k):
            return (q >= k) & (q - k < 1024)
    elif case == "neighborhood_2d":
        w, h_ = _width_height(n)
        r = 13 // 2

        def mask_mod(b, h, q, k):
            qy, qx, ky, kx = q // w, q % w, k // w, k % w
            cy = torch.clamp(qy, r, h_ - 1 - r)
            cx = torch.clamp(qx, r, w - 1 - r)
            return ((ky - cy).abs() <= r) & ((kx - cx).abs() <= r)
    else:
        doc = _doc_ids(n)

        def mask_mod(b, h, q, k):
            return (doc[q] == doc[k]) & (q >= k)
    fn = torch.compile(create_block_mask) if compiled else create_block_mask
    base = _rss_mb()
    kw = dict(B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu", BLOCK_SIZE=BLOCK)
    if compiled:
        fn(mask_mod, **kw)   # compile once; the steady-state call is what a training loop pays
    base = _rss_mb()
    times = []
    for _ in range(3 if n <= 16384 else 1):
        t = time.perf_counter()
        bm = fn(mask_mod, **kw)
        times.append(time.perf_counter() - t)
    nnz = int(bm.kv_num_blocks.sum()) + (int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0)
    return statistics.median(times), nnz / bm.kv_num_blocks.shape[-1] ** 2, _rss_mb() - base


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind, case, n, threads, out):
    import torch
    torch.set_num_threads(threads)
    try:
        if kind == "attnc":
            t, dens, peak = _attnc(case, n)
        else:
            t, dens, peak = _flex(case, n, kind == "flex_compiled")
        out.put(dict(ok=True, time=t, density=dens, peak_mb=peak))
    except Exception as e:  # a failed measurement is reported in the table, not hidden
        out.put(dict(ok=False, error=f"{type(e).__name__}: {str(e)[:80]}"))


def measure(kind, case, n, threads, timeout):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, case, n, threads, q))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return dict(ok=False, error=f"timeout > {timeout}s")
    if proc.exitcode != 0:
        return dict(ok=False, error=f"killed (exit {proc.exitcode}, likely out of memory)")
    return q.get()


def _free_bytes():
    with open("/proc/meminfo") as f:
        info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}
    return info.get("MemAvailable", 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384,65536,131072")
    ap.add_argument("--cases", default="sliding_window,neighborhood_2d,document")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flex-budget-s", type=float, default=120)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, threads {a.threads}")
    print("| mask | N | attnc ms | attnc MB | flex eager ms | eager MB | flex compiled ms | compiled MB | speedup vs compiled |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in a.cases.split(","):
        slow = False
        for n in sizes:
            r = {"attnc": measure("attnc", case, n, a.threads, 300)}
            if n * n * 12 < _free_bytes() / 2:
                r["flex_eager"] = measure("flex_eager", case, n, a.threads, a.flex_budget_s * 2)
            else:
                r["flex_eager"] = dict(ok=False, error="skipped: dense N² temporaries exceed memory")
            if not slow:
                r["flex_compiled"] = measure("flex_compiled", case, n, a.threads, a.flex_budget_s * 3)
                slow = not r["flex_compiled"]["ok"] or r["flex_compiled"]["time"] > a.flex_budget_s / 4
            else:
                r["flex_compiled"] = dict(ok=False, error="skipped: previous size over budget")

            def cell(m, key, scale=1.0, fmt="{:.1f}"):
                return fmt.format(m[key] * scale) if m.get("ok") else m.get("error", "-")
            sp = "-"
            if r["attnc"].get("ok") and r["flex_compiled"].get("ok"):
                sp = f"{r['flex_compiled']['time'] / r['attnc']['time']:.0f}x"
            print(f"| {case} | {n} | {cell(r['attnc'], 'time', 1e3)} | {cell(r['attnc'], 'peak_mb')} | "
                  f"{cell(r['flex_eager'], 'time', 1e3)} | {cell(r['flex_eager'], 'peak_mb')} | "
                  f"{cell(r['flex_compiled'], 'time', 1e3)} | {cell(r['flex_compiled'], 'peak_mb')} | {sp} |",
                  flush=True)
            rows.append(dict(case=case, n=n, **r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
