"""The `attnc` command line: check, show, run and emit `.attn` patterns.

    attnc check FILE...             parse and check; exit 1 if any file has an error
    attnc show FILE                 a text picture of the mask (or --layout: of the block layout)
    attnc run FILE                  run the pattern on random inputs; report time and statistics
    attnc emit FILE                 print the generated Triton kernel
    attnc fuzz [FILE]               differential fuzzing (runtime/fuzz/; needs hypothesis, a test extra)

FILE may also name a standard-library pattern as `std.NAME`, for every command. The exit codes
are one table, `runtime.commandline.Exit` (the README lists them); errors speak the command
line's words (`--set prefix=...`, `--name P`), not the Python API's.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from .dsl import config
from .dsl.diagnostics import SpecError
from .runtime.commandline import (
    EXIT_MEANING,
    Exit,
    cli_wording,
    for_command_line,
    is_std,
    read_spec,
)


class UsageError(Exception):
    """A command-line argument that cannot be understood (`Exit.USAGE`)."""


# ----------------------------------------------------------------------------- helpers

def parse_value(text: str):
    """`--set` values: true/false, then int, then float; anything else is a usage error."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"cannot read `{text}` as a number or true/false") from None
    if not math.isfinite(value):
        raise UsageError(f"`{text}` is not a finite number")
    return value


def parse_settings(items) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--set expects key=value, got `{item}`")
        out[key] = parse_value(value)
    return out


def load_pattern(file: str, name: str | None):
    """A pattern from a `.attn` file, or from the standard library when FILE is `std.NAME`
    (whose file's own pattern is the default, as for `attnc.std`)."""
    import attnc
    text, path = read_spec(file)
    if name is None and is_std(file):
        name = file[len("std."):]
    return attnc.compile(text, name, path)


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
            "fp64": torch.float64}[name]


def _sizes(args) -> dict[str, int]:
    """The sizes a command runs at; k_len and kv_heads default to q_len and heads."""
    sizes = {"batch": args.batch, "heads": args.heads,
             "kv_heads": getattr(args, "kv_heads", None) or args.heads,
             "q_len": args.q_len, "k_len": args.q_len if args.k_len is None else args.k_len,
             "head_dim": args.head_dim}
    for key, value in sizes.items():
        if key.endswith("_len") and value < 0 or not key.endswith("_len") and value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be "
                             f"{'non-negative' if key.endswith('_len') else 'positive'}, got {value}")
    if sizes["heads"] % sizes["kv_heads"]:
        raise UsageError(f"--heads ({sizes['heads']}) must be a multiple of --kv-heads ({sizes['kv_heads']})")
    return sizes


def _split_arguments(pattern, settings: dict):
    """`--set` values must be scalar parameters of the pattern (tensor arguments are generated)."""
    from .runtime.binding import unknown_keyword
    tensors = {t.name for t in pattern.tensors}
    params = {p.name for p in pattern.ir.params}
    for key in settings:
        if key in tensors:
            raise UsageError(f"`{key}` is a tensor argument of `{pattern.name}`; the CLI fills it with "
                             "random values and it cannot be set")
        if key not in params:
            raise unknown_keyword(pattern.ir, key)
    return dict(settings)


def _bind(pattern, sizes: dict, settings: dict, device, generator):
    """Bind scalar settings, generate the tensor arguments, and check them all."""
    from .runtime.binding import bind
    from .runtime.samples import random_tensor_arguments
    scalars = _split_arguments(pattern, settings)
    # bind once without tensors to learn the parameter values (defaults filled in)
    params_only = bind(_scalars_only(pattern.ir), sizes, scalars)
    tensors = random_tensor_arguments(pattern.ir, sizes, params_only.params, generator=generator,
                                      device=device)
    arguments = {**scalars, **tensors}
    return bind(pattern.ir, sizes, arguments), arguments


def _scalars_only(ir):
    from dataclasses import replace
    return replace(ir, tensors=())


def _describe_args(bound) -> str:
    parts = [f"{k}={v}" for k, v in bound.params.items()]
    parts += [f"{k}: {str(t.dtype).replace('torch.', '')}{list(t.shape)}" for k, t in bound.tensors.items()]
    return ", ".join(parts) if parts else "(none)"


# ----------------------------------------------------------------------------- commands

