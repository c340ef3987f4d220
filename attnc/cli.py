"""The `attnc` command line: check, show, run and emit `.attn` patterns.

    attnc check FILE...             parse and check; exit 1 if any file has an error
    attnc show FILE                 a text picture of the mask at small sizes (or --layout)
    attnc run FILE                  run the pattern on random inputs; report time and statistics
    attnc emit FILE                 print the generated Triton kernel
    attnc fuzz [FILE]               differential fuzzing (runtime/fuzz/; needs hypothesis, a test extra)

FILE may also name a standard-library pattern as `std.NAME`. Exit codes: 0 success, 1 an error
in a spec or its arguments, 2 bad command-line usage (or `attnc fuzz` without hypothesis), 3 an
internal error (a bug in attnc).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from .dsl import config
from .dsl.diagnostics import SpecError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(Exception):
    """A command-line argument that cannot be understood (exit code 2)."""


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
    """A pattern from a `.attn` file, or from the standard library when FILE is `std.NAME`."""
    import attnc
    if file.startswith("std.") and not os.path.exists(file):
        if name is not None:
            return attnc.std(f"{file[4:]}.{name}")
        return attnc.std(file[4:])
    return attnc.load(file, name)


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
    """`--set` values must be scalar parameters (tensor arguments are generated)."""
    tensors = {t.name for t in pattern.tensors}
    for key in settings:
        if key in tensors:
            raise UsageError(f"`{key}` is a tensor argument of `{pattern.name}`; the CLI fills it with "
                             "random values and it cannot be set")
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
    status = EXIT_OK
    files = []
    for file in args.files:
        if os.path.isdir(file):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(file) for f in fs if f.endswith(".attn"))
            if not found:
                print(f"error: no .attn files under {file}", file=sys.stderr)
                status = EXIT_ERROR
            files.extend(found)
        else:
            files.append(file)
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
            lib = build_library(text, file)
            check_library(lib)
            for ref in lib.local_patterns():
                lower_pattern(ref)
        except SpecError as e:
            print(e.render(), file=sys.stderr)
            n = len(e.diagnostics)
            print(f"{file}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read {file}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        names = ", ".join(r.pattern.name for r in lib.local_patterns())
        print(f"{file}: ok ({names})")
    return status


def cmd_show(args) -> int:
    import torch
    from .runtime.maskview import evaluate_masks, final_score, masks_read_score, render_mask
    pattern = load_pattern(args.file, args.name)
    settings = parse_settings(args.set)
    sizes = _sizes(args)
    gen = torch.Generator().manual_seed(args.seed)
    bound, arguments = _bind(pattern, sizes, settings, "cpu", gen)
    print(f"pattern {pattern.name}  q_len={sizes['q_len']} k_len={sizes['k_len']}  "
          f"arguments: {_describe_args(bound)}")
    if args.layout:
        return _show_layout(pattern, sizes, arguments, args)
    if args.width < 1 or args.height < 1:
        raise UsageError("--width and --height must be positive")
    if not 0 <= args.head < sizes["heads"]:
        raise UsageError(f"--head must be in [0, {sizes['heads']}), got {args.head}")
    score = None
    if masks_read_score(pattern.ir):
        D = sizes["head_dim"]
        q = torch.randn(1, sizes["heads"], sizes["q_len"], D, generator=gen)
        k = torch.randn(1, sizes["kv_heads"], sizes["k_len"], D, generator=gen)
        score = final_score(pattern.ir, bound, q, k, 1.0 / math.sqrt(D))
        print("note: a mask reads `score`; this picture uses random q and k")
    mask = evaluate_masks(pattern.ir, bound, score=score)[0, args.head]
    allowed = int(mask.sum())
    total = mask.numel()
    print(f"batch 0, head {args.head}: {allowed} of {total} positions allowed"
          + (f" ({allowed / total:.1%})" if total else ""))
    if pattern.ir.topk is not None:
        print("note: `select topk` then keeps the top keys of each row (data-dependent, not drawn)")
    print(render_mask(mask, max_cols=args.width, max_rows=args.height))
    return EXIT_OK


def _show_layout(pattern, sizes, arguments, args) -> int:
    layout_fn = getattr(pattern, "layout", None)
    if layout_fn is None:
        print("error: block layouts are not available in this version of attnc "
              "(Pattern.layout is not implemented yet)", file=sys.stderr)
        return EXIT_ERROR
    block = _parse_block(args.block)
    layout = layout_fn(q_len=sizes["q_len"], k_len=sizes["k_len"], block=block, batch=sizes["batch"],
                       heads=sizes["heads"], kv_heads=sizes["kv_heads"], head_dim=sizes["head_dim"], **arguments)
    print(layout.text())
    if args.png:
        try:
            layout.save_png(args.png)
        except ImportError as e:  # matplotlib is optional: pip install 'attnc[png]'
            print(f"error: {e}", file=sys.stderr)
            return EXIT_ERROR
        print(f"wrote {args.png}")
    return EXIT_OK


def _parse_block(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        bm, bn = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise UsageError(f"--block expects BM,BN (e.g. 64,64), got `{text}`") from None
    if bm < 1 or bn < 1:
        raise UsageError(f"--block sizes must be positive, got `{text}`")
    return bm, bn


def cmd_run(args) -> int:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available on this machine")
    dtype_name = args.dtype or ("fp16" if device == "cuda" else "fp32")
    dtype = _torch_dtype(dtype_name)
    if args.backend == "triton" and device == "cpu" and not config.interpreted():
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
    print(f"backend   {used}" + (f" (asked: {args.backend})" if args.backend != used else ""))
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
    return EXIT_OK if n_bad == 0 else EXIT_ERROR


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
    source_fn = getattr(pattern, "triton_source", None)
    if source_fn is None:
        print("error: Triton code generation is not available in this version of attnc "
              "(Pattern.triton_source is not implemented yet)", file=sys.stderr)
        return EXIT_ERROR
    print(source_fn(**parse_settings(args.set)))
    return EXIT_OK


# ----------------------------------------------------------------------------- argument parsing

def _add_pattern_args(p):
    p.add_argument("file", metavar="FILE", help="a .attn file, or std.NAME for a standard pattern")
    p.add_argument("--name", metavar="P", help="which pattern, when the file defines several")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="a scalar parameter (int, float, true/false); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnc", description="attnc: a compiler for attention patterns written in .attn files.",
        epilog="Set ATTNC_DEBUG=1 to see internal tracebacks.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"attnc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check", help="parse and check .attn files")
    p.add_argument("files", metavar="FILE", nargs="+")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("show", help="draw the mask at small sizes, or its block layout")
    _add_pattern_args(p)
    p.add_argument("--q-len", type=int, default=16, metavar="N", help="query length (default 16)")
    p.add_argument("--k-len", type=int, default=None, metavar="M", help="key length (default: q-len)")
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--heads", type=int, default=1, metavar="H", help="number of heads (default 1)")
    p.add_argument("--head", type=int, default=0, metavar="I", help="which head to draw (default 0)")
    p.add_argument("--head-dim", type=int, default=64, metavar="D", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=96, help="most characters per row (default 96)")
    p.add_argument("--height", type=int, default=64, help="most rows (default 64)")
    p.add_argument("--layout", action="store_true", help="print the block layout (tile classes) instead")
    p.add_argument("--block", default="64,64", metavar="BM,BN", help="tile size for --layout (default 64,64)")
    p.add_argument("--png", metavar="PATH", help="with --layout: also save a PNG picture")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("run", help="run a pattern on random inputs and report time and statistics")
    _add_pattern_args(p)
    p.add_argument("--batch", type=int, default=1, metavar="B")
    p.add_argument("--heads", type=int, default=8, metavar="H")
    p.add_argument("--kv-heads", type=int, default=None, metavar="HKV", help="key/value heads (default: heads)")
    p.add_argument("--q-len", type=int, default=1024, metavar="N")
    p.add_argument("--k-len", type=int, default=None, metavar="M", help="default: q-len")
    p.add_argument("--head-dim", type=int, default=64, metavar="D")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "fp64"], default=None,
                   help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--backend", choices=["auto", "reference", "triton"], default="auto")
    p.add_argument("--repeat", type=int, default=1, metavar="R", help="calls to time (default 1)")
    p.set_defaults(func=cmd_run)

    sub.add_parser("fuzz", add_help=False,
                   help="differential fuzzing: random patterns (or FILE's) vs the reference; "
                        "`attnc fuzz --help` for its options")

    p = sub.add_parser("emit", help="print the generated Triton kernel source")
    _add_pattern_args(p)
    p.set_defaults(func=cmd_emit)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fuzz"]:  # its own option parser, prog "attnc fuzz"
        try:
            from .runtime.fuzz import main as fuzz_main
        except ModuleNotFoundError as e:  # hypothesis is a test extra, needed by the fuzzer only
            if e.name != "hypothesis":
                raise
            print("attnc fuzz: error: the fuzzer needs hypothesis, which is not installed; "
                  "install the test extra: pip install 'attnc[test]'", file=sys.stderr)
            return EXIT_USAGE
        return fuzz_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"attnc {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    except ValueError as e:
        if config.debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `attnc show ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (OSError, UnicodeDecodeError) as e:
        name = getattr(e, "filename", None)
        print(f"error: {(name + ': ') if name else ''}{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # an internal error: one line, not a traceback, unless debugging
        if config.debug():
            raise
        print(f"internal error in attnc: {type(e).__name__}: {e}\n"
              "this is a bug in attnc; set ATTNC_DEBUG=1 to see the traceback", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
