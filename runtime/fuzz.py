"""Differential fuzzing: random patterns and inputs, checked against the reference semantics.

A *case* is a pattern (`.attn` text) plus everything needed to call it: shapes, dtype, tile
shape, parameter values and a seed for q, k, v and tensor arguments. `check_case` runs the
properties of issue 6 on one case:

- ``compile``    a well-typed generated pattern parses, checks and lowers;
- ``roundtrip``  `parse(print(ast)) == ast`, and the printed text is a fixed point;
- ``robustness`` mutations of the text only ever raise `SpecError`, each in under a second;
- ``layout``     the block layout (and its closed form) is sound against the dense mask;
- ``kernel``     the generated kernel agrees with an fp64 reference: outputs and LSE within a
                 tolerance scaled by the same-dtype reference's own error, identical fully
                 masked rows;
- ``grad``       the generated backward kernels agree with autograd through the fp64 reference:
                 dQ, dK, dV and float tensor-argument gradients of a random linear loss on the
                 output and LSE, within the same dtype-scaled tolerance (rows decided by a near
                 top-k tie carry no loss).

Hypothesis generates the cases (`cases()`) and shrinks a failure over the pattern AST and the
inputs; `save_reproducer` writes the minimal case as `NAME.attn` + `NAME.json` (the corpus
format replayed by tests/test_fuzz.py), and `replay` runs a saved case again.

Command line (see docs/testing.md)::

    python -m attnc.runtime.fuzz [FILE] [--name P] [--seconds N] [--seed S]
                                 [--backend triton|reference] [--max-patterns N]

Cases a pattern's own semantics refuses (the reference raises `SpecError`/`ValueError` at call
time, e.g. a tensor index out of range) are *rejected*, counted and not failures. A kernel that
refuses a case cleanly with a `SpecError` naming the construct is counted as *unsupported*.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hypothesis import HealthCheck, Phase, given, reject, settings, seed as hseed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from ..dsl import ast as A  # noqa: E402
from ..dsl.diagnostics import SpecError  # noqa: E402
from ..dsl.parser import parse  # noqa: E402
from ..dsl.printer import print_module  # noqa: E402
from ..dsl.strategies import DYADIC, fuzz_modules  # noqa: E402
from .binding import sizes_for  # noqa: E402
from .layout import build_layout  # noqa: E402
from .maskview import allowed_mask, evaluate_masks, exact_tile_classes, final_score  # noqa: E402
from .pattern import Pattern  # noqa: E402
from .policy import supported_tiles, tile_override  # noqa: E402
from .samples import random_tensor_arguments  # noqa: E402

PROPERTIES = ("compile", "roundtrip", "robustness", "layout", "kernel", "grad")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


SUPPORTED_TILES = supported_tiles()


@dataclass(frozen=True)
class Profile:
    """What `cases()` draws: sizes, dtypes, tiles, pattern depth."""

    max_len: int = 200
    batches: tuple[int, ...] = (1, 2)
    kv_heads: tuple[int, ...] = (1, 2)
    gqa_ratios: tuple[int, ...] = (1, 2, 4)
    head_dims: tuple[int, ...] = (16, 24, 64)
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    tiles: tuple[tuple[int, int], ...] = SUPPORTED_TILES
    depth: int = 2
    #: under Triton's interpreter (slow), the most tiles one case may visit (batch x heads x
    #: query tiles x key tiles); a case over it takes the smallest supported tiles that fit
    interpreter_tile_budget: int = 600


#: the long run and the command line
LONG = Profile()
#: CI, cheap properties: full size range, every tile shape
CI_CHEAP = Profile()
#: CI, the kernel property under Triton's interpreter (slow): small lengths and heads, 16x16 tiles
CI_KERNEL = Profile(max_len=64, kv_heads=(1,), head_dims=(16, 24), tiles=((16, 16),))
PROFILES = {"long": LONG, "ci-cheap": CI_CHEAP, "ci-kernel": CI_KERNEL}


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One fuzz input. `tensors` (name -> tensor) is None until drawn from `seed`."""

    source: str
    name: str | None
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    v_dim: int
    dtype: str
    block_m: int
    block_n: int
    seed: int
    params: dict = field(default_factory=dict)
    tensors: dict | None = None
    module: A.Module | None = field(default=None, compare=False, repr=False)  # the generated AST

    def describe(self) -> str:
        return (f"batch={self.batch} heads={self.heads} kv_heads={self.kv_heads} q_len={self.q_len} "
                f"k_len={self.k_len} head_dim={self.head_dim} v_dim={self.v_dim} dtype={self.dtype} "
                f"tiles={self.block_m}x{self.block_n} seed={self.seed} params={self.params}")

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(replace(self, module=None, tensors=None)).items()
             if k not in ("module", "tensors", "source")}
        d["tensors"] = {n: {"dtype": str(t.dtype).removeprefix("torch."), "values": t.tolist()}
                        for n, t in (self.tensors or {}).items()}
        return d

    @staticmethod
    def from_json(source: str, d: dict) -> "Case":
        fields = {k: v for k, v in d.items() if k in Case.__dataclass_fields__ and k not in ("tensors", "source")}
        tensors = {n: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"]))
                   for n, t in d.get("tensors", {}).items()}
        return Case(source=source, tensors=tensors or None, **fields)


