"""The command line, `attnc fuzz` (or `python -m attnc.runtime.fuzz`): fuzz random patterns or
one file's for a time budget, print progress, shrink and save a failure, replay reproducers."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ...dsl import config
from ...dsl.diagnostics import SpecError
from ..pattern import Pattern
from .case import LONG, PROFILES, cases
from .corpus import replay, save_reproducer
from .engine import search
from .interpreter import kernel_backend_ready, reexec_with_interpreter
from .outcomes import PROPERTIES, PropertyFailure, Stats

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnc fuzz", description=(
        "Differential fuzzing: check random patterns (or FILE's pattern) over random shapes, dtypes, "
        "tiles and arguments against the reference interpreter; shrink and save any failure."))
    ap.add_argument("file", nargs="?", help="a .attn file to fuzz (default: random patterns)")
    ap.add_argument("--name", help="which pattern of FILE")
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    ap.add_argument("--backend", choices=("triton", "reference"), default="triton",
                    help="triton: also compare generated kernels with the fp64 reference; "
                         "reference: only the cheap properties")
    ap.add_argument("--max-patterns", type=int, default=None, help="stop after this many distinct patterns")
    ap.add_argument("--corpus", default=os.path.join("tests", "corpus"),
                    help="where reproducers are saved (default tests/corpus)")
    ap.add_argument("--max-len", type=int, default=LONG.max_len, help="longest q_len / k_len (default 200)")
    ap.add_argument("--replay", metavar="JSON", nargs="+", help="replay saved reproducers and exit")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="long",
                    help="size profile (the test suite uses ci-kernel: lengths <= 64, 16x16 tiles)")
    ap.add_argument("--keep-going", action="store_true",
                    help="after a failure, save it and go on fuzzing (exit code 1 at the end)")
    ap.add_argument("--examples", type=int, default=None,
                    help="stop after this many generated cases (one hypothesis run; deterministic with --seed)")
    return ap


def main(argv=None) -> int:
    """`attnc fuzz`: 0 when no property failed, 1 on a failure (reproducer saved), 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.backend == "triton" and not kernel_backend_ready():
        if torch.cuda.is_available() or config.fuzz_child():
            print("attnc fuzz: generated kernels cannot run here", file=sys.stderr)
            return 2
        return reexec_with_interpreter(argv)
    if args.replay:
        status = 0
        for path in args.replay:
            try:
                replay(path, args.backend)
                print(f"ok {path}")
            except PropertyFailure as e:
                print(f"FAIL {path}\n{e}")
                status = 1
        return status
    profile = PROFILES[args.profile]
    if args.max_len != LONG.max_len:
        profile = replace(profile, max_len=args.max_len)
    source = name = None
    if args.file:
        try:
            source = Path(args.file).read_text(encoding="utf-8")
            name = Pattern.from_source(source, args.name, path=args.file).name  # errors name the file
        except (OSError, SpecError) as e:
            print(f"attnc fuzz: {e}", file=sys.stderr)
            return 2
    props = PROPERTIES if args.backend == "triton" else tuple(p for p in PROPERTIES if p not in ("kernel", "grad"))
    if source is not None:
        props = tuple(p for p in props if p != "robustness")
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    batch = 10 if "kernel" in props else 50
    stats = Stats()
    start = time.monotonic()
    what = f"{args.file} ({name})" if source else "random patterns"
    print(f"attnc fuzz: {what}, seed {seed}, backend {args.backend}, properties {', '.join(props)}, "
          f"{args.seconds:g} s", flush=True)
    if args.examples is not None:
        found = search(cases(profile, source, name), props, args.backend, args.examples, seed, stats)
        return _finish(found, stats, args.corpus)
    i, failed = 0, 0
    while time.monotonic() - start < args.seconds and \
            (args.max_patterns is None or len(stats.patterns) < args.max_patterns):
        found = search(cases(profile, source, name), props, args.backend, batch, seed * 100003 + i, stats,
                       deadline=start + args.seconds)
        i += 1
        print(f"[{time.monotonic() - start:7.0f} s] {stats.line()}", flush=True)
        if found is not None:
            failed += 1
            if not args.keep_going:
                return _finish(found, stats, args.corpus)
            _finish(found, stats, args.corpus)
    status = _finish(None, stats, args.corpus)
    if failed:
        print(f"{failed} failures; reproducers under {args.corpus}")
    return 1 if failed else status


def _finish(found, stats: Stats, corpus) -> int:
    if found is not None:
        case, failure = found
        attn, sidecar = save_reproducer(case, failure, corpus)
        print(f"\nFAIL {failure}\n\nminimal reproducer ({case.describe()}):\n{case.source}")
        print(f"saved: {attn}\n       {sidecar}\nreplay: python -m attnc.runtime.fuzz --replay {sidecar}")
        print(f"after {stats.line()}")
        return 1
    print(f"no failures: {stats.line()}")
    if stats.unsupported:
        print("unsupported by the kernel backend:")
        for msg, n in stats.unsupported.most_common(10):
            print(f"  {n:6d}  {msg}")
    if stats.rejected:
        print("rejected by the reference (not failures):")
        for msg, n in stats.rejected.most_common(10):
            print(f"  {n:6d}  {msg}")
    return 0
