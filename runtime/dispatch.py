"""The Triton backend: choose tiles, build the block layout, launch the generated forward kernel.

`triton_attention` is what `Pattern.__call__(backend="triton")` calls. On CUDA tensors the kernel
is compiled by Triton; on CPU tensors it runs under Triton's interpreter, which needs
`TRITON_INTERPRET=1` in the environment before the kernel module is imported.

A kernel generated with a closed form (`Kernel.closed_form`) computes its key tiles itself: no
layout is built or passed. `LAUNCHES` counts forward launches per path ('closed_form' or
'layout').
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
import traceback
from dataclasses import dataclass, field

import torch

from ..dsl.diagnostics import SpecError
from ..lowering.int_range import int32_overflow
from ..lowering.ir import PatternIR
from .binding import Bound
from .jit import Compiled, forward_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the generated JIT function, its grid, positional arguments and keyword
    constexprs (num_warps / num_stages included for a CUDA target). `run_launch` runs it;
    `runtime/aot.py` compiles it for a GPU target without a GPU."""

    name: str
    fn: object
    grid: tuple
    args: tuple
    meta: dict = field(hash=False, compare=False)


def launch_meta(target: torch.device, tiles: Tiles, **constexprs) -> dict:
    """The keyword arguments of a launch: constexprs, tile shape, and on CUDA warps and stages."""
    meta = dict(constexprs, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n)
    if target.type == "cuda":
        meta.update(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return meta


_OVERRIDE = threading.local()
#: forward launches per path, for tests and benchmarks
LAUNCHES: collections.Counter = collections.Counter()


@contextlib.contextmanager
def tile_override(block_m: int, block_n: int):
    """Force the tile shape in this thread (tests use small tiles under the interpreter)."""
    old = getattr(_OVERRIDE, "tiles", None)
    _OVERRIDE.tiles = (block_m, block_n)
    try:
        yield
    finally:
        _OVERRIDE.tiles = old


def triton_available() -> bool:
    """A CUDA device and an importable Triton."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_tiles(device: torch.device, head_dim: int, v_dim: int, topk: int,
                 dtype: torch.dtype = torch.bfloat16) -> Tiles:
    """Tile shape, warps and pipeline stages for a kernel on `device` with inputs of `dtype`."""
    forced = getattr(_OVERRIDE, "tiles", None)
    if forced is not None:
        bm, bn = forced
        warps, stages = 4, 2
    elif device.type != "cuda":
        bm, bn, warps, stages = 32, 32, 4, 1
    elif max(head_dim, v_dim) <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif max(head_dim, v_dim) <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 4, 2
    if topk:
        bn = max(bn, _next_pow2(topk))  # the threshold buffer is one key tile wide
    if dtype.itemsize >= 4 and device.type == "cuda":
        # 4-byte tiles double the shared memory of each pipeline stage: the fp32 top-k dK/dV
        # pass needed 232 KB at 3 stages, over sm_80's 163 KB (tests/test_gpu_compile.py)
        stages = min(stages, 2)
    return Tiles(bm, bn, warps, stages)


def _check_backend(q: torch.Tensor) -> None:
    if q.device.type == "cuda":
        return
    if q.device.type != "cpu":
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors under Triton's "
                         f"interpreter), got {q.device.type} tensors")
    if os.environ.get("TRITON_INTERPRET", "") != "1":
        raise RuntimeError(
            "backend='triton' got CPU tensors; generated kernels run on the CPU only under Triton's "
            "interpreter. Set TRITON_INTERPRET=1 in the environment before Python starts (or before "
            "triton is first imported), use CUDA tensors, or use backend='reference'.")


def _layout(ir: PatternIR, bound: Bound, q_len: int, k_len: int, tiles: Tiles, device):
    from .layout import build_layout
    return build_layout(ir, bound, q_len, k_len, tiles.block_m, tiles.block_n, device)


def layout_lists(pnum, pidx, fnum, fidx) -> list:
    """A layout's PARTIAL and FULL tile lists and their strides, as the kernels take them: counts
    [Bd, Hd, n] and indices [Bd, Hd, n, m], size-1 dimensions broadcast (stride 0)."""
    if pidx.shape != fidx.shape or pnum.shape != fnum.shape:
        raise RuntimeError(f"internal: partial/full layout shapes differ: {tuple(pidx.shape)} vs "
                           f"{tuple(fidx.shape)}")
    if pnum.stride() != fnum.stride() or pidx.stride() != fidx.stride():
        pnum, pidx, fnum, fidx = (t.contiguous() for t in (pnum, pidx, fnum, fidx))
    return [pnum, pidx, fnum, fidx, *_strides(pnum, 3), *_strides(pidx, 4)]


def _strides(t: torch.Tensor, rank: int) -> list[int]:
    """Strides with size-1 dimensions broadcast (stride 0)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(rank)]


def _extra_arguments(names, bound: Bound) -> list:
    out = []
    tensors = {}
    for name in names:
        if name.startswith("prm_"):
            out.append(float(bound.params[name[4:]]))
        elif name.startswith("tns_"):
            rest = name[4:]
            base, _, suffix = rest.rpartition("_")
            if base and suffix[:1] in "ds" and suffix[1:].isdigit() and base in bound.tensors:
                t = bound.tensors[base]
                i = int(suffix[1:])
                out.append(t.shape[i] if suffix[0] == "d" else t.stride(i))
            else:
                t = bound.tensors[rest]
                if t.dtype == torch.bool:
                    t = t.view(torch.uint8)
                tensors[rest] = t
                out.append(t)
        else:
            out.append(int(bound.sizes[name]))
    return out


