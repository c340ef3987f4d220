"""The closed-form forward kernel: key tiles computed per query tile in the kernel, no layout.

Runs under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) or on a GPU.
Each case checks the output and LSE against the reference, that no layout was built or passed,
and (interpreter only) that the tiles the kernel visited, and which of them skipped the mask,
are exactly what `ClosedForm.key_tiles` says and what the block layout calls non-empty / FULL.
"""
from __future__ import annotations

import dataclasses
import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.lowering import emit
from attnc.lowering.closed_form import derive, derive_symbolic
from attnc.lowering.ir import const
from attnc.lowering.sparsity import constant_masks as specialize_sizes
from attnc.runtime import dispatch, jit, policy
from attnc.runtime.binding import specialization_of
from attnc.runtime import layout as layout_module
from attnc.runtime.layout import build_layout
from attnc.runtime.samples import ARGUMENTS, pattern_parameters

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


BOTTOM_RIGHT = "pattern br:\n    mask q + k_len - q_len >= k\n"
BOTTOM_RIGHT_STREAM = ("pattern brs(w: int = 20, s: int = 3):\n    mask q + k_len - q_len >= k\n"
                       "    mask q + k_len - q_len - k < w or k < s\n")
WINDOW_SINKS = "pattern ws(w: int = 17, s: int = 5):\n    mask abs(q - k) < w or k < s\n"
BAND = "pattern band:\n    mask k >= q - 9 and k <= q + 6\n    mask k < k_len - 3\n"

#: (id, pattern (stdlib name or source), arguments, q_len, k_len, tiles, exact). An exact closed
#: form is the default path; a key-range-only one (a `%` literal dropped) is forced here, to test
#: the kernel with overlapping cover intervals and no full interval.
CASES = [
    ("causal-37", "causal", {}, 37, 37, (16, 16), True),
    ("causal-100", "causal", {}, 100, 100, (32, 32), True),
    ("sliding_window-200", "sliding_window", ARGUMENTS["sliding_window"], 200, 200, (32, 16), True),
    ("streaming-100", "streaming", ARGUMENTS["streaming"], 100, 100, (16, 16), True),
    ("streaming-37x100", "streaming", ARGUMENTS["streaming"], 37, 100, (16, 32), True),
    ("prefix_lm-100", "prefix_lm", ARGUMENTS["prefix_lm"], 100, 100, (16, 16), True),
    ("prefix_lm-100x37", "prefix_lm", ARGUMENTS["prefix_lm"], 100, 37, (16, 16), True),
    ("chunked-100", "chunked", ARGUMENTS["chunked"], 100, 100, (16, 16), True),
    ("chunked-noncausal-37", "chunked", dict(ARGUMENTS["chunked"], causal=False), 37, 37, (16, 16), True),
    ("dilated-100", "dilated", ARGUMENTS["dilated"], 100, 100, (16, 16), False),
    ("strided-100", "strided", ARGUMENTS["strided"], 100, 100, (16, 16), False),
    ("strided_fixed-100", "strided_fixed", ARGUMENTS["strided_fixed"], 100, 100, (16, 16), False),
    ("bottom_right-37x100", BOTTOM_RIGHT, {}, 37, 100, (16, 16), True),
    ("bottom_right-100x37", BOTTOM_RIGHT, {}, 100, 37, (16, 32), True),
    ("bottom_right_stream-37x200", BOTTOM_RIGHT_STREAM, {}, 37, 200, (16, 16), True),
    ("window_sinks-200", WINDOW_SINKS, {}, 200, 200, (32, 32), True),
    ("band-100", BAND, {}, 100, 100, (16, 16), True),
    ("no_mask-37", "softcap", {}, 37, 37, (16, 16), True),
]


def pattern(spec: str):
    return attnc.std(spec) if "\n" not in spec else attnc.compile(spec)


def qkv(B, H, Lq, Lk, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g).to(DEVICE) for L in (Lq, Lk, Lk))


