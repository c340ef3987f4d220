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

import torch

from ..dsl import config
from ..lowering.int_range import int32_overflow
from ..lowering.ir import PatternIR
from .binding import Bound, broadcast_kv
from . import jit
from .jit import Compiled, forward_kernel
from .launch import Call, Launch, Template, launch, run_launch
from .layout import build_layout
from .policy import (KERNELS, MAX_HEAD_DIM, SUPPORTED_DTYPES, Config, KernelOptions, Target,
                     config_for, forced_configs)
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
    if bound.positions is not None:  # q and k reach the positions' ends
        q_end, k_end = bound.positions.ends(sizes["q_len"])
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
        return build_layout(ir, bound, q.shape[2], k.shape[2], cfg.block_m, cfg.block_n, q.device)
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
            return_lse, tuple((t.shape, t.stride(), t.dtype) for t in bound.tensors.values()),
            options)


def triton_attention(ir: PatternIR, q, k, v, bound: Bound, scale: float, return_lse: bool,
                     options: str = ""):
    """Run the generated forward kernel of `ir`. Returns (out [B,H,Lq,Dv], lse [B,H,Lq] or None).
    `options`: the call's kernel options in their text form (`KernelOptions.text`; "" for none).

    A call with the signature of an earlier one reuses its prepared launch: no validation,
    planning or binding is repeated, only the per-call arguments are filled in."""
    k, v = broadcast_kv(q, k, v)
    key = _template_key(ir, q, k, v, bound, return_lse, options)
    hit = _TEMPLATES.get(key)
    B, H, Lq, _ = q.shape
    out = torch.empty((B, H, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device) if return_lse else None
    call = Call(dict(q=q, k=k, v=v, out=out, lse=lse, pos=_table(bound)), bound.sizes, scale,
                bound)
    if hit is not None:
        _TEMPLATES.move_to_end(key)
        compiled, template, path = hit
        layout = None
        if template.layout is not None:
            meta = template.launch.meta
            layout = build_layout(ir, bound, Lq, k.shape[2], meta["BLOCK_M"], meta["BLOCK_N"],
                                  q.device)
        LAUNCHES[path] += 1
        run_launch(compiled, template.bind(call, layout))
        return out, lse
    check_backend(q.device, q.dtype)
    check_head_dims(q.shape[3], v.shape[3])
    compiled = forward_kernel(ir, *call_specialization(ir, bound))
    if Lq == 0 or B * H == 0:
        return out, lse
    if k.shape[2] == 0:  # every row is empty: output 0, LSE the sink's (or -inf)
        out.zero_()
        if lse is not None:
            if ir.sink is None:
                lse.fill_(float("-inf"))
            else:
                from .reference import sink_logits
                lse.copy_(sink_logits(ir, bound, bound.tensors, lse.dtype, (B, H, Lq, 0), q.device))
        return out, lse
    L, path = forward_launch(compiled, ir, bound, q, k, v, out, lse, scale, Target.of(q.device),
                             KernelOptions.parse(options))
    _TEMPLATES[key] = (compiled, Template.of(compiled, L), path)
    while len(_TEMPLATES) > TEMPLATE_CACHE_SIZE:
        _TEMPLATES.popitem(last=False)
    LAUNCHES[path] += 1
    run_launch(compiled, L)
    return out, lse


def forward_launch(compiled: Compiled, ir: PatternIR, bound: Bound, q, k, v, out, lse,
                   scale: float, target: Target,
                   options: KernelOptions | None = None) -> tuple[Launch, str]:
    """The forward launch of a call on `target` (q's device, or a GPU for `runtime/aot.py`,
    which passes CPU tensors of the call's shapes) and its path: 'closed_form' or 'layout'.
    `lse` is None unless the call returns it; `options` are the call's kernel options."""
    sig = compiled.kernel.signature("attn_fwd")
    call = Call(dict(q=q, k=k, v=v, out=out, lse=lse, pos=_table(bound)), call_sizes(bound, v),
                scale, bound)
    layout_for = layouts(ir, bound, q, k, sig)
    facts = dict(RETURN_LSE=lse is not None)
    forced = forced_configs(options, target, q.shape[3], v.shape[3], q.dtype,
                            compiled.kernel.constraints)["forward"] if options else None
    cfg = configure(compiled, "attn_fwd", target, call, layout_for, forced=forced, **facts)
    return (launch(compiled, "attn_fwd", call, cfg, target, layout_for(cfg), **facts),
            "layout" if sig.uses_layout() else "closed_form")