def triton_attention(pattern, q, k, v, bound: Bound, scale: float, return_lse: bool):
    """Run `pattern`'s generated forward kernel. Returns (out [B,H,Lq,Dv], lse [B,H,Lq] or None)."""
    _check_backend(q)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"backend='triton' supports float16, bfloat16 and float32 inputs, got "
                         f"{q.dtype}; use backend='reference' for {q.dtype}")
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got q/k {D}, v {Dv}")
    ir = pattern.ir
    compiled = forward_kernel(ir, *call_specialization(ir, bound))
    topk = compiled.kernel.topk
    if ir.topk is not None and topk < 1:
        raise ValueError(f"`select topk({topk})` must keep at least one key per row")

    out = torch.empty((B, H, Lq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device) if return_lse else None
    if Lq == 0 or B * H == 0:
        return out, lse
    if Lk == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse

    L, path = forward_launch(compiled, ir, bound, q, k, v, out, lse, scale, q.device)
    LAUNCHES[path] += 1
    run_launch(compiled, L)
    return out, lse


def call_specialization(ir: PatternIR, bound: Bound) -> tuple[dict, bool]:
    """What a call's generated kernels are specialized on: the int and bool parameter values,
    and whether index arithmetic must be int64 (`lowering/int_range.py`: some int expression of
    the pattern may leave int32 at this call's sizes)."""
    spec = {p.name: bound.params[p.name] for p in ir.params if p.type in ("int", "bool")}
    return spec, int32_overflow(ir, bound.sizes, bound.params) is not None


def forward_launch(compiled: Compiled, ir: PatternIR, bound: Bound, q, k, v, out, lse, scale: float,
                   target: torch.device) -> tuple[Launch, str]:
    """The forward launch for a call on `target` (q's device, or CUDA for `runtime/aot.py`,
    which passes CPU tensors of the call's shapes) and its path: 'closed_form' or 'layout'.
    `lse` is None unless the call returns it."""
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    tiles = choose_tiles(target, D, Dv, compiled.kernel.topk, q.dtype)
    if compiled.kernel.closed_form is not None:
        # the kernel computes its key tiles per query tile: no layout at all
        path, layout_args = "closed_form", [None, None, None, None, 0, 0, 0, 0, 0, 0, 0]
    else:
        lay = _layout(ir, bound, Lq, Lk, tiles, q.device)
        path = "layout"
        layout_args = layout_lists(lay.kv_partial_num, lay.kv_partial_idx, lay.kv_full_num,
                                   lay.kv_full_idx)
    lse_arg = lse if lse is not None else out
    lse_strides = list(lse.stride()) if lse is not None else [0, 0, 0]
    args = [q, k, v, out, lse_arg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides,
            *layout_args,
            float(scale), B, H, Hkv, Lq, Lk, D, Dv,
            *_extra_arguments(compiled.kernel.arguments, bound)]
    meta = launch_meta(target, tiles, BLOCK_D=max(16, _next_pow2(D)),
                       BLOCK_DV=max(16, _next_pow2(Dv)), RETURN_LSE=lse is not None,
                       INPUT_PRECISION=input_precision(q.dtype))
    grid = (triton_cdiv(Lq, tiles.block_m), B * H)
    return Launch("attn_fwd", compiled.module.attn_fwd, grid, tuple(args), meta), path


def input_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s precision: exact ("ieee") for 4- and 8-byte inputs; 16-bit inputs are exact in
    tensor cores anyway ("tf32" only names the default)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def run_launch(compiled: Compiled, launch: Launch) -> None:
    """Run one generated kernel; a failure inside generated code becomes a SpecError at the spec
    line that produced it (see `spec_error_for`)."""
    try:
        launch.fn[launch.grid](*launch.args, **launch.meta)
    except SpecError:
        raise
    except Exception as e:
        err = spec_error_for(e, compiled)
        if err is None:
            raise
        raise err from e


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _generated_line(e: BaseException, compiled: Compiled) -> int | None:
    """The line of the generated module an exception (or one it chains) points at."""
    lines = compiled.kernel.source.splitlines()
    best = None
    for err in _chain(e):
        src, node = getattr(err, "src", None), getattr(err, "node", None)
        if isinstance(src, str) and getattr(node, "lineno", None):
            text = src.splitlines()[node.lineno - 1].strip() if node.lineno <= len(src.splitlines()) else ""
            for no, line in enumerate(lines, 1):
                if text and line.strip() == text and no in compiled.kernel.line_spans:
                    best = no
        for frame in traceback.extract_tb(err.__traceback__):
            if os.path.abspath(frame.filename) == os.path.abspath(compiled.path) and \
                    frame.lineno in compiled.kernel.line_spans:
                best = frame.lineno
    return best


def spec_error_for(e: BaseException, compiled: Compiled) -> SpecError | None:
    """A SpecError at the spec line whose generated code Triton rejected, or None if the error
    did not come from a generated line (then it is not the spec's fault)."""
    no = _generated_line(e, compiled)
    if no is None:
        return None
    root = list(_chain(e))[-1]  # the interpreter wraps the real error once per call level
    lines = str(root).strip().splitlines()
    detail = f"{type(root).__name__}: {lines[-1] if lines else ''}"
    return SpecError(compiled.kernel.line_spans[no],
                     f"Triton could not compile the kernel code generated for this line "
                     f"({detail})",
                     f"generated kernel: {compiled.path}:{no}")