class Visits:
    """Records every key tile the kernel attends to, per (b, h, query tile), with its FULL flag
    (a tile attended without the mask), by wrapping the generated module's `_attend`
    (interpreter only: a plain Python call)."""

    def __init__(self, module, block_m, block_n):
        self.module, self.block_m, self.block_n = module, block_m, block_n
        self.orig = module._attend
        self.names = list(inspect.signature(self.orig.fn).parameters)
        self.log: dict[tuple[int, int, int], list[tuple[int, bool]]] = {}

    def __enter__(self):
        def first(x):  # an interpreter tensor (numpy inside) or a Python constant
            return x.handle.data.reshape(-1)[0].item() if hasattr(x, "handle") else x

        def record(*args):
            a = dict(zip(self.names, args))
            b, h = int(first(a["off_b"])), int(first(a["off_h"]))
            t = int(first(a["offs_m"])) // self.block_m
            j = int(first(a["start_n"])) // self.block_n
            full = not bool(first(a["MASKED"]))
            self.log.setdefault((b, h, t), []).append((j, full))
            return self.orig(*args)
        self.module._attend = record
        return self

    def __exit__(self, *exc):
        self.module._attend = self.orig


def _no_layout(*_a, **_k):
    raise AssertionError("the closed-form path built a layout")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_closed_form_kernel(case, monkeypatch):
    _, spec, args, Lq, Lk, tiles, exact = case
    p = pattern(spec)
    B, H = 1, 2
    q, k, v = qkv(B, H, Lq, Lk)
    if not exact:  # key-range-only closed forms are not used by default (see kernel_closed_form)
        assert jit.forward_kernel(p.ir, specialization_of(p.ir, args)).kernel.closed_form is None
        real = emit.kernel_closed_form
        monkeypatch.setattr(emit, "kernel_closed_form", lambda masks: real(masks, exact_only=False))
        jit.clear_memory_cache()
    try:
        _check_case(p, q, k, v, args, Lq, Lk, tiles, exact, B, H, monkeypatch)
    finally:
        if not exact:  # drop the forced kernels
            jit.clear_memory_cache()


