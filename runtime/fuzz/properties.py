"""The properties of one fuzz case, and `check_case`, which runs them in order: the front end
(`compile`, `roundtrip`, `robustness`), the block-sparsity analysis (`layout`) and, from
`differential`, the generated kernels (`kernel`, `grad`)."""
from __future__ import annotations

import hashlib
import random
import re
import time

import torch

from ...dsl.diagnostics import SpecError
from ...dsl.parser import parse
from ...dsl.printer import print_module
from ..layout import build_layout
from ..maskview import allowed_mask, exact_tile_classes
from ..pattern import Pattern
from .case import Case, compiled_pattern, inputs
from .differential import check_grad, check_kernel
from .outcomes import PROPERTIES, PropertyFailure, Rejected, Stats, Unsupported, crash, first_line

def check_compile(case: Case):
    try:
        return compiled_pattern(case.source, case.name)
    except SpecError as e:
        if case.module is None:  # a user's file: its errors are the user's
            raise Rejected(f"does not compile: {first_line(e)}") from None
        raise PropertyFailure("compile", f"a well-typed generated pattern was refused:\n{e}") from None
    except Exception as e:  # noqa: BLE001 - any other exception is a compiler crash
        raise crash("compile", "compile()", e) from None


def check_roundtrip(case: Case) -> None:
    try:
        module = parse(case.source, "fuzz.attn")
    except SpecError as e:
        raise PropertyFailure("roundtrip", f"printed text does not parse:\n{e}") from None
    if case.module is not None and module != case.module:
        raise PropertyFailure("roundtrip", "parse(print(ast)) != ast")
    text = print_module(module)
    again = parse(text, "fuzz.attn")
    if again != module:
        raise PropertyFailure("roundtrip", f"parse(print(parse(text))) != parse(text); printed:\n{text}")
    if print_module(again) != text:
        raise PropertyFailure("roundtrip", "printing is not a fixed point")


_TOKENS = ("(", ")", ":", "\n", "    ", "mask", "score", "=", "q", ">=", "and", "not", "[", "]", ",",
           "99999999999999999999999", "sum(", "for", "//", "%", "**", "-", "if", "else", "#", "\t")


def check_robustness(case: Case, tries: int = 4) -> None:
    """Mutations of the case's text (deletions, swapped and duplicated lines, inserted tokens,
    deep nesting) compile or raise SpecError, each in under a second."""
    rng = random.Random(case.seed)
    text = case.source
    lines = text.splitlines()
    for _ in range(tries):
        kind = rng.choice(["delete", "swap", "duplicate", "insert", "nest"])
        if kind == "delete":
            i = rng.randrange(len(text))
            mutated = text[:i] + text[i + rng.randint(1, 6):]
        elif kind == "swap" and len(lines) > 1:
            i = rng.randrange(len(lines) - 1)
            ls = list(lines)
            ls[i], ls[i + 1] = ls[i + 1], ls[i]
            mutated = "\n".join(ls)
        elif kind == "duplicate":
            i = rng.randrange(len(lines))
            mutated = "\n".join(lines[:i + 1] + lines[i:])
        elif kind == "nest":
            mutated = text.replace(" q", " " + "(" * 300 + "q" + ")" * 300, 1)
        else:
            i = rng.randrange(len(text) + 1)
            mutated = text[:i] + rng.choice(_TOKENS) + text[i:]
        start = time.process_time()  # CPU time: a loaded machine must not fail the property
        try:
            Pattern.from_source(mutated, path="mutated.attn")
        except SpecError as e:
            str(e)
        except Exception as e:  # noqa: BLE001
            raise PropertyFailure("robustness", f"mutated text raised {first_line(e)}\n"
                                                f"--- mutated text ---\n{mutated}") from None
        if time.process_time() - start > 1.0:
            raise PropertyFailure("robustness", f"mutated text took over a second of CPU time:\n{mutated}")


