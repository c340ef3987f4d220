"""One launcher for every generated kernel: a call is bound to a kernel by walking its signature.

`launch(compiled, name, call, config, target, layout=..., constexprs=...)` reads the kernel's
`Signature` (`lowering/signature.py`) argument by argument: each `Arg.kind` says where the
value comes from (a call tensor and its strides, a size, the scale, a pattern parameter or
tensor argument, a gradient buffer, a block-layout list), so no argument list is written out by
hand and no argument name is parsed. `run_launch` runs the result; a failure inside generated
code becomes a SpecError at the spec line that produced it. `runtime/aot.py` compiles the same
`Launch` objects for a GPU target without a GPU.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field

import torch

from ..dsl.diagnostics import SpecError
from ..lowering.signature import Signature
from .binding import Bound
from .jit import Compiled
from .policy import Config, Target


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the generated JIT function, its grid, positional arguments and keyword
    constexprs (num_warps / num_stages included for a CUDA target)."""

    name: str
    fn: object
    grid: tuple
    args: tuple
    meta: dict = field(hash=False, compare=False)


@dataclass
class Call:
    """What a launch binds: the call's tensors by role (q, k, v, out, lse, do, ...; None for an
    optional one not asked for), sizes, scale, the bound pattern arguments and gradient
    buffers."""

    tensors: dict[str, torch.Tensor | None]
    sizes: dict[str, int]
    scale: float
    bound: Bound
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _broadcast_strides(t: torch.Tensor) -> list[int]:
    """Strides with size-1 dimensions broadcast (stride 0)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(t.dim())]


def layout_lists(layout, orientation: str) -> dict:
    """A block layout's PARTIAL and FULL lists for one orientation ('kv': key tiles per query
    tile, 'q': query tiles per key tile), and their strides (stride 0 on size-1 dims); computed
    once per layout (a cached layout serves many calls)."""
    cache = layout.__dict__.setdefault("_launch_lists", {})
    lists = cache.get(orientation)
    if lists is None:
        lists = cache[orientation] = _layout_lists(layout, orientation)
    return lists


def _layout_lists(layout, orientation: str) -> dict:
    lists = {name: getattr(layout, f"{orientation}_{cls}_{what}")
             for name, cls, what in (("part_num", "partial", "num"), ("part_idx", "partial", "idx"),
                                     ("full_num", "full", "num"), ("full_idx", "full", "idx"))}
    if lists["part_idx"].shape != lists["full_idx"].shape or \
            lists["part_num"].shape != lists["full_num"].shape:
        raise RuntimeError("internal: partial/full layout shapes differ")
    if lists["part_num"].stride() != lists["full_num"].stride() or \
            lists["part_idx"].stride() != lists["full_idx"].stride():
        lists = {n: t.contiguous() for n, t in lists.items()}
    lists["num"] = _broadcast_strides(lists["part_num"])
    lists["idx"] = _broadcast_strides(lists["part_idx"])
    return lists


def arguments(sig: Signature, call: Call, layout=None) -> tuple:
    """The positional arguments of `sig` for this call (see `Arg.kind`)."""
    out = []
    lists = layout_lists(layout, sig.layout) if sig.uses_layout() else None
    bound = call.bound
    for a in sig.args:
        k = a.kind
        if k == "tensor":
            t = call.tensors.get(a.of)
            if t is None and not a.optional:
                raise RuntimeError(f"internal: {sig.name} needs the {a.of} tensor")
            out.append(t)
        elif k == "stride":
            t = call.tensors.get(a.of)
            out.append(0 if t is None else t.stride(a.axis))
        elif k == "size":
            out.append(int(call.sizes[a.of]))
        elif k == "scale":
            out.append(float(call.scale))
        elif k == "param":
            out.append(float(bound.params[a.of]))
        elif k == "operand":
            t = bound.tensors[a.of]
            out.append(t.view(torch.uint8) if t.dtype == torch.bool else t)
        elif k == "operand_dim":
            out.append(bound.tensors[a.of].shape[a.axis])
        elif k == "operand_stride":
            out.append(bound.tensors[a.of].stride(a.axis))
        elif k == "grad":
            out.append(call.grads[a.of])
        elif k == "layout":
            out.append(lists[a.of])
        elif k == "layout_stride":
            out.append(lists[a.of][a.axis])
        else:
            raise RuntimeError(f"internal: no binding for argument kind {k!r} ({a.name})")
    return tuple(out)


def grid(sig: Signature, config: Config, call: Call) -> tuple[int, ...]:
    """The launch grid: (tiles, batch x heads) of the signature's grid kind, and the split
    count for a split one."""
    s = call.sizes
    if sig.grid == "query_tiles":
        return cdiv(s["q_len"], config.block_m), s["batch"] * s["heads"]
    if sig.grid == "split_query_tiles":  # split-K: the key tiles of a row tile over programs;
        pack = s.get("pack", 1)          # GQA packing: rows of `pack` heads per (batch, kv head)
        return (cdiv(s["q_len"] * pack, config.block_m), s["batch"] * s["heads"] // pack,
                s.get("splits", 1))
    if sig.grid == "key_tiles":
        return cdiv(s["k_len"], config.block_n), s["batch"] * s["kv_heads"]
    raise RuntimeError(f"internal: unknown grid {sig.grid!r}")


def input_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s precision: exact ("ieee") for 4- and 8-byte inputs; 16-bit inputs are exact in
    tensor cores anyway ("tf32" only names the default)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def launch(compiled: Compiled, name: str, call: Call, config: Config, target: Target,
           layout=None, **facts) -> Launch:
    """Bind kernel `name` of `compiled` to `call` with this tile configuration on `target`.
    `facts` give the constexprs that the call decides (RETURN_LSE, DETERMINISTIC, ...); tile
    sizes, padded head dims, precision and FP64 are derived here. Every constexpr the signature
    names must be known."""
    sig = compiled.kernel.signature(name)
    dtype = call.tensors["q"].dtype
    known = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                 BLOCK_D=max(16, next_pow2(call.sizes["head_dim"])),
                 BLOCK_DV=max(16, next_pow2(call.sizes["v_dim"])),
                 HEAD_DIM=call.sizes["head_dim"], V_DIM=call.sizes["v_dim"],
                 INPUT_PRECISION=input_precision(dtype), FP64=dtype == torch.float64,
                 SPLIT=False, PACK=1, PAGE=0)
    known.update(facts)  # what the call decides: LSE, split-K, GQA packing, page size, ...
    missing = [c for c in sig.constexprs if c not in known]
    if missing:
        raise RuntimeError(f"internal: no value for constexprs {missing} of {name}")
    meta = {c: known[c] for c in sig.constexprs}
    if target.is_cuda:
        meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(name, getattr(compiled.module, name), grid(sig, config, call),
                  arguments(sig, call, layout), meta)


#: the argument kinds whose values change from call to call with the same shapes and strides
_PER_CALL = ("tensor", "scale", "operand", "param", "grad", "layout", "layout_stride")


@dataclass
class Template:
    """A launch prepared for one call signature (shapes, strides, dtypes, parameter values
    known to the key it is cached under): the constant arguments bound once, and the slots a
    call fills (its tensors, tensor arguments, float parameters, layout lists), so a repeated
    call does no binding work."""

    launch: Launch
    slots: tuple[tuple[int, object], ...]   # (position, Arg)
    layout: str | None                      # the layout orientation the kernel reads, if any

    @staticmethod
    def of(compiled: Compiled, launch: Launch) -> "Template":
        sig = compiled.kernel.signature(launch.name)
        slots = tuple((i, a) for i, a in enumerate(sig.args) if a.kind in _PER_CALL)
        return Template(launch, slots, sig.layout)

    def bind(self, call: Call, layout=None) -> Launch:
        """The launch for `call` (same signature as the one the template was made from)."""
        args = list(self.launch.args)
        lists = layout_lists(layout, self.layout) if self.layout is not None else None
        bound = call.bound
        for i, a in self.slots:
            k = a.kind
            if k == "tensor":
                args[i] = call.tensors.get(a.of)
            elif k == "scale":
                args[i] = float(call.scale)
            elif k == "operand":
                t = bound.tensors[a.of]
                args[i] = t.view(torch.uint8) if t.dtype == torch.bool else t
            elif k == "param":
                args[i] = float(bound.params[a.of])
            elif k == "grad":
                args[i] = call.grads[a.of]
            elif k == "layout":
                args[i] = lists[a.of]
            else:
                args[i] = lists[a.of][a.axis]
        launch = self.launch
        return Launch(launch.name, launch.fn, launch.grid, tuple(args), launch.meta)


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