def _check_case(p, q, k, v, args, Lq, Lk, tiles, exact, B, H, monkeypatch):
    compiled = jit.forward_kernel(p.ir, specialization_of(p.ir, args))
    cf = compiled.kernel.closed_form
    assert cf is not None and "CLOSED_FORM = tl.constexpr(True)" in compiled.kernel.source

    # no layout is built or passed on this path
    monkeypatch.setattr(dispatch, "build_layout", _no_layout)
    monkeypatch.setattr(layout_module, "build_layout", _no_layout)
    before = dispatch.LAUNCHES["closed_form"]
    visits = Visits(compiled.module, *tiles) if INTERPRETED else None
    with policy.tile_override(*tiles):
        if visits:
            with visits:
                out, lse = p(q, k, v, backend="triton", return_lse=True, **args)
        else:
            out, lse = p(q, k, v, backend="triton", return_lse=True, **args)
    assert dispatch.LAUNCHES["closed_form"] == before + 1
    monkeypatch.undo()

    ref_out, ref_lse = p(q, k, v, backend="reference", return_lse=True, **args)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=2e-5, rtol=2e-5)

    # the tiles: kernel-side formula vs the layout's classes (and vs what the kernel did)
    bm, bn = tiles
    lay = build_layout(p.ir, p.bind(q, k, v, args), Lq, Lk, bm, bn, "cpu")
    classes = lay.classes[0, 0]
    sizes = dict(p.bind(q, k, v, args).sizes, q_len=Lq, k_len=Lk)
    bound_cf = cf.bind(bm, sizes)
    for t in range(lay.n_q_tiles):
        partial, full = bound_cf.key_tiles(t, bn)
        visited = set(partial) | set(full)
        nonempty = set((classes[t] != 0).nonzero().flatten().tolist())
        layout_full = set((classes[t] == 2).nonzero().flatten().tolist())
        assert len(visited) == len(partial) + len(full), f"tile {t}: a key tile visited twice"
        assert set(full) <= layout_full, f"query tile {t}: unsound FULL {sorted(set(full) - layout_full)}"
        assert nonempty <= visited, f"query tile {t}: allowed key tiles not visited"
        if exact:
            assert visited == nonempty, f"query tile {t}: visits {sorted(visited)}, layout {sorted(nonempty)}"
            # the tile crossing k_len is visited with its mask, the only one that checks bounds
            tail = {Lk // bn} if Lk % bn else set()
            assert set(full) == layout_full - tail, \
                f"query tile {t}: FULL {sorted(full)} vs {sorted(layout_full - tail)}"
        if visits:
            for b in range(B):
                for h in range(H):
                    got = visits.log.get((b, h, t), [])
                    assert sorted(got) == sorted([(j, False) for j in partial] + [(j, True) for j in full])


def test_symbolic_closed_form_equals_the_concrete_one():
    """One kernel serves every length: the symbolic ranges, bound to sizes, are the layout's."""
    for _, spec, args, _, _, _, _ in CASES:
        p = pattern(spec)
        masks = emit.specialize_ir(p.ir, specialization_of(p.ir, args)).masks
        sym = derive_symbolic(masks)
        for Lq, Lk in ((1, 1), (37, 100), (100, 37), (129, 129)):
            sizes = dict(batch=1, heads=1, kv_heads=1, q_len=Lq, k_len=Lk, head_dim=16)
            table = {("size", n): const(v) for n, v in sizes.items()}
            concrete = derive(specialize_sizes(masks, table), 16, Lq, Lk)
            if concrete is None:  # no mask at all: the layout has no closed form, the kernel does
                assert not [m for m in masks if not (m.op == "const" and m.value is True)]
                continue
            assert sym.bind(16, sizes).tile_classes(16) == concrete.tile_classes(16)


def test_full_tiles_skip_the_mask(monkeypatch):
    """Claiming every visited tile FULL (a deliberately wrong closed form) changes the answer:
    the mask really is skipped on FULL tiles; the true closed form gives the reference."""
    p = attnc.std("sliding_window")
    q, k, v = qkv(1, 2, 100, 100)
    args = dict(window=24)
    want = p(q, k, v, backend="reference", **args)
    real = emit.kernel_closed_form

    def everything_full(masks):
        cf = real(masks)
        return dataclasses.replace(cf, full_intervals=cf.intervals)
    jit.clear_memory_cache()
    monkeypatch.setattr(emit, "kernel_closed_form", everything_full)
    try:
        with policy.tile_override(16, 16):
            wrong = p(q, k, v, backend="triton", **args)
    finally:
        monkeypatch.undo()
        jit.clear_memory_cache()
    assert not torch.allclose(wrong, want, atol=1e-3)
    with policy.tile_override(16, 16):
        right = p(q, k, v, backend="triton", **args)
    torch.testing.assert_close(right, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name,args", [("document", None), ("neighborhood_2d", dict(height=6, width=6, kernel=3))])
def test_patterns_without_closed_form_use_the_layout(name, args):
    p = attnc.std(name)
    q, k, v = qkv(1, 1, 36, 36)
    args = args if args is not None else dict(doc=torch.arange(36, device=DEVICE).view(1, 36) // 10)
    assert jit.forward_kernel(p.ir, specialization_of(p.ir, args)).kernel.closed_form is None
    before = dispatch.LAUNCHES["layout"]
    with policy.tile_override(16, 16):
        out = p(q, k, v, backend="triton", **args)
    assert dispatch.LAUNCHES["layout"] == before + 1
    torch.testing.assert_close(out, p(q, k, v, backend="reference", **args), atol=2e-5, rtol=2e-5)


def test_which_stdlib_patterns_take_the_closed_form_path():
    """The list in docs/kernels.md."""
    closed = set()
    for name in attnc.std_names():
        p = attnc.std(name)
        masks = emit.specialize_ir(p.ir, specialization_of(p.ir, pattern_parameters(p.ir))).masks
        if emit.kernel_closed_form(masks) is not None:
            closed.add(name)
    assert closed == set(attnc.std_names()) - {"document", "document_kv", "longformer",
                                               "neighborhood_2d", "dilated", "strided",
                                               "strided_fixed"}


def test_gqa_and_batches_on_the_closed_form_path():
    p = attnc.std("streaming")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 45, 16, generator=g).to(DEVICE)
    k = torch.randn(2, 1, 70, 16, generator=g).to(DEVICE)
    v = torch.randn(2, 1, 70, 24, generator=g).to(DEVICE)
    with policy.tile_override(16, 16):
        out, lse = p(q, k, v, backend="triton", return_lse=True, window=10, sinks=2)
    ref, ref_lse = p(q, k, v, backend="reference", return_lse=True, window=10, sinks=2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=2e-5, rtol=2e-5)