def _unsound(got: torch.Tensor, exact: torch.Tensor, what: str):
    bad = ((got == 0) & (exact != 0)) | ((got == 2) & (exact != 2))
    if bool(bad.any()):
        where = bad.nonzero()[:4].tolist()
        names = {0: "EMPTY", 1: "PARTIAL", 2: "FULL"}
        detail = "; ".join(f"[b={b},h={h}] tile ({i},{j}) {names[int(got[b, h, i, j])]} but really "
                           f"{names[int(exact[b, h, i, j])]}" for b, h, i, j in where)
        raise PropertyFailure("layout", f"{what} is unsound ({int(bad.sum())} tiles): {detail}")


#: tile shapes no kernel uses but `Pattern.layout(block=...)` accepts; one is checked per case
ODD_TILES = ((24, 40), (48, 8), (1, 7), (100, 3))


def check_layout(case: Case, pattern) -> None:
    """The layout at the case's tile shape, and at one odd tile shape, is sound."""
    q, k, v, args = inputs(case, pattern)
    try:
        bound = pattern.bind(q, k, v, args)
        keep = allowed_mask(pattern.ir, bound, q, k, 1.0 / case.head_dim ** 0.5)
    except (SpecError, ValueError) as e:
        raise Rejected(f"reference mask: {first_line(e)}") from None
    odd = ODD_TILES[case.seed % len(ODD_TILES)]
    for block_m, block_n in ((case.block_m, case.block_n), odd):
        try:
            lay = build_layout(pattern.ir, bound, case.q_len, case.k_len, block_m, block_n, "cpu")
        except SpecError as e:
            raise PropertyFailure("layout", f"build_layout refused a valid case:\n{e}") from None
        except Exception as e:  # noqa: BLE001
            raise crash("layout", "build_layout", e) from None
        exact = exact_tile_classes(keep, block_m, block_n)
        B, H = keep.shape[:2]
        if lay.classes.shape[2:] != exact.shape[2:] or lay.classes.shape[0] not in (1, B) or \
                lay.classes.shape[1] not in (1, H):
            raise PropertyFailure("layout", f"classes have shape {list(lay.classes.shape)}, expected "
                                            f"[1 or {B}, 1 or {H}, {exact.shape[2]}, {exact.shape[3]}]")
        tiles = f"{block_m}x{block_n}"
        _unsound(lay.classes.expand(B, H, -1, -1), exact, f"the block layout ({tiles} tiles)")
        cf = lay.closed_form
        if cf is not None:
            cls = torch.tensor(cf.tile_classes(block_n), dtype=torch.int8).view(1, 1, *exact.shape[2:])
            _unsound(cls.expand(B, H, -1, -1), exact, f"the closed-form key ranges ({tiles} tiles)")


def check_case(case: Case, properties=PROPERTIES, backend: str = "triton", stats: Stats | None = None) -> None:
    """Run `properties` on one case. Raises PropertyFailure on a bug, Rejected when the pattern's
    semantics refuses the case; returns None when every property holds."""
    stats = stats if stats is not None else Stats()
    stats.examples += 1
    stats.patterns.add(hashlib.sha256(case.source.encode()).hexdigest()[:16])
    pattern = check_compile(case)
    stats.passed["compile"] += 1
    steps = [("roundtrip", lambda: check_roundtrip(case)), ("robustness", lambda: check_robustness(case)),
             ("layout", lambda: check_layout(case, pattern)),
             ("kernel", lambda: check_kernel(case, pattern, backend, stats)),
             ("grad", lambda: check_grad(case, pattern, backend, stats))]
    for prop, step in steps:
        if prop not in properties:
            continue
        start = time.perf_counter()
        try:
            step()
        except Unsupported as e:
            stats.unsupported[str(e)] += 1
            raise
        except Rejected as e:
            stats.rejected[re.sub(r"\d+", "N", str(e))[:120]] += 1
            raise
        finally:
            stats.seconds[prop] += time.perf_counter() - start
        stats.passed[prop] += 1
