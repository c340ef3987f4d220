"""Compile generated kernels for a GPU target without a GPU (ahead of time).

`forward_launches` / `backward_launches` build the launches the CUDA backend would make for one
call — by the same code that builds them at run time (`dispatch.forward_launches`,
`backward.backward_launches`, with CUDA as the target and CPU tensors of the call's shapes and
dtypes standing in for the CUDA ones): the generated kernel, its arguments, the constexprs and
the CUDA tile shapes, warps and stages. `compile_launch` specializes a launch the
way Triton's JIT would (pointer alignment, ints equal to 1 or divisible by 16, None arguments)
and runs Triton's whole NVIDIA pipeline for a `GPUTarget`: TTIR, TTGIR, LLVM IR, PTX, and a
cubin from the `ptxas` shipped with Triton. Only the device-dependent last steps are left out:
loading the cubin and running it. `kernel_statistics` asks that `ptxas` what it allocated
(registers per thread, spill bytes) and counts the MMA instructions of the PTX.

The process must not run under Triton's interpreter: the generated modules read
TRITON_INTERPRET when imported and would compile their interpreter branches instead of the GPU
ones. `compile_launch` refuses to run with TRITON_INTERPRET=1.

Uses three Triton internals that have kept their shape from 3.6 to 3.9 (the supported range):
`create_function_from_signature` (the JIT's argument binder), `JITFunction._pack_args` and the
NVIDIA backend's `get_ptxas`.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

from ..dsl import config
from ..lowering.derivative import differentiable_tensors
from .backward import backward_launches as _backward_launches
from .dispatch import call_specialization
from .dispatch import forward_launches as dispatch_forward_launches
from .jit import backward_kernel, forward_kernel
from .launch import Launch
from .policy import MAX_SHARED, KernelOptions, Target
from .paging import Pages
from .positions import positions_of


__all__ = ["Launch", "MAX_SHARED", "forward_launches", "backward_launches", "compile_launch",
           "kernel_statistics"]


def _qkv(shape: dict, dtype: torch.dtype):
    B, H, Hkv = shape["batch"], shape["heads"], shape["kv_heads"]
    Lq, Lk, D, Dv = shape["q_len"], shape["k_len"], shape["head_dim"], shape["v_dim"]
    return (torch.empty((B, H, Lq, D), dtype=dtype), torch.empty((B, Hkv, Lk, D), dtype=dtype),
            torch.empty((B, Hkv, Lk, Dv), dtype=dtype))


def forward_launches(pattern, shape: dict, dtype: torch.dtype, arguments: dict,
                     return_lse: bool, capability: int = 90, splits: int = 1,
                     placed: bool = False, page_size: int = 0) -> list[Launch]:
    """The forward launches of `pattern` on a GPU of this compute capability for a call of
    this shape (batch, heads, kv_heads, q_len, k_len, head_dim, v_dim), dtype and arguments
    (tensor arguments as CPU tensors): `runtime/dispatch.py`'s own launches, with CPU
    stand-ins for the CUDA tensors. `splits` > 1 forces split-K (`attn_kth` for a top-k,
    `attn_fwd`, `attn_merge`); `placed`: the call has positions (bottom-right, as decoding);
    `page_size` > 0: k and v are page pools read through a block table (k_len a multiple)."""
    q, k, v = _qkv(shape, dtype)
    bound = pattern.bind(q, k, v, arguments)
    if placed:
        bound.positions = positions_of(q, k, q_start=k.shape[2] - q.shape[2])
    if page_size:
        B, Hkv, Lk, _ = k.shape
        n = Lk // page_size
        k, v = (torch.empty((B * n, Hkv, page_size, t.shape[3]), dtype=dtype) for t in (k, v))
        bound.pages = Pages(torch.arange(B * n, dtype=torch.int32).view(B, n), page_size)
    compiled = forward_kernel(pattern.ir, *call_specialization(pattern.ir, bound))
    B, H, Lq, _ = q.shape
    out = torch.empty((B, H, Lq, v.shape[3]), dtype=dtype)
    lse = torch.empty((B, H, Lq), dtype=torch.float32) if return_lse else None
    options = KernelOptions.of({"forward": {"splits": splits}}) if splits > 1 else None
    launches, _, _, _ = dispatch_forward_launches(compiled, pattern.ir, bound, q, k, v, out, lse,
                                               1.0 / q.shape[3] ** 0.5,
                                               Target("cuda", capability), options)
    return launches


def backward_launches(pattern, shape: dict, dtype: torch.dtype, arguments: dict,
                      wrt: tuple[str, ...] = (), deterministic: bool = False,
                      capability: int = 90) -> list[Launch]:
    """The backward launches (`attn_kth` for top-k, `attn_bwd_dq`, `attn_bwd_dkdv`) of
    `pattern` on a GPU of this compute capability, with gradients for the float tensor arguments named in `wrt`:
    `runtime/backward.py`'s own launches, with CPU stand-ins for the CUDA tensors."""
    q, k, v = _qkv(shape, dtype)
    bound = pattern.bind(q, k, v, arguments)
    ir = pattern.ir
    grad_names = tuple(sorted(set(wrt) & set(differentiable_tensors(ir))))
    spec, wide, positions = call_specialization(ir, bound)
    compiled = backward_kernel(ir, spec, grad_names, wide, positions)
    B, H, Lq, _ = q.shape
    stats = torch.empty((B, H, Lq), dtype=torch.float32)
    grad_out = torch.empty((B, H, Lq, v.shape[3]), dtype=dtype)
    launches, _ = _backward_launches(compiled, ir, bound, q, k, v, grad_out, stats, stats,
                                     torch.empty_like(q), torch.empty_like(k),
                                     torch.empty_like(v), deterministic,
                                     1.0 / q.shape[3] ** 0.5, Target("cuda", capability))
    return launches


