"""The Triton backend's forward: check a call, generate (or find) its kernel, launch it.

`triton_attention` is what the custom op runs for `backend="triton"`. On CUDA tensors the kernel
is compiled by Triton; on CPU tensors it runs under Triton's interpreter, which needs
`TRITON_INTERPRET=1` in the environment before the kernel module is imported.

A kernel generated with a closed form (`Kernel.closed_form`) computes its key tiles itself: no
layout is built or passed. `LAUNCHES` counts forward launches per path ('closed_form' or
'layout').
"""
from __future__ import annotations

import collections
import functools
from dataclasses import replace

import torch

from ..dsl import config
from ..lowering.int_range import int32_overflow
from ..lowering.ir import PatternIR
from . import jit
from .binding import Bound, broadcast_kv
from .jit import Compiled, forward_kernel
from .launch import Call, Launch, Template, launch, next_pow2, run_launch
from .layout import build_layout
from .policy import (KERNELS, MAX_HEAD_DIM, SUPPORTED_DTYPES, Config, KernelOptions, Target,
                    config_for, forced_configs, split_count)
from .tune import chosen, configure

#: forward launches per path, for tests and benchmarks
LAUNCHES: collections.Counter = collections.Counter()
#: the oldest Triton whose interpreter runs the generated kernels (3.6's cannot take a loaded
#: loop bound in `range`); every supported version compiles them for GPUs
MIN_INTERPRETER_TRITON = (3, 7)


def triton_available() -> bool:
    """A CUDA device and an importable Triton."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(device: torch.device, dtype: torch.dtype, dtypes=SUPPORTED_DTYPES) -> None:
    """A call on `device` with inputs of `dtype` can run generated kernels: CUDA tensors, or CPU
    tensors under a Triton interpreter that runs them; a supported dtype."""
    device = torch.device(device)
    if device.type != "cuda":
        if device.type != "cpu":
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors under Triton's "
                             f"interpreter), got {device.type} tensors")
        if not config.interpreted():
            raise RuntimeError(
                "backend='triton' got CPU tensors; generated kernels run on the CPU only under "
                "Triton's interpreter. Set TRITON_INTERPRET=1 in the environment before Python "
                "starts (or before triton is first imported), use CUDA tensors, or use "
                "backend='reference'.")
        import triton
        version = tuple(int(x) for x in triton.__version__.split(".")[:2])
        if version < MIN_INTERPRETER_TRITON:
            raise RuntimeError(
                f"generated kernels run under Triton's interpreter from Triton "
                f"{'.'.join(map(str, MIN_INTERPRETER_TRITON))} on (this is {triton.__version__}); "
                f"upgrade Triton, use CUDA tensors, or use backend='reference'")
    if dtype not in dtypes:
        raise ValueError(f"backend='triton' supports float16, bfloat16 and float32 inputs, got "
                         f"{dtype}; use backend='reference' for {dtype}")


def check_head_dims(D: int, Dv: int) -> None:
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got q/k {D}, v {Dv}")


def call_specialization(ir: PatternIR, bound: Bound) -> tuple[dict, bool, bool]:
    """What a call's generated kernels are specialized on: the int and bool parameter values,
    whether index arithmetic must be int64 (`lowering/int_range.py`: some int expression of
    the pattern may leave int32 at this call's sizes, or at the positions' ends), and whether
    the call has positions."""
    spec = {p.name: bound.params[p.name] for p in ir.params if p.type in ("int", "bool")}
    sizes = bound.sizes
    if bound.positions is not None:  # q and k reach the positions' ends, rounded up to a
        # power of two so that decoding steps (ends growing by one) share the analysis
        q_end, k_end = (next_pow2(n) for n in bound.positions.ends(sizes["q_len"]))
        sizes = dict(sizes, q_len=q_end, k_len=k_end)
    return spec, int32_overflow(ir, sizes, bound.params) is not None, bound.positions is not None


def _table(bound: Bound):
    """The positions table a kernel reads (None for a call without positions)."""
    return None if bound.positions is None else bound.positions.table


def call_sizes(bound: Bound, v: torch.Tensor) -> dict[str, int]:
    """The sizes kernels take: the pattern's, and the value head dim."""
    return dict(bound.sizes, v_dim=v.shape[3])


