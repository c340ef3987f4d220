"""Launch policy, in one place: tile shapes, warps and pipeline stages for every kernel on every
target (Triton's interpreter, sm_80, sm_90), the supported dtypes and head dims.

The runtime, `runtime/aot.py`, the autotuner, the fuzzer, the benchmarks and the tests all ask
`config_for`. A kernel signature names the policy it launches with (`Signature.config`):
'forward' (the forward and the backward's top-k threshold, which must see the forward's tiles),
'dq' or 'dkdv'. `TABLE` holds, per GPU architecture and head-dim bucket, the shapes chosen from
the compiler's own statistics (`python bench/static.py --search`: memory path, registers,
spills, shared memory, MMA instructions; figures in bench/RESULTS.md); on a GPU,
`ATTNC_AUTOTUNE=1` times `candidates` instead (runtime/tune.py).
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
def override(configs: dict[str, Config]):
    """Force the configuration of some kernels ('forward', 'dq', 'dkdv') in this thread (the
    static search of bench/static.py; tests)."""
    old = getattr(_OVERRIDE, "configs", None)
    _OVERRIDE.configs = dict(old or {}, **configs)
    try:
        yield
    finally:
        _OVERRIDE.configs = old


@contextlib.contextmanager
def tile_override(block_m: int, block_n: int):
    """Force the tile shape of every kernel in this thread (tests use small tiles under the
    interpreter, the fuzzer draws them)."""
    with override({k: Config(block_m, block_n, 4, 2) for k in KERNELS}):
        yield


#: the largest shared memory one block may use (opt-in), in bytes, by compute capability
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def arch(target: Target) -> int:
    """The table a GPU takes: 90 (Hopper: wgmma, 227 KB of shared memory per block), 80 (A100
    class: mma.sync, 163 KB) or 86 (consumer Ampere and Ada: 99 KB, 80's shapes with fewer
    stages)."""
    cap = target.capability or 80
    if cap >= 90:
        return 90
    return 86 if MAX_SHARED.get(cap, 0) < MAX_SHARED[80] else 80


#: (kernel, arch, head-dim bucket) -> configuration for 16-bit inputs. Chosen with `python
#: bench/static.py --search` (Triton 3.9; bench/RESULTS.md has the tables) over the benchmark
#: patterns, the heaviest deciding (the Gaussian mixture's dQ accumulates two tensor
#: gradients, its dK/dV recomputes three exponentials per element): no register spill, then
#: the largest tile, then the most stages, then the longer key tile (dK/dV re-reads Q and dO
#: once per key tile). At D = 256 no candidate is spill-free for dK/dV (nor on sm_80 for any
#: kernel): the one with the fewest spills is listed.
TABLE = {
    ("forward", 90, 64): Config(128, 64, 8, 3),
    ("forward", 90, 128): Config(128, 64, 8, 3),
    ("forward", 90, 256): Config(128, 64, 8, 2),
    ("dq", 90, 64): Config(128, 32, 8, 3),
    ("dq", 90, 128): Config(128, 32, 8, 3),
    ("dq", 90, 256): Config(128, 32, 8, 2),
    ("dkdv", 90, 64): Config(32, 128, 8, 3),
    ("dkdv", 90, 128): Config(16, 128, 8, 2),
    ("dkdv", 90, 256): Config(16, 32, 4, 2),
    ("forward", 80, 64): Config(128, 64, 8, 3),
    ("forward", 80, 128): Config(128, 64, 8, 3),
    ("forward", 80, 256): Config(64, 32, 8, 2),
    ("dq", 80, 64): Config(128, 32, 8, 3),
    ("dq", 80, 128): Config(32, 64, 8, 3),
    ("dq", 80, 256): Config(32, 32, 4, 2),
    ("dkdv", 80, 64): Config(32, 128, 8, 2),
    ("dkdv", 80, 128): Config(32, 64, 8, 3),
    ("dkdv", 80, 256): Config(16, 64, 8, 2),
    # modules whose keep decisions read the score: one configuration for every pass (see
    # `config_for`); the dK/dV pass then also forms the forward's dot for its decisions, and
    # spills where a key-major pass of its own tiles would not (bench/RESULTS.md)
    ("shared", 90, 64): Config(64, 64, 8, 2),
    ("shared", 90, 128): Config(64, 64, 8, 2),
    ("shared", 90, 256): Config(64, 32, 4, 2),
    ("shared", 80, 64): Config(64, 64, 4, 2),
    ("shared", 80, 128): Config(64, 32, 4, 2),
    ("shared", 80, 256): Config(32, 32, 4, 2),
}
#: the interpreter: small tiles (it is slow), one stage (nothing to pipeline)
INTERPRETER_CONFIG = Config(32, 32, 4, 1)
#: what the autotuner (runtime/tune.py) and `bench/static.py --search` try besides the table's
CANDIDATES = {
    "forward": (Config(128, 64, 8, 3), Config(128, 64, 8, 2), Config(128, 128, 8, 2),
                Config(64, 64, 4, 3), Config(128, 32, 8, 3), Config(64, 128, 4, 2),
                Config(64, 32, 4, 2)),
    "dq": (Config(128, 32, 8, 3), Config(128, 64, 8, 2), Config(64, 64, 4, 3),
           Config(64, 32, 4, 3), Config(128, 64, 8, 3), Config(64, 64, 8, 3), Config(64, 32, 8, 2)),
    "dkdv": (Config(32, 128, 8, 3), Config(16, 128, 8, 3), Config(32, 64, 8, 3),
             Config(32, 128, 8, 2), Config(16, 128, 8, 2), Config(64, 64, 8, 2),
             Config(16, 64, 8, 2)),
}


def _bucket(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def _pow2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def shared_bytes(kernel: str, cfg: Config, head_dim: int, v_dim: int, itemsize: int) -> int:
    """An estimate of the shared memory a configuration allocates: the tiles loaded once per
    program, plus one copy per pipeline stage of the tiles its loop streams (within 1 KB of what
    Triton allocated for the benchmark patterns)."""
    d, dv = _pow2(head_dim), _pow2(v_dim)
    if kernel == "forward":  # Q once; K and V per stage
        fixed, stage = cfg.block_m * d, cfg.block_n * (d + dv)
    elif kernel == "dq":  # Q and dO once; K and V per stage
        fixed, stage = cfg.block_m * (d + dv), cfg.block_n * (d + dv)
    else:  # K and V once; Q and dO per stage
        fixed, stage = cfg.block_n * (d + dv), cfg.block_m * (d + dv)
    return (fixed + max(1, cfg.num_stages) * stage) * itemsize


def fits(kernel: str, cfg: Config, target: Target, head_dim: int, v_dim: int,
         dtype: torch.dtype) -> bool:
    limit = MAX_SHARED.get(target.capability or 80, MAX_SHARED[80])
    return shared_bytes(kernel, cfg, head_dim, v_dim, dtype.itemsize) <= limit


def _table(row: str, target: Target, head_dim: int, v_dim: int, dtype: torch.dtype) -> Config:
    a = arch(target)
    cfg = TABLE[(row, 90 if a == 90 else 80, _bucket(max(head_dim, v_dim)))]
    kernels = KERNELS if row == "shared" else (row,)  # a shared configuration serves them all
    if dtype.itemsize >= 4:
        # 4-byte tiles double each stage's shared memory (the fp32 top-k dK/dV pass needed
        # 232 KB at three stages, over sm_80's 163 KB)
        cfg = replace(cfg, num_stages=min(cfg.num_stages, 2))
    while not all(fits(k, cfg, target, head_dim, v_dim, dtype) for k in kernels):
        # fewer stages, then smaller tiles
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_n > 16:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.block_m > 16:
            cfg = replace(cfg, block_m=cfg.block_m // 2)
        elif cfg.num_stages > 1:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        else:
            break
    return cfg


def config_for(kernel: str, target: Target, head_dim: int, v_dim: int, dtype: torch.dtype,
               constraints: Constraints = Constraints()) -> Config:
    """The configuration of `kernel` ('forward', 'dq' or 'dkdv') for this target, head dims,
    input dtype and module constraints.

    Where a keep decision reads the score (`constraints.shared_tiles`), every pass uses the
    forward's configuration, so each score is formed by the same dot as in the forward and the
    keep sets agree bit for bit. A top-k's threshold buffer sets the smallest key tile."""
    if kernel not in KERNELS:
        raise ValueError(f"internal: no launch policy for kernel {kernel!r}")
    if constraints.shared_tiles:
        kernel = "forward"
    forced = (getattr(_OVERRIDE, "configs", None) or {}).get(kernel)
    if forced is not None:
        cfg = forced
    elif not target.is_cuda:
        cfg = INTERPRETER_CONFIG
    else:
        cfg = _table("shared" if constraints.shared_tiles else kernel, target, head_dim, v_dim,
                     dtype)
    if cfg.block_n < constraints.min_block_n:
        cfg = replace(cfg, block_n=constraints.min_block_n)
    return cfg