def _draw_param(draw, typ: str, default):
    if typ == "int":
        return draw(st.one_of(st.integers(0, 48), st.integers(-4, -1), st.integers(49, 300))) \
            if default is None or draw(st.booleans()) \
            else default
    if typ == "float":
        return draw(st.sampled_from(DYADIC + (-0.5, -1.0))) if default is None or draw(st.booleans()) \
            else float(default)
    return draw(st.booleans())


def _ast_params(module: A.Module, name: str):
    pat = next(p for p in module.patterns if p.name == name)
    out = []
    for p in pat.params:
        d = p.default
        value = None
        if isinstance(d, A.Num):
            value = d.value
        elif isinstance(d, A.Unary) and isinstance(d.operand, A.Num):
            value = -d.operand.value
        elif isinstance(d, A.Bool):
            value = d.value
        out.append((p.name, p.type, value))
    return out


@st.composite
def cases(draw, profile: Profile = LONG, source: str | None = None, name: str | None = None):
    """Random cases: a generated pattern (or the given `source`/`name`) with random inputs."""
    if source is None:
        module = draw(fuzz_modules(name="fuzzed", depth=profile.depth))
        source, name = print_module(module), "fuzzed"
        params = _ast_params(module, name)
    else:
        module = None
        params = [(p.name, p.type, p.default) for p in _compiled(source, name).ir.params]
    kv = draw(st.sampled_from(profile.kv_heads))
    head_dim = draw(st.sampled_from(profile.head_dims))
    batch, heads = draw(st.sampled_from(profile.batches)), kv * draw(st.sampled_from(profile.gqa_ratios))
    q_len, k_len = draw(st.integers(1, profile.max_len)), draw(st.integers(1, profile.max_len))
    tiles = draw(st.sampled_from(profile.tiles))
    if not torch.cuda.is_available():
        def visits(t):
            return batch * heads * -(-q_len // t[0]) * -(-k_len // t[1])
        if visits(tiles) > profile.interpreter_tile_budget:
            fit = [t for t in profile.tiles if visits(t) <= profile.interpreter_tile_budget]
            tiles = min(fit, key=lambda t: t[0] * t[1]) if fit else max(profile.tiles, key=lambda t: t[0] * t[1])
    return Case(
        source=source, name=name, module=module, batch=batch, heads=heads, kv_heads=kv, q_len=q_len,
        k_len=k_len, head_dim=head_dim, v_dim=draw(st.one_of(st.just(head_dim), st.sampled_from(profile.head_dims))),
        dtype=draw(st.sampled_from(profile.dtypes)), block_m=tiles[0], block_n=tiles[1],
        seed=draw(st.integers(0, 2 ** 16)),
        params={n: _draw_param(draw, typ, default) for n, typ, default in params})


_COMPILED: dict = {}


def _compiled(source: str, name: str | None):
    key = (source, name)
    if key not in _COMPILED:
        if len(_COMPILED) > 256:
            _COMPILED.clear()
        _COMPILED[key] = Pattern.from_source(source, name, path="fuzz.attn")
    return _COMPILED[key]


# ----------------------------------------------------------------------------- outcomes

class PropertyFailure(AssertionError):
    """A property does not hold: a bug in attnc (or in this fuzzer's assumptions)."""

    def __init__(self, prop: str, message: str):
        super().__init__(f"[{prop}] {message}")
        self.prop, self.message = prop, message


class Rejected(Exception):
    """The pattern's own semantics refuses this case (not a failure)."""


class Unsupported(Rejected):
    """The backend refuses the case cleanly, with a SpecError naming the construct (not a failure)."""


@dataclass
class Stats:
    examples: int = 0
    patterns: set = field(default_factory=set)
    passed: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    unsupported: Counter = field(default_factory=Counter)
    fragile_rows: int = 0
    seconds: Counter = field(default_factory=Counter)

    def line(self) -> str:
        passed = ", ".join(f"{p} {self.passed[p]}" for p in PROPERTIES if self.passed[p])
        return (f"{self.examples} cases, {len(self.patterns)} patterns; passed: {passed or 'none'}; "
                f"rejected {sum(self.rejected.values())}, unsupported {sum(self.unsupported.values())}")


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None:  # Triton's interpreter wraps the real error several times
        e = e.__cause__
    text = f"{type(e).__name__}: {e}".strip()
    if isinstance(e, SpecError):
        text = e.message
    return (text.splitlines() or [type(e).__name__])[0][:160]


def _crash(prop: str, what: str, e: BaseException) -> PropertyFailure:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
    return PropertyFailure(prop, f"{what} raised {_first_line(e)}\n{tb}")


# ----------------------------------------------------------------------------- properties

def check_compile(case: Case):
    try:
        return _compiled(case.source, case.name)
    except SpecError as e:
        if case.module is None:  # a user's file: its errors are the user's
            raise Rejected(f"does not compile: {_first_line(e)}") from None
        raise PropertyFailure("compile", f"a well-typed generated pattern was refused:\n{e}") from None
    except Exception as e:  # noqa: BLE001 - any other exception is a compiler crash
        raise _crash("compile", "compile()", e) from None


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
            raise PropertyFailure("robustness", f"mutated text raised {_first_line(e)}\n"
                                                f"--- mutated text ---\n{mutated}") from None
        if time.process_time() - start > 1.0:
            raise PropertyFailure("robustness", f"mutated text took over a second of CPU time:\n{mutated}")


def inputs(case: Case, pattern):
    """q, k, v (in the case's dtype) and the arguments (parameters and tensors) for a case."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    q = torch.randn(case.batch, case.heads, case.q_len, case.head_dim, generator=g).to(dtype)
    k = torch.randn(case.batch, case.kv_heads, case.k_len, case.head_dim, generator=g).to(dtype)
    v = torch.randn(case.batch, case.kv_heads, case.k_len, case.v_dim, generator=g).to(dtype)
    if case.tensors is None:
        sizes = sizes_for(q.shape, k.shape)
        params = {p.name: case.params.get(p.name, p.default) for p in pattern.ir.params}
        try:
            case.tensors = random_tensor_arguments(pattern.ir, sizes, params, generator=g)
        except (SpecError, ValueError) as e:
            raise Rejected(f"tensor arguments: {_first_line(e)}") from None
    return q, k, v, dict(case.params, **case.tensors)


def _call(pattern, q, k, v, args, backend, lse, tiles=None):
    if tiles is None:
        return pattern(q, k, v, backend=backend, return_lse=lse, **args)
    with tile_override(*tiles):
        return pattern(q, k, v, backend=backend, return_lse=lse, **args)


def _reference(case, pattern, q, k, v, args, lse):
    try:
        return _call(pattern, q, k, v, args, "reference", lse)
    except (SpecError, ValueError) as e:
        raise Rejected(f"reference: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise _crash("kernel", "the reference interpreter", e) from None


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
        raise Rejected(f"reference mask: {_first_line(e)}") from None
    odd = ODD_TILES[case.seed % len(ODD_TILES)]
    for block_m, block_n in ((case.block_m, case.block_n), odd):
        try:
            lay = build_layout(pattern.ir, bound, case.q_len, case.k_len, block_m, block_n, "cpu")
        except SpecError as e:
            raise PropertyFailure("layout", f"build_layout refused a valid case:\n{e}") from None
        except Exception as e:  # noqa: BLE001
            raise _crash("layout", "build_layout", e) from None
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


#: (factor on the same-dtype reference's error, floor relative to the output's magnitude)
TOLERANCE = {"float32": (8.0, 2e-5), "float16": (4.0, 2e-3), "bfloat16": (4.0, 1.6e-2)}
#: top-k rows whose threshold is within this (relative) distance of another score are fragile
TOPK_MARGIN = 1e-3


def _fragile_rows(pattern, bound64, q64, k64, scale) -> torch.Tensor:
    """bool [B, H, Lq]: rows where `select topk` is decided by a near tie (a rounding difference
    may legitimately keep a different key set)."""
    B, H, Lq = q64.shape[0], q64.shape[1], q64.shape[2]
    if pattern.ir.topk is None:
        return torch.zeros(B, H, Lq, dtype=torch.bool)
    n = bound64.topk
    s = final_score(pattern.ir, bound64, q64, k64, scale)
    keep = evaluate_masks(pattern.ir, bound64, score=s)
    s = torch.where(keep, s, torch.full_like(s, float("-inf")))
    Lk = s.shape[-1]
    if n >= Lk:
        return torch.zeros(B, H, Lq, dtype=torch.bool)
    t = torch.topk(s, n, dim=-1).values[..., -1:]
    near = (s - t).abs() <= TOPK_MARGIN * (1 + t.abs())
    fragile = (near & (s != t) & keep).any(-1)
    return fragile & torch.isfinite(t.squeeze(-1))


def _max_err(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()
    d = d[rows] if rows is not None else d
    return float(d.max()) if d.numel() else 0.0


def _under_test(prop: str, what: str, run):
    """Run the backend under test: a SpecError naming an internal or compile failure is a bug,
    any other SpecError a cleanly unsupported case, any other exception a crash."""
    try:
        return run()
    except SpecError as e:
        msg = e.message
        if "internal" in msg or "Triton could not compile" in msg:
            raise PropertyFailure(prop, f"{what} failed:\n{e}") from None
        raise Unsupported(msg.splitlines()[0][:120]) from None
    except Exception as e:  # noqa: BLE001
        raise _crash(prop, what, e) from None


def check_kernel(case: Case, pattern, backend: str = "triton", stats: Stats | None = None) -> None:
    q, k, v, args = inputs(case, pattern)
    softmax = pattern.ir.normalizer == "softmax"
    q64, k64, v64 = q.double(), k.double(), v.double()
    args64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in args.items()}
    truth = _reference(case, pattern, q64, k64, v64, args64, softmax)
    ref = _reference(case, pattern, q, k, v, args, softmax)
    if not softmax:
        truth, ref = (truth, None), (ref, None)
    if not torch.isfinite(truth[0]).all():
        raise Rejected("the fp64 reference output is not finite")
    got = _under_test("kernel", f"the {backend} backend",
                      lambda: _call(pattern, q, k, v, args, backend, softmax, (case.block_m, case.block_n)))
    if not softmax:
        got = (got, None)
    out, lse = got
    if out.shape != truth[0].shape or out.dtype != q.dtype:
        raise PropertyFailure("kernel", f"output is {out.dtype} {list(out.shape)}, expected {q.dtype} "
                                        f"{list(truth[0].shape)}")
    if torch.isnan(out).any():
        raise PropertyFailure("kernel", f"output has NaN in {int(torch.isnan(out).any(-1).sum())} rows")
    bound64 = pattern.bind(q64, k64, v64, args64)
    scale = 1.0 / case.head_dim ** 0.5
    empty = ~allowed_mask(pattern.ir, bound64, q64, k64, scale).any(-1)  # [B, H, Lq]
    if softmax:
        got_inf, want_inf = torch.isneginf(lse), torch.isneginf(truth[1])
        if not torch.equal(got_inf, want_inf):
            diff = (got_inf != want_inf).nonzero()[:4].tolist()
            raise PropertyFailure("kernel", f"fully masked rows differ (LSE -inf) at [b, h, q] {diff}: kernel "
                                            f"{[bool(got_inf[tuple(i)]) for i in diff]}, reference "
                                            f"{[bool(want_inf[tuple(i)]) for i in diff]}")
    if bool((out[empty] != 0).any()):
        rows = (empty & (out != 0).any(-1)).nonzero()[:4].tolist()
        raise PropertyFailure("kernel", f"fully masked rows {rows} [b, h, q] are not zero")
    rows = ~_fragile_rows(pattern, bound64, q64, k64, scale)
    if stats is not None:
        stats.fragile_rows += int((~rows).sum())
    factor, floor = TOLERANCE[case.dtype]
    magnitude = float(truth[0].abs().max()) if truth[0].numel() else 0.0
    got_err, ref_err = _max_err(out, truth[0], rows), _max_err(ref[0], truth[0], rows)
    if got_err > factor * ref_err + floor * (1 + magnitude):
        worst = ((out.double() - truth[0]).abs().amax(-1) * rows).flatten().argmax()
        b, h, i = (int(x) for x in torch.unravel_index(worst, rows.shape))
        raise PropertyFailure("kernel", f"output error {got_err:.3g} exceeds {factor} x reference error "
                                        f"{ref_err:.3g} + {floor * (1 + magnitude):.3g} (worst row b={b} h={h} "
                                        f"q={i}: kernel {out[b, h, i, :4].tolist()}..., fp64 reference "
                                        f"{truth[0][b, h, i, :4].tolist()}...)")
    if softmax:
        fin = rows & torch.isfinite(truth[1])
        lmag = float(truth[1][fin].abs().max()) if bool(fin.any()) else 0.0
        got_err, ref_err = _max_err(lse, truth[1], fin), _max_err(ref[1], truth[1], fin)
        if got_err > factor * ref_err + 2e-5 * (1 + lmag):
            raise PropertyFailure("kernel", f"LSE error {got_err:.3g} exceeds {factor} x reference error "
                                            f"{ref_err:.3g} + {2e-5 * (1 + lmag):.3g}")


def _grads(pattern, q, k, v, args, backend, softmax, tiles, w, u):
    """Gradients of sum(out * w) + sum(lse * u) (finite LSE only) with respect to q, k, v and the
    float tensor arguments, in that order (tensor arguments sorted by name)."""
    names = sorted(n for n, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point())
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    targs = dict(args)
    for n in names:
        targs[n] = args[n].detach().clone().requires_grad_(True)
        leaves.append(targs[n])
    got = _call(pattern, *leaves[:3], targs, backend, softmax, tiles)
    out, lse = got if softmax else (got, None)
    loss = (out.double() * w).sum()
    if lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).double() * u).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)], ["q", "k", "v", *names]


def check_grad(case: Case, pattern, backend: str = "triton", stats: Stats | None = None) -> None:
    """Generated backward kernels vs autograd through the fp64 reference: dQ, dK, dV and the
    gradients of float tensor arguments, within the same-dtype reference's own error (scaled)."""
    q, k, v, args = inputs(case, pattern)
    softmax = pattern.ir.normalizer == "softmax"
    q64, k64, v64 = q.double(), k.double(), v.double()
    args64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in args.items()}
    bound64 = pattern.bind(q64, k64, v64, args64)
    scale = 1.0 / case.head_dim ** 0.5
    rows = ~_fragile_rows(pattern, bound64, q64, k64, scale)  # near top-k ties may pick other keys
    g = torch.Generator().manual_seed(case.seed + 1)
    B, H, Lq = q.shape[:3]
    w = torch.randn(B, H, Lq, v.shape[-1], generator=g, dtype=torch.float64) * rows[..., None]
    u = torch.randn(B, H, Lq, generator=g, dtype=torch.float64) * rows
    try:
        truth, names = _grads(pattern, q64, k64, v64, args64, "reference", softmax, None, w, u)
        ref, _ = _grads(pattern, q, k, v, args, "reference", softmax, None, w, u)
    except (SpecError, ValueError) as e:
        raise Rejected(f"reference: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise _crash("grad", "the reference backward", e) from None
    if not all(torch.isfinite(t).all() for t in truth):
        raise Rejected("the fp64 reference gradient is not finite")
    got, _ = _under_test("grad", f"the {backend} backward",
                         lambda: _grads(pattern, q, k, v, args, backend, softmax,
                                        (case.block_m, case.block_n), w, u))
    factor, floor = TOLERANCE[case.dtype]
    for name, a, r, t in zip(names, got, ref, truth):
        if torch.isnan(a).any():
            raise PropertyFailure("grad", f"d{name} has NaN")
        magnitude = float(t.abs().max()) if t.numel() else 0.0
        got_err, ref_err = _max_err(a, t, None), _max_err(r, t, None)
        if got_err > factor * ref_err + floor * (1 + magnitude):
            raise PropertyFailure("grad", f"d{name} error {got_err:.3g} exceeds {factor} x reference error "
                                          f"{ref_err:.3g} + {floor * (1 + magnitude):.3g}")


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


# ----------------------------------------------------------------------------- search

def hypothesis_settings(max_examples: int, derandomize: bool = False) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                    report_multiple_bugs=False, print_blob=False,
                    suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.generate, Phase.shrink))