def layouts(ir: PatternIR, bound: Bound, q, k, sig):
    """`layout_for(config)`: the block layout `sig`'s kernel reads at a configuration's tiles
    (built once per tile shape, and cached), or None for a kernel that computes its tiles."""
    def layout_for(cfg: Config):
        if not sig.uses_layout():
            return None
        return build_layout(ir, bound, q.shape[2], bound.sizes["k_len"], cfg.block_m, cfg.block_n,
                            q.device)
    return layout_for


def forward_config(ir: PatternIR, bound: Bound, q, v, target: Target | None = None) -> Config:
    """The forward kernel's table configuration for a bound call (tile shape, warps, stages)."""
    compiled = forward_kernel(ir, *call_specialization(ir, bound))
    return config_for("forward", target or Target.of(q.device), q.shape[3], v.shape[3], q.dtype,
                      compiled.kernel.constraints)


def call_configs(ir: PatternIR, bound: Bound, q, v, options: KernelOptions | None = None,
                 settled: bool = False) -> dict[str, Config | None]:
    """{kernel: the configuration a call launches it with ('forward', 'dq', 'dkdv')}: what
    `options` force (checked: ValueError naming the key), else the policy's or the tuner's
    choice; None for a kernel the autotuner has yet to tune, or once the call has run
    (`settled`) the policy's (what `tune.configure` falls back to where it does not tune)."""
    kernel = forward_kernel(ir, *call_specialization(ir, bound)).kernel
    target = Target.of(q.device)
    D, Dv = q.shape[3], v.shape[3]
    forced = forced_configs(options, target, D, Dv, q.dtype, kernel.constraints) if options else {}
    out = {}
    for name in KERNELS:
        cfg = forced.get(name) or chosen(kernel.pattern_key, name, target, D, Dv, q.dtype,
                                         q.device, kernel.constraints)
        if cfg is None and settled:
            cfg = config_for(name, target, D, Dv, q.dtype, kernel.constraints)
        out[name] = cfg
    return out


#: prepared forward launches by call signature, least recently used dropped (`launch.Template`)
_TEMPLATES: collections.OrderedDict = collections.OrderedDict()
TEMPLATE_CACHE_SIZE = 256


def _template_key(ir: PatternIR, q, k, v, bound: Bound, return_lse: bool, options: str) -> tuple:
    """What a prepared launch depends on: the pattern and its compiled-in (int, bool)
    parameters, the shapes, strides, dtype and device of every tensor, the kernel options.
    Float parameters, the scale and the tensors themselves are filled in per call."""
    return (jit.GENERATION, ir, tuple(x for x in bound.params.values() if not isinstance(x, float)),
            None if bound.positions is None else call_specialization(ir, bound)[1],
            q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device,
            None if bound.pages is None else bound.pages.table.shape,
            return_lse, tuple((t.shape, t.stride(), t.dtype) for t in bound.tensors.values()),
            options)