def compile_launch(launch: Launch, capability: int = 90):
    """Compile one launch for `cuda` at this compute capability (e.g. 90 for sm_90) through
    Triton's full pipeline; returns Triton's `CompiledKernel` (its `asm` holds ttir, ttgir,
    llir, ptx and cubin). Raises Triton's error when a stage fails, and RuntimeError when the
    kernel needs more shared memory than one block of that target may use."""
    if config.interpreted():
        raise RuntimeError("compile_launch needs a process without TRITON_INTERPRET=1: the "
                           "generated modules would compile their interpreter branches")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.meta, debug=bool(fn.debug))
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    limit = MAX_SHARED.get(capability)
    if limit is not None and kernel.metadata.shared > limit:
        raise RuntimeError(f"{launch.name} needs {kernel.metadata.shared} bytes of shared memory; "
                           f"sm_{capability} allows {limit} per block")
    return kernel


def _ptxas(capability: int) -> str:
    """The ptxas Triton compiles this target with (Triton's wheels ship two: 3.9 uses the newer
    one from sm_90 up, 3.6 only from sm_100), so it accepts the PTX Triton wrote."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).path


#: instruction patterns of the memory path, counted in the PTX (see `memory_path`)
_MEMORY_PATTERNS = {
    # scalar 2-byte global accesses: a 16-bit tile moved element by element
    "ld_b16": r"\bld\.global(?:\.(?!v\d)\w+)*\.b16\b",
    "st_b16": r"\bst\.global(?:\.(?!v\d)\w+)*\.b16\b",
    # 16-byte vector global accesses
    "ld_16B": r"\bld\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64|v4\.f32)\b",
    "st_16B": r"\bst\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64|v4\.f32)\b",
    # asynchronous 16-byte copies into shared memory (what Triton's pipeliner emits)
    "cp_async_16B": r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(?:0x10|16)\b",
    # Hopper TMA copies
    "tma": r"\bcp\.async\.bulk\.tensor\b",
    "ex2": r"\bex2\.approx",
}


def memory_path(ptx: str) -> dict:
    """How a kernel moves data, from its PTX: scalar 2-byte global loads / stores (`ld_b16`,
    `st_b16`: a tile moved element by element), 16-byte vector ones (`ld_16B`, `st_16B`),
    16-byte asynchronous copies into shared memory (`cp_async_16B`, pipelined) and TMA copies
    (`tma`), and `ex2` instructions (the softmax's exponentials). Read this first: a kernel
    whose tiles move as scalars is slow whatever its registers say."""
    return {name: len(re.findall(pattern, ptx)) for name, pattern in _MEMORY_PATTERNS.items()}


def kernel_statistics(kernel) -> dict:
    """What a compiled kernel costs on its target, from the PTX and `ptxas -v`: the memory path
    (`memory_path`), registers per thread, spill stores / loads (bytes per thread), shared
    memory (bytes per block; with the tile sizes it tells how many pipeline stages were
    allocated), and its MMA instructions: `wgmma` (Hopper's warpgroup MMA) and `mma_sync` (the
    Ampere-style MMA that Hopper also runs, at a fraction of wgmma's throughput)."""
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\.target\s+(sm_(\d+)\w*)", ptx, re.M)
    if target is None:
        raise RuntimeError("the PTX names no .target")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w", encoding="utf-8") as f:
            f.write(ptx)
        run = subprocess.run([_ptxas(int(target.group(2))), "-v", f"-arch={target.group(1)}", src,
                              "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip()[-2000:]}")
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {run.stderr.strip()[-2000:]}")
    return dict(**memory_path(ptx), registers=int(regs.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)), shared=int(kernel.metadata.shared),
                wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync", ptx)))