def search(strategy, properties=PROPERTIES, backend: str = "triton", max_examples: int = 100,
           seed: int = 0, stats: Stats | None = None, deadline: float | None = None):
    """Run hypothesis on `strategy`; return (minimal failing case, PropertyFailure) or None.
    Past `deadline` (a time.monotonic() value) new cases are skipped unchecked, unless a failure
    is being shrunk, so a budget overruns by at most one case."""
    stats = stats if stats is not None else Stats()
    failures: list = []

    @hseed(seed)
    @hypothesis_settings(max_examples)
    @given(strategy)
    def run(case):
        if deadline is not None and not failures and time.monotonic() > deadline:
            reject()
        try:
            check_case(case, properties, backend, stats)
        except Rejected:
            reject()
        except PropertyFailure as e:
            failures.append((case, e))
            raise

    try:
        run()
    except PropertyFailure:
        return failures[-1]
    except Unsatisfiable:
        return None
    return None


def save_reproducer(case: Case, failure: PropertyFailure, directory) -> tuple[Path, Path]:
    """Write NAME.attn and NAME.json under `directory`; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pattern = _compiled(case.source, case.name)
    inputs(case, pattern)  # materialize the tensor arguments, so the sidecar is self-contained
    digest = hashlib.sha256((case.source + json.dumps(case.to_json(), sort_keys=True)).encode()).hexdigest()[:10]
    stem = f"{failure.prop}-{digest}"
    attn, sidecar = directory / f"{stem}.attn", directory / f"{stem}.json"
    attn.write_text(case.source, encoding="utf-8")
    meta = case.to_json()
    meta["found"] = failure.message.splitlines()[0]
    sidecar.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return attn, sidecar


def load_reproducer(sidecar) -> tuple[Case, dict]:
    """The case saved by `save_reproducer` (the `.attn` file next to the `.json`), and its metadata."""
    sidecar = Path(sidecar)
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    source = sidecar.with_suffix(".attn").read_text(encoding="utf-8")
    return Case.from_json(source, meta), meta


def replay(sidecar, backend: str = "triton", properties=PROPERTIES) -> None:
    """Run every property on a saved case; raises PropertyFailure if one fails."""
    case, _ = load_reproducer(sidecar)
    try:
        module = parse(case.source, str(sidecar))
        if case.name == "fuzzed":
            case.module = module  # a generated pattern: it must compile
    except SpecError:
        pass
    try:
        check_case(case, properties, backend)
    except Rejected:
        pass


_READY: list = []


def kernel_backend_ready() -> bool:
    """Whether generated kernels can run in this process: on a GPU, or under Triton's interpreter.

    The interpreter must be switched on (TRITON_INTERPRET=1) before attnc is imported; a tiny
    probe kernel tells whether that happened."""
    if not _READY:
        if torch.cuda.is_available():
            _READY.append(True)
        elif os.environ.get("TRITON_INTERPRET") != "1":
            _READY.append(False)
        else:
            probe = Pattern.from_source("pattern probe:\n    mask q >= k\n")
            x = torch.zeros(1, 1, 1, 16)
            try:
                probe(x, x, x, backend="triton")
                _READY.append(True)
            except Exception as e:  # noqa: BLE001
                # switched on too late; any other error is the backend's, for the fuzzer to report
                _READY.append("outside of the scope of a kernel" not in str(e))
    return _READY[0]


def _reexec_with_interpreter(argv) -> int:
    """Run this command again in a fresh process with TRITON_INTERPRET=1 set from the start."""
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNC_FUZZ_CHILD="1")
    return subprocess.call([sys.executable, "-m", "attnc.runtime.fuzz", *argv], env=env)


# ----------------------------------------------------------------------------- command line

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
        if torch.cuda.is_available() or os.environ.get("ATTNC_FUZZ_CHILD"):
            print("attnc fuzz: generated kernels cannot run here", file=sys.stderr)
            return 2
        return _reexec_with_interpreter(argv)
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


if __name__ == "__main__":
    sys.exit(main())