def triton_attention(ir: PatternIR, q, k, v, bound: Bound, scale: float, return_lse: bool,
                     options: str = ""):
    """Run the generated forward kernels of `ir`. Returns (out [B,H,Lq,Dv], lse [B,H,Lq] or
    None). `options`: the call's kernel options in their text form (`KernelOptions.text`; ""
    for none).

    A call with the signature of an earlier one reuses its prepared launches: no validation,
    planning or binding is repeated, only the per-call arguments are filled in."""
    if bound.pages is None:  # (page pools serve every sequence through the block table)
        k, v = broadcast_kv(q, k, v)
    Lk = bound.sizes["k_len"]
    key = _template_key(ir, q, k, v, bound, return_lse, options)
    hit = _TEMPLATES.get(key)
    B, H, Lq, _ = q.shape
    out = torch.empty((B, H, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device) if return_lse else None
    if hit is not None:
        _TEMPLATES.move_to_end(key)
        compiled, templates, path, splits, pack = hit
        call = forward_call(compiled, bound, q, k, v, out, lse, scale, splits, pack)
        layout = None
        for t in templates:
            if t.layout is not None and layout is None:
                meta = t.launch.meta
                layout = build_layout(ir, bound, Lq, Lk, meta["BLOCK_M"], meta["BLOCK_N"],
                                      q.device)
        LAUNCHES[path] += 1
        for t in templates:
            run_launch(compiled, t.bind(call, layout))
        return out, lse
    check_backend(q.device, q.dtype)
    check_head_dims(q.shape[3], v.shape[3])
    compiled = forward_kernel(ir, *call_specialization(ir, bound))
    if Lq == 0 or B * H == 0:
        return out, lse
    if Lk == 0:  # every row is empty: output 0, LSE the sink's (or -inf)
        out.zero_()
        if lse is not None:
            if ir.sink is None:
                lse.fill_(float("-inf"))
            else:
                from .reference import sink_logits
                lse.copy_(sink_logits(ir, bound, bound.tensors, lse.dtype, (B, H, Lq, 0), q.device))
        return out, lse
    launches, path, splits, pack = forward_launches(compiled, ir, bound, q, k, v, out, lse, scale,
                                                    Target.of(q.device),
                                                    KernelOptions.parse(options))
    _TEMPLATES[key] = (compiled, [Template.of(compiled, L) for L in launches], path, splits, pack)
    while len(_TEMPLATES) > TEMPLATE_CACHE_SIZE:
        _TEMPLATES.popitem(last=False)
    LAUNCHES[path] += 1
    for L in launches:
        run_launch(compiled, L)
    return out, lse


def forward_call(compiled: Compiled, bound: Bound, q, k, v, out, lse, scale: float,
                 splits: int, pack: int = 1) -> Call:
    """What the forward kernels of a call bind: its tensors (with split-K's partial buffers and,
    for a split `select topk`, the threshold buffer), sizes (the split count and GQA packing
    among them) and scale."""
    tensors = dict(q=q, k=k, v=v, out=out, lse=lse, pos=_table(bound),
                   table=None if bound.pages is None else bound.pages.table)
    if splits > 1:
        B, H, Lq, _ = q.shape
        f32 = dict(dtype=torch.float32, device=q.device)
        tensors.update(opart=torch.empty((splits, B, H, Lq, v.shape[3]), **f32),
                       mpart=torch.empty((splits, B, H, Lq), **f32),
                       lpart=torch.empty((splits, B, H, Lq), **f32))
        if compiled.kernel.topk:
            tensors["kth"] = torch.empty((B, H, Lq), **f32)
    return Call(tensors, dict(call_sizes(bound, v), splits=splits, pack=pack), scale, bound)


def forward_launches(compiled: Compiled, ir: PatternIR, bound: Bound, q, k, v, out, lse,
                     scale: float, target: Target,
                     options: KernelOptions | None = None) -> tuple[list[Launch], str, int, int]:
    """The forward launches of a call on `target` (q's device, or a GPU for `runtime/aot.py`,
    which passes CPU tensors of the call's shapes), its path ('closed_form' or 'layout'), split
    count and GQA packing: `attn_fwd` alone, or split-K's `attn_kth` (a `select topk` only),
    `attn_fwd` over the splits and `attn_merge`. `lse` is None unless the call returns it;
    `options` are the call's kernel options."""
    kernel = compiled.kernel
    sig = kernel.signature("attn_fwd")
    layout_for = layouts(ir, bound, q, k, sig)
    facts = dict(RETURN_LSE=lse is not None,
                 PAGE=0 if bound.pages is None else bound.pages.page_size)
    forced = forced_configs(options, target, q.shape[3], v.shape[3], q.dtype,
                            kernel.constraints)["forward"] if options else None
    cfg = configure(compiled, "attn_fwd", target, forward_call(compiled, bound, q, k, v, out, lse,
                                                               scale, 1),
                    layout_for, forced=forced, SPLIT=False, **facts)
    pack = call_pack(kernel, q, k, cfg)
    splits = call_splits(kernel, bound, q, k, cfg, target)
    call = forward_call(compiled, bound, q, k, v, out, lse, scale, splits, pack)
    layout = layout_for(cfg)
    launches = []
    if splits > 1 and kernel.topk:
        launches.append(launch(compiled, "attn_kth", call, cfg, target, layout, **facts))
    launches.append(launch(compiled, "attn_fwd", call, cfg, target, layout, SPLIT=splits > 1,
                           PACK=pack, **facts))
    if splits > 1:  # the merge's row tile: no taller than the rows (one per decoding step)
        rows = max(16, min(cfg.block_m, next_pow2(q.shape[2])))
        launches.append(launch(compiled, "attn_merge", call, replace(cfg, block_m=rows), target,
                               None, **facts))
    return launches, "layout" if sig.uses_layout() else "closed_form", splits, pack


def call_pack(kernel, q, k, cfg: Config) -> int:
    """GQA packing of a call's forward: the query heads of a kv head's group share its programs
    (their rows (query, head) pairs) when there are fewer queries than a tile's rows (decoding)
    and the forward computes its key ranges per tile (closed form: they hold for every head).
    Not where a keep decision reads the score (top-k): its decisions must come from the dot of
    the tiles every pass uses."""
    group = q.shape[1] // k.shape[1]
    if group == 1 or kernel.closed_form is None or kernel.constraints.shared_tiles:
        return 1
    return group if q.shape[2] < cfg.block_m else 1


def call_splits(kernel, bound: Bound, q, k, cfg: Config, target: Target) -> int:
    """The split-K count of a call's forward at configuration `cfg` (`policy.split_count`)."""
    B, H, Lq, _ = q.shape
    pack = call_pack(kernel, q, k, cfg)
    programs = -(-Lq * pack // cfg.block_m) * B * H // pack
    return split_count(cfg, target, programs,
                       _visited_key_tiles(kernel, bound, Lq, bound.sizes["k_len"], cfg), q.device)


def _visited_key_tiles(kernel, bound: Bound, q_len: int, k_len: int, cfg: Config):
    """`split_count`'s estimate of the key tiles one row tile visits, as a thunk (only a call
    that might split evaluates it): from the closed form at the first and last query tile of
    the sequence with the most keys, else every key tile."""
    def estimate() -> int:
        every = -(-k_len // cfg.block_n)
        cf = kernel.closed_form
        placed = bound.positions
        if cf is None or (placed is not None and placed.values is None):
            return every
        triple = (0, 0, k_len) if placed is None else max(placed.values, key=lambda t: t[2])
        return min(every, _closed_form_tiles(cf, tuple(sorted(bound.sizes.items())), triple,
                                             q_len, cfg.block_m, cfg.block_n))
    return estimate


@functools.lru_cache(maxsize=1024)
def _closed_form_tiles(cf, sizes: tuple, triple: tuple, q_len: int, block_m: int,
                       block_n: int) -> int:
    q_start, k_start, k_len = triple
    bound = cf.bind(block_m, dict(sizes, q_start=q_start, k_start=k_start, k_len=k_len))
    tiles = 0
    for q_lo in {0, (max(q_len, 1) - 1) // block_m * block_m}:
        cover, _ = bound.evaluate(q_lo, min(q_lo + block_m, q_len))
        tiles = max(tiles, sum(-(-max(0, min(hi, k_len) - max(lo, 0)) // block_n) + 1
                               for lo, hi in cover))
    return tiles