def candidates(kernel: str, target: Target, head_dim: int, v_dim: int, dtype: torch.dtype,
               constraints: Constraints = Constraints()) -> list[Config]:
    """The configurations the autotuner times: the table's first, then `CANDIDATES` that fit
    the target's shared memory and the module's constraints."""
    base = config_for(kernel, target, head_dim, v_dim, dtype, constraints)
    out = [base]
    for cfg in CANDIDATES["forward" if constraints.shared_tiles else kernel]:
        if dtype.itemsize >= 4:
            cfg = replace(cfg, num_stages=min(cfg.num_stages, 2))
        kernels = KERNELS if constraints.shared_tiles else (kernel,)
        if cfg.block_n >= constraints.min_block_n and cfg not in out and \
                all(fits(k, cfg, target, head_dim, v_dim, dtype) for k in kernels):
            out.append(cfg)
    return out


def supported_tiles() -> tuple[tuple[int, int], ...]:
    """Every (BLOCK_M, BLOCK_N) the tables or the autotuner may launch with, plus the small ones
    tests force."""
    tiles = {(16, 16), (16, 32)} | {(c.block_m, c.block_n) for cs in CANDIDATES.values() for c in cs}
    for target in (INTERPRETER, Target("cuda", 80), Target("cuda", 90)):
        for d in (16, 64, 128, 256):
            for kernel in KERNELS:
                c = config_for(kernel, target, d, d, torch.bfloat16)
                tiles.add((c.block_m, c.block_n))
    return tuple(sorted(tiles))
