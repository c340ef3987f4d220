"""The command line, `attnc fuzz` (or `python -m attnc.runtime.fuzz`): fuzz random patterns or
one file's for a time budget, print progress, shrink and save a failure, replay reproducers.

The budget is a deadline, not a hint: the case in flight when it passes is abandoned (engine's
`alarm_at`), and so is the shrinking of a failure (the smallest failing case so far is saved). A
progress line comes at least every `PROGRESS_SECONDS`, from a thread, however long a case runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import replace

import torch

from ...dsl import config
from ...dsl.diagnostics import SpecError
from ..commandline import Exit, for_command_line, is_std, read_spec
from ..pattern import Pattern
from .case import LONG, PROFILES, cases
from .corpus import replay, save_reproducer
from .engine import search
from .interpreter import kernel_backend_ready, reexec_with_interpreter
from .outcomes import PROPERTIES, PropertyFailure, Stats

#: the budget when neither --seconds nor --examples is given
DEFAULT_SECONDS = 60.0
#: the most seconds between two progress lines (the issue asks for at most 5)
PROGRESS_SECONDS = 4.0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnc fuzz", description=(
        "Differential fuzzing: check random patterns (or FILE's pattern) over random shapes, dtypes, "
        "tiles and arguments against the reference interpreter; shrink and save any failure. Exit "
        "code 0: no failure; 1: a property failed (reproducer saved) or FILE has an error; 2: usage."))
    ap.add_argument("file", nargs="?", metavar="FILE",
                    help="a .attn file or std.NAME to fuzz (default: random patterns)")
    ap.add_argument("--name", metavar="P", help="which pattern of FILE (default: its only one; for std.NAME "
                                                "the pattern NAME)")
    ap.add_argument("--seconds", type=float, default=None, metavar="N",
                    help=f"time budget; the case in flight at the end is abandoned (default: {DEFAULT_SECONDS:g}, "
                         "or none with --examples)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    ap.add_argument("--backend", choices=("triton", "reference"), default="triton",
                    help="triton: also compare generated kernels with the fp64 reference; "
                         "reference: only the cheap properties (default: %(default)s)")
    ap.add_argument("--max-patterns", type=int, default=None, metavar="N",
                    help="stop after this many distinct patterns (default: no limit)")
    ap.add_argument("--corpus", default=os.path.join("tests", "corpus"), metavar="DIR",
                    help="where reproducers are saved (default: %(default)s)")
    ap.add_argument("--max-len", type=int, default=LONG.max_len, metavar="L",
                    help="longest q_len / k_len (default: %(default)s)")
    ap.add_argument("--replay", metavar="JSON", nargs="+",
                    help="replay saved reproducers and exit (default: fuzz instead)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="long",
                    help="size profile; the test suite uses ci-kernel: lengths <= 64, 16x16 tiles "
                         "(default: %(default)s)")
    ap.add_argument("--keep-going", action="store_true",
                    help="after a failure, save it and go on fuzzing; exit code 1 at the end (default: off)")
    ap.add_argument("--examples", type=int, default=None, metavar="N",
                    help="stop after this many generated cases, one hypothesis run, deterministic "
                         "with --seed (default: as many as the time allows)")
    # internal: the end of the budget as a time.time() value, from `attnc fuzz` to the copy of
    # itself it starts under Triton's interpreter, so that the child's start-up counts
    ap.add_argument("--until", type=float, default=None, help=argparse.SUPPRESS)
    return ap


class _Progress:
    """While fuzzing, a thread prints `[ T s] stats` every `PROGRESS_SECONDS` (a case may take
    longer than that)."""

    def __init__(self, stats: Stats, start: float):
        self.stats, self.start = stats, start
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="attnc-fuzz-progress", daemon=True)

    def line(self) -> str:
        return f"[{time.monotonic() - self.start:5.0f} s] {self.stats.line()}"

    def _run(self):
        while not self.done.wait(PROGRESS_SECONDS):
            print(self.line(), flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def main(argv=None) -> int:
    """`attnc fuzz`; the exit codes of `runtime.commandline.Exit`."""
    entered = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    args = ap.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        ap.error(f"--seconds must be positive, got {args.seconds:g}")
    seconds = args.seconds if args.seconds is not None or args.examples is not None else DEFAULT_SECONDS
    if args.until is not None:
        seconds = args.until - time.time()
    if args.backend == "triton" and not kernel_backend_ready():
        if torch.cuda.is_available() or config.fuzz_child():
            print("attnc fuzz: error: generated kernels cannot run here", file=sys.stderr)
            return Exit.USAGE
        if seconds is not None and args.until is None:
            argv += ["--until", repr(time.time() - (time.monotonic() - entered) + seconds)]
        return reexec_with_interpreter(argv)
    if args.replay:
        status = Exit.OK
        for path in args.replay:
            try:
                replay(path, args.backend)
                print(f"ok {path}")
            except PropertyFailure as e:
                print(f"FAIL {path}\n{e}")
                status = Exit.ERROR
        return status
    profile = PROFILES[args.profile]
    if args.max_len != LONG.max_len:
        profile = replace(profile, max_len=args.max_len)
    source = name = None
    if args.file:
        try:
            source, path = read_spec(args.file)
            name = args.name if args.name is not None or not is_std(args.file) else args.file[len("std."):]
            name = Pattern.from_source(source, name, path=path).name
        except SpecError as e:
            print(for_command_line(e).render(), file=sys.stderr)
            return Exit.ERROR
        except (OSError, UnicodeDecodeError) as e:
            print(f"attnc fuzz: error: cannot read {args.file}: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            return Exit.ERROR
    props = PROPERTIES if args.backend == "triton" else tuple(p for p in PROPERTIES if p not in ("kernel", "grad"))
    if source is not None:
        props = tuple(p for p in props if p != "robustness")
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    batch = 10 if "kernel" in props else 50
    stats = Stats()
    start = time.monotonic()
    deadline = None if seconds is None else start + max(seconds, 0.0)
    what = f"{args.file} ({name})" if source else "random patterns"
    budget = "no time limit" if seconds is None else f"{max(seconds, 0.0):.0f} s"
    print(f"attnc fuzz: {what}, seed {seed}, backend {args.backend}, properties {', '.join(props)}, "
          f"{budget}" + (f", {args.examples} cases" if args.examples is not None else ""), flush=True)
    found_all = []
    with _Progress(stats, start) as progress:
        if args.examples is not None:
            found = search(cases(profile, source, name), props, args.backend, args.examples, seed, stats,
                           deadline=deadline)
            if found is not None:
                stats.failures += 1
                found_all.append(found)
        else:
            i = 0
            while not stats.out_of_time and time.monotonic() < deadline and \
                    (args.max_patterns is None or len(stats.patterns) < args.max_patterns):
                found = search(cases(profile, source, name), props, args.backend, batch, seed * 100003 + i, stats,
                               deadline=deadline)
                i += 1
                if found is not None:
                    stats.failures += 1
                    found_all.append(found)
                    if not args.keep_going:
                        break
                    _finish(found, stats, args.corpus)
    print(progress.line(), flush=True)
    if stats.abandoned:
        print(f"time is up after {time.monotonic() - start:.1f} s: the case in flight was abandoned")
    if args.keep_going and found_all:
        _summary(f"{len(found_all)} failures, reproducers under {args.corpus}", stats)
        return Exit.ERROR
    return _finish(found_all[0] if found_all else None, stats, args.corpus)


def _finish(found, stats: Stats, corpus) -> int:
    if found is not None:
        case, failure = found
        attn, sidecar = save_reproducer(case, failure, corpus)
        print(f"\nFAIL {failure}\n\nminimal reproducer ({case.describe()}):\n{case.source}")
        print(f"saved: {attn}\n       {sidecar}\nreplay: python -m attnc.runtime.fuzz --replay {sidecar}")
        print(f"after {stats.line()}")
        return Exit.ERROR
    _summary("no failures", stats)
    return Exit.OK


def _summary(headline: str, stats: Stats) -> None:
    print(f"{headline}: {stats.line()}")
    if stats.unsupported:
        print("unsupported by the kernel backend:")
        for msg, n in stats.unsupported.most_common(10):
            print(f"  {n:6d}  {msg}")
    if stats.rejected:
        print("rejected by the reference (not failures):")
        for msg, n in stats.rejected.most_common(10):
            print(f"  {n:6d}  {msg}")