def cmd_check(args) -> int:
    from .dsl.checker import check_library
    from .dsl.loader import build_library
    from .lowering.lower import lower_pattern
    status = Exit.OK
    files = []
    for file in args.files:
        if os.path.isdir(file):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(file) for f in fs if f.endswith(".attn"))
            if not found:
                print(f"error: no .attn files under {file}", file=sys.stderr)
                status = Exit.ERROR
            files.extend(found)
        else:
            files.append(file)
    for file in files:
        try:
            text, path = read_spec(file)
            lib = build_library(text, path)
            check_library(lib)
            for ref in lib.local_patterns():
                lower_pattern(ref)
        except SpecError as e:
            print(for_command_line(e).render(), file=sys.stderr)
            n = len(e.diagnostics)
            print(f"{file}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
            status = Exit.ERROR
            continue
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read {file}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            status = Exit.ERROR
            continue
        names = ", ".join(r.pattern.name for r in lib.local_patterns())
        print(f"{file}: ok ({names})")
    return status


#: `attnc show --layout` without --q-len draws this many tiles per side
LAYOUT_TILES = 8
#: `attnc show` without --q-len (and without --layout) draws this many queries
SHOW_Q_LEN = 16


def cmd_show(args) -> int:
    import torch

    from .runtime.maskview import mask_cells, masks_read_score, render_cells
    if args.png and not args.layout:
        raise UsageError("--png saves a picture of the block layout: add --layout "
                         "(the mask itself is drawn as text)")
    block = _parse_block(args.block)
    if args.q_len is None:
        args.q_len = LAYOUT_TILES * block[0] if args.layout else SHOW_Q_LEN
        if args.layout and args.k_len is None:
            args.k_len = LAYOUT_TILES * block[1]
    pattern = load_pattern(args.file, args.name)
    settings = parse_settings(args.set)
    sizes = _sizes(args)
    gen = torch.Generator().manual_seed(args.seed)
    bound, arguments = _bind(pattern, sizes, settings, "cpu", gen)
    print(f"pattern {pattern.name}  q_len={sizes['q_len']} k_len={sizes['k_len']}  "
          f"arguments: {_describe_args(bound)}")
    if args.layout:
        return _show_layout(pattern, sizes, arguments, block, args)
    if args.width < 1 or args.height < 1:
        raise UsageError("--width and --height must be positive")
    if not 0 <= args.head < sizes["heads"]:
        raise UsageError(f"--head must be in [0, {sizes['heads']}), got {args.head}")
    score_inputs = None
    if masks_read_score(pattern.ir):
        D = sizes["head_dim"]

        def score_inputs(rows, cols):  # random q and k at the positions drawn
            return (torch.randn(1, 1, len(rows), D, generator=gen), torch.randn(1, 1, len(cols), D, generator=gen),
                    1.0 / math.sqrt(D))
        print("note: a mask reads `score`; this picture uses random q and k")
    cells = mask_cells(pattern.ir, bound, 0, args.head, args.height, args.width, score_inputs)
    allowed, evaluated = int(cells.allowed.sum()), int(cells.evaluated.sum())
    total = sizes["q_len"] * sizes["k_len"]
    if cells.exact:
        print(f"batch 0, head {args.head}: {allowed} of {total} positions allowed"
              + (f" ({allowed / total:.1%})" if total else ""))
    else:
        print(f"batch 0, head {args.head}: about {allowed / evaluated:.1%} of {total} positions allowed "
              f"(from {evaluated} evenly spaced samples)")
    if pattern.ir.topk is not None:
        print("note: `select topk` then keeps the top keys of each row (data-dependent, not drawn)")
    print(render_cells(cells))
    return Exit.OK


def _show_layout(pattern, sizes, arguments, block, args) -> int:
    from .runtime.layout import LEGEND
    layout = pattern.layout(q_len=sizes["q_len"], k_len=sizes["k_len"], block=block, batch=sizes["batch"],
                            heads=sizes["heads"], kv_heads=sizes["kv_heads"], head_dim=sizes["head_dim"],
                            **arguments)
    print(layout.text())
    print(f"legend: {LEGEND}")
    if args.png:
        try:
            layout.save_png(args.png)
        except ImportError as e:  # matplotlib is optional: pip install 'attnc[png]'
            print(f"error: {e}", file=sys.stderr)
            return Exit.USAGE
        print(f"wrote {args.png}")
    return Exit.OK


def _parse_block(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        bm, bn = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise UsageError(f"--block expects BM,BN (e.g. 64,64), got `{text}`") from None
    if bm < 1 or bn < 1:
        raise UsageError(f"--block sizes must be positive, got `{text}`")
    return bm, bn


#: under Triton's interpreter, roughly how long one forward tile takes (32 x 32, head dim 64, on
#: a laptop-class CPU core), and from how many seconds on `attnc run` warns
INTERPRETER_SECONDS_PER_TILE = 0.015
INTERPRETER_WARN_SECONDS = 10.0


def cmd_run(args) -> int:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available on this machine")
    dtype_name = args.dtype or ("fp16" if device == "cuda" else "fp32")
    dtype = _torch_dtype(dtype_name)
    interpreted = args.backend == "triton" and device == "cpu"
    if interpreted and not config.interpreted():
        raise UsageError("--backend triton on the CPU runs the kernels under Triton's interpreter: "
                         "set TRITON_INTERPRET=1 (e.g. `TRITON_INTERPRET=1 attnc run ...`)")
    pattern = load_pattern(args.file, args.name)
    settings = parse_settings(args.set)
    sizes = _sizes(args)
    gen = torch.Generator().manual_seed(args.seed)
    bound, arguments = _bind(pattern, sizes, settings, device, gen)
    B, H, Hkv, Lq, Lk, D = (sizes[k] for k in ("batch", "heads", "kv_heads", "q_len", "k_len", "head_dim"))
    q = torch.randn(B, H, Lq, D, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to(device=device, dtype=dtype)
    softmax = pattern.ir.normalizer == "softmax"
    print(f"pattern   {pattern.name} ({pattern.ir.path})")
    print(f"arguments {_describe_args(bound)}")
    print(f"shapes    q [{B}, {H}, {Lq}, {D}]  k, v [{B}, {Hkv}, {Lk}, {D}]  dtype {dtype_name}  device {device}")
    if interpreted:
        _interpreter_note(pattern, sizes, arguments, dtype, args.repeat)
    times = []
    out = lse = None
    with torch.no_grad():
        for _ in range(max(1, args.repeat)):
            _sync(device)
            t0 = time.perf_counter()
            res = pattern(q, k, v, backend=args.backend, return_lse=softmax, **arguments)
            _sync(device)
            times.append(time.perf_counter() - t0)
    out, lse = res if softmax else (res, None)
    used = _backend_used(args.backend, q)
    print(f"backend   {used}" + (" (Triton's interpreter)" if interpreted else "")
          + (f" (asked: {args.backend})" if args.backend != used else ""))
    timing = f"{times[0] * 1e3:.2f} ms (first call)"
    if len(times) > 1:
        rest = sorted(times[1:])
        timing += f", {rest[len(rest) // 2] * 1e3:.2f} ms (median of {len(rest)} more)"
    print(f"time      {timing}")
    o = out.float()
    finite = torch.isfinite(o)
    n_bad = int((~finite).sum())
    o_ok = o[finite] if n_bad else o
    if o_ok.numel():
        print(f"output    [{', '.join(map(str, out.shape))}]  mean {o_ok.mean().item():+.4g}  "
              f"std {o_ok.std().item() if o_ok.numel() > 1 else 0.0:.4g}  "
              f"abs max {o_ok.abs().max().item():.4g}")
    else:
        print(f"output    [{', '.join(map(str, out.shape))}]  (empty)")
    empty = _empty_rows(pattern, bound, q, k, lse)
    rows = B * H * Lq
    if empty is not None and rows:
        print(f"rows      {empty} of {rows} fully masked ({empty / rows:.2%})")
    print(f"NaN/inf   {'none' if n_bad == 0 else f'{n_bad} non-finite values'}")
    return Exit.OK if n_bad == 0 else Exit.ERROR


def _interpreter_note(pattern, sizes, arguments, dtype, repeat) -> None:
    """Say that the kernels are interpreted, and warn when the shapes make that slow."""
    from .runtime.policy import INTERPRETER, config_for
    print("note      the kernel runs under Triton's interpreter (CPU, TRITON_INTERPRET=1): a correctness "
          "check, orders of magnitude slower than a GPU")
    tile = config_for("forward", INTERPRETER, sizes["head_dim"], sizes["head_dim"], dtype)
    layout = pattern.layout(q_len=sizes["q_len"], k_len=sizes["k_len"], block=(tile.block_m, tile.block_n),
                            batch=sizes["batch"], heads=sizes["heads"], kv_heads=sizes["kv_heads"],
                            head_dim=sizes["head_dim"], **arguments)
    per_slice = layout.density() * layout.n_q_tiles * layout.n_k_tiles
    tiles = round(per_slice * sizes["batch"] * sizes["heads"])
    seconds = tiles * INTERPRETER_SECONDS_PER_TILE * max(1, sizes["head_dim"] / 64) * max(1, repeat)
    if seconds >= INTERPRETER_WARN_SECONDS:
        print(f"warning   {tiles} tiles of {tile.block_m}x{tile.block_n} per call under the interpreter: "
              f"expect roughly {seconds:.0f} s or more; smaller --q-len / --heads / --batch run faster, "
              "and --backend reference is the quick way to try a pattern", flush=True)


def _sync(device):
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _backend_used(asked: str, q) -> str:
    if asked != "auto":
        return asked
    if q.is_cuda:
        from .runtime.dispatch import triton_available
        return "triton" if triton_available() else "reference"
    return "reference"


def _empty_rows(pattern, bound, q, k, lse) -> int | None:
    """How many query rows have no allowed key (from the LSE for softmax, else from the masks)."""
    import torch

    from .runtime.maskview import evaluate_masks, final_score, masks_read_score
    if lse is not None:
        return int(torch.isneginf(lse).sum())
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    chunk = max(1, (1 << 22) // max(1, B * H * max(Lk, 1)))
    count = 0
    scale = 1.0 / math.sqrt(D) if D else 1.0
    for q0 in range(0, Lq, chunk):
        q1 = min(Lq, q0 + chunk)
        score = final_score(pattern.ir, bound, q[:, :, q0:q1], k, scale, q0) \
            if masks_read_score(pattern.ir) else None
        keep = evaluate_masks(pattern.ir, bound, q0, q1, score=score, device=q.device)
        count += int((~keep.any(dim=-1)).sum())
    return count


def cmd_emit(args) -> int:
    pattern = load_pattern(args.file, args.name)
    print(pattern.triton_source(**_split_arguments(pattern, parse_settings(args.set))))
    return Exit.OK


# ----------------------------------------------------------------------------- argument parsing

def _add_pattern_args(p, seed: bool = True):
    p.add_argument("file", metavar="FILE", help="a .attn file, or std.NAME for a standard pattern")
    p.add_argument("--name", metavar="P",
                   help="which pattern, when the file defines several (default: the only one; for "
                        "std.NAME the pattern NAME)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="a scalar parameter (int, float, true/false); repeatable (default: the "
                        "pattern's own defaults)")
    if seed:
        p.add_argument("--seed", type=int, default=0,
                       help="seed for the random inputs and tensor arguments (default: %(default)s)")


def _add_sizes(p, q_len, q_len_help, heads: int, batch: bool = True):
    if batch:
        p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default: %(default)s)")
    else:
        p.set_defaults(batch=1)
    p.add_argument("--heads", type=int, default=heads, metavar="H",
                   help="number of query heads (default: %(default)s)")
    p.add_argument("--q-len", type=int, default=q_len, metavar="N", help=q_len_help)
    p.add_argument("--k-len", type=int, default=None, metavar="M", help="key length (default: the q-len)")
    p.add_argument("--head-dim", type=int, default=64, metavar="D", help="head dim of q and k (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnc", description="attnc: a compiler for attention patterns written in .attn files.",
        epilog="FILE may be a .attn file or std.NAME (a standard pattern). Exit codes: "
               + "; ".join(f"{int(c)} {m}" for c, m in EXIT_MEANING.items()) + ". Set ATTNC_DEBUG=1 to see internal "
               "tracebacks.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"attnc {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check", help="parse and check .attn files",
                       description="Parse, check and lower every pattern of each FILE; exit 1 if any has an error.")
    p.add_argument("files", metavar="FILE", nargs="+",
                   help="a .attn file, a directory (every .attn file under it), or std.NAME")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("show", help="draw the mask, or its block layout",
                       description="Draw the mask of one batch and head as text (cells of several "
                                   "positions when it is large; very large masks are sampled), or "
                                   "with --layout the block layout: which tiles are empty, partial or full.")
    _add_pattern_args(p)
    _add_sizes(p, None, f"query length (default: {SHOW_Q_LEN}; with --layout, {LAYOUT_TILES} tiles: "
                        f"{LAYOUT_TILES} x BM)", heads=1, batch=False)
    p.add_argument("--head", type=int, default=0, metavar="I", help="which head to draw (default: %(default)s)")
    p.add_argument("--width", type=int, default=96, metavar="W", help="most characters per row (default: %(default)s)")
    p.add_argument("--height", type=int, default=64, metavar="R", help="most rows (default: %(default)s)")
    p.add_argument("--layout", action="store_true",
                   help="print the block layout (tile classes) instead of the mask (default: off)")
    p.add_argument("--block", default="64,64", metavar="BM,BN",
                   help="tile size for --layout (default: %(default)s)")
    p.add_argument("--png", metavar="PATH",
                   help="with --layout: also save a PNG picture of the layout (needs matplotlib; "
                        "default: none)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("run", help="run a pattern on random inputs and report time and statistics",
                       description="Call the pattern on random q, k, v (and random tensor arguments); "
                                   "print what ran, the time, output statistics and fully masked rows.")
    _add_pattern_args(p)
    _add_sizes(p, 1024, "query length (default: %(default)s)", heads=8)
    p.add_argument("--kv-heads", type=int, default=None, metavar="HKV",
                   help="key/value heads, dividing --heads (default: the heads)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "fp64"], default=None,
                   help="input dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=["auto", "reference", "triton"], default="auto",
                   help="auto: the generated kernel on a GPU, the reference elsewhere; triton on the "
                        "CPU needs TRITON_INTERPRET=1 and is slow (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, metavar="R", help="calls to time (default: %(default)s)")
    p.set_defaults(func=cmd_run)

    sub.add_parser("fuzz", add_help=False,
                   help="differential fuzzing: random patterns (or FILE's) vs the reference; "
                        "`attnc fuzz --help` for its options")

    p = sub.add_parser("emit", help="print the generated Triton kernel source",
                       description="Print the generated forward Triton kernel, specialized on the int "
                                   "and bool parameters.")
    _add_pattern_args(p, seed=False)
    p.set_defaults(func=cmd_emit)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    fuzz = argv[:1] == ["fuzz"]
    if not fuzz:
        args = build_parser().parse_args(argv)
    command = "fuzz" if fuzz else args.command
    try:
        if fuzz:  # its own option parser, prog "attnc fuzz"
            return _fuzz(argv[1:])
        return args.func(args)
    except UsageError as e:
        print(f"attnc {command}: error: {e}", file=sys.stderr)
        return Exit.USAGE
    except SpecError as e:
        print(for_command_line(e).render(), file=sys.stderr)
        return Exit.ERROR
    except ValueError as e:
        if config.debug():
            raise
        print(f"error: {cli_wording(str(e))}", file=sys.stderr)
        return Exit.ERROR
    except BrokenPipeError:  # e.g. `attnc show ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.OK
    except (OSError, UnicodeDecodeError) as e:
        name = getattr(e, "filename", None)
        print(f"error: {(name + ': ') if name else ''}{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return Exit.ERROR
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except Exception as e:  # an internal error: one line, not a traceback, unless debugging
        if config.debug():
            raise
        print(f"internal error in attnc: {type(e).__name__}: {e}\n"
              "this is a bug in attnc; set ATTNC_DEBUG=1 to see the traceback", file=sys.stderr)
        return Exit.INTERNAL


def _fuzz(argv) -> int:
    try:
        from .runtime.fuzz import main as fuzz_main
    except ModuleNotFoundError as e:  # hypothesis is a test extra, needed by the fuzzer only
        if e.name != "hypothesis":
            raise
        raise UsageError("the fuzzer needs hypothesis, which is not installed; "
                         "install the test extra: pip install 'attnc[test]'") from None
    return fuzz_main(argv)


if __name__ == "__main__":
    sys.exit(main())
