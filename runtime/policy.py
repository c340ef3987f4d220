"""Launch policy, in one place: tile shapes, warps and pipeline stages for every kernel on every
target (Triton's interpreter, sm_80, sm_90), the supported dtypes and head dims.

The runtime, `runtime/aot.py`, the fuzzer, the benchmarks and the tests all ask `config_for`.
A kernel signature names the policy it launches with (`Signature.config`): 'forward' (the
forward and the backward's top-k threshold, which must see the forward's tiles), 'dq' or
'dkdv'. The CUDA tables hold the shapes without register spills (or with the fewest) when
compiled by the Triton in use; `python bench/static.py` shows registers, spills, shared memory
and MMA instructions per kernel (figures in bench/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, replace

import torch

from ..lowering.signature import Constraints

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
KERNELS = ("forward", "dq", "dkdv")


@dataclass(frozen=True)
class Config:
    """How one kernel launches: its tile (BLOCK_M query rows x BLOCK_N keys), warps, stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Target:
    """Where kernels run: Triton's interpreter on the CPU, or a CUDA GPU of a compute capability
    (e.g. 90 for sm_90)."""

    kind: str                   # 'interpreter' | 'cuda'
    capability: int | None = None

    @staticmethod
    def of(device: torch.device) -> "Target":
        device = torch.device(device)
        if device.type != "cuda":
            return INTERPRETER
        return Target("cuda", _capability(device.index if device.index is not None else
                                          torch.cuda.current_device()))

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


INTERPRETER = Target("interpreter")


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


_OVERRIDE = threading.local()


@contextlib.contextmanager
def tile_override(block_m: int, block_n: int):
    """Force the tile shape of every kernel in this thread (tests use small tiles under the
    interpreter, the fuzzer draws them)."""
    old = getattr(_OVERRIDE, "tiles", None)
    _OVERRIDE.tiles = (block_m, block_n)
    try:
        yield
    finally:
        _OVERRIDE.tiles = old


def _forward_table(target: Target, d: int) -> Config:
    if not target.is_cuda:
        return Config(32, 32, 4, 1)
    if d <= 64:
        return Config(128, 64, 4, 3)
    if d <= 128:
        return Config(128, 64, 8, 3)
    return Config(64, 32, 4, 2)


def _backward_table(target: Target, d: int) -> tuple[Config, Config]:
    """(dQ, dK/dV) configurations on CUDA."""
    if d <= 64:
        return Config(128, 64, 8, 3), Config(64, 128, 8, 3)
    if d <= 128:
        return Config(128, 32, 8, 3), Config(32, 128, 8, 3)
    return Config(64, 32, 8, 2), Config(32, 64, 8, 2)


def config_for(kernel: str, target: Target, head_dim: int, v_dim: int, dtype: torch.dtype,
               constraints: Constraints = Constraints()) -> Config:
    """The configuration of `kernel` ('forward', 'dq' or 'dkdv') for this target, head dims,
    input dtype and module constraints.

    Where a keep decision reads the score (`constraints.shared_tiles`), every pass uses the
    forward's tiles, so each score is formed by the same dot as in the forward and the keep sets
    agree bit for bit. 4-byte inputs keep at most two pipeline stages: they double each stage's
    shared memory (the fp32 top-k dK/dV pass needed 232 KB at three, over sm_80's 163 KB)."""
    if kernel not in KERNELS:
        raise ValueError(f"internal: no launch policy for kernel {kernel!r}")
    forced = getattr(_OVERRIDE, "tiles", None)
    d = max(head_dim, v_dim)
    if forced is not None:
        cfg = Config(forced[0], forced[1], 4, 2)
    elif kernel == "forward" or not target.is_cuda or constraints.shared_tiles:
        cfg = _forward_table(target, d)
    else:
        cfg = _backward_table(target, d)[kernel == "dkdv"]
    if cfg.block_n < constraints.min_block_n:
        cfg = replace(cfg, block_n=constraints.min_block_n)
    if dtype.itemsize >= 4 and target.is_cuda:
        cfg = replace(cfg, num_stages=min(cfg.num_stages, 2))
    return cfg


def supported_tiles() -> tuple[tuple[int, int], ...]:
    """Every (BLOCK_M, BLOCK_N) the tables give, plus the small ones tests force."""
    tiles = {(16, 16), (16, 32)}
    for target in (INTERPRETER, Target("cuda", 80), Target("cuda", 90)):
        for d in (16, 64, 128, 256):
            for kernel in KERNELS:
                c = config_for(kernel, target, d, d, torch.bfloat16)
                tiles.add((c.block_m, c.block_n))
    return tuple(sorted(tiles))
