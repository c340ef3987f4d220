"""Launch policy, in one place: tile shapes, warps and pipeline stages for every kernel on every
target (Triton's interpreter, sm_80, sm_90), the supported dtypes and head dims.

The runtime, `runtime/aot.py`, the autotuner, the fuzzer, the benchmarks and the tests all ask
`config_for`. A kernel signature names the policy it launches with (`Signature.config`):
'forward' (the forward and the backward's top-k threshold, which must see the forward's tiles),
'dq' or 'dkdv'. `TABLE` holds, per GPU architecture and head-dim bucket, the shapes chosen from
the compiler's own statistics (`python bench/static.py --search`: memory path, registers,
spills, shared memory, MMA instructions; figures in bench/RESULTS.md); on a GPU,
`ATTNC_AUTOTUNE=1` times `candidates` instead (runtime/tune.py). A call may force them
(`kernel_options=`, `KernelOptions`): checked here against what each kernel allows.
"""
from __future__ import annotations

import contextlib
import functools
import json
import threading
from dataclasses import dataclass, replace

import torch

from ..dsl.diagnostics import closest
from ..lowering.signature import Constraints

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
KERNELS = ("forward", "dq", "dkdv")


@dataclass(frozen=True)
class Config:
    """How one kernel launches: its tile (BLOCK_M query rows x BLOCK_N keys), warps, stages;
    for the forward, `splits` forces its split-K count (0: `split_count` decides per call)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int = 0


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


# --------------------------------------------------------------------------- kernel options

#: the fields a call may force, per kernel or for all of them (`KernelOptions`)
OPTION_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")
#: what the forward kernel also takes: its split-K count
FORWARD_FIELDS = OPTION_FIELDS + ("splits",)
NUM_WARPS = (1, 2, 4, 8, 16)
#: Triton's largest tensor (`TRITON_MAX_TENSOR_NUMEL`): bounds a tile's elements
MAX_TILE_NUMEL = 1 << 20


@dataclass(frozen=True)
class KernelOptions:
    """The launch settings a call forces (``p(q, k, v, kernel_options={...})``).

    Either per kernel, ``{'forward': {...}, 'dq': {...}, 'dkdv': {...}}`` (any of them), or flat,
    ``{'block_m': 64, ...}``, which sets every kernel of the call. Each dict holds some of
    `OPTION_FIELDS`; a field left out takes the policy's value (`config_for`, not the
    autotuner's). `fields` holds, per kernel, the (field, value) pairs it sets, sorted; `flat`
    whether they were given flat (error messages name the key as written)."""

    fields: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]
    flat: bool = False

    @staticmethod
    def of(value) -> "KernelOptions | None":
        """Options from what a caller passed (a dict; None or {} for none). Raises ValueError
        naming the key for an unknown key (with a did-you-mean) or a value no kernel takes."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"kernel_options must be a dict, got {type(value).__name__}")
        if not value:
            return None
        flat = not any(key in KERNELS for key in value)
        if flat:
            settings = _option_fields(value, "kernel_options", KERNELS, FORWARD_FIELDS)
            return KernelOptions(tuple((k, tuple(f for f in settings if k == "forward"
                                                 or f[0] != "splits")) for k in KERNELS), True)
        per = []
        for key, sub in value.items():
            if key in FORWARD_FIELDS:
                named = ", ".join(repr(k) for k in value if k in KERNELS)
                raise ValueError(f"kernel_options mixes per-kernel dicts ({named}) with the flat "
                                 f"key {key!r}; put {key!r} inside each kernel's dict")
            if key not in KERNELS:
                raise ValueError(_unknown(key, "kernel_options", KERNELS + FORWARD_FIELDS))
            if not isinstance(sub, dict):
                raise ValueError(f"kernel_options[{key!r}] must be a dict of "
                                 f"{', '.join(OPTION_FIELDS)}, got {type(sub).__name__}")
            per.append((key, _option_fields(sub, f"kernel_options[{key!r}]", (),
                                            FORWARD_FIELDS if key == "forward" else OPTION_FIELDS)))
        return KernelOptions(tuple(sorted(per)))

    @property
    def text(self) -> str:
        """The canonical string form (the custom ops carry it; `parse` reads it back)."""
        if self.flat:
            return json.dumps(dict(self.fields[0][1]), sort_keys=True)
        return json.dumps({k: dict(f) for k, f in self.fields}, sort_keys=True)

    @staticmethod
    def parse(text: str) -> "KernelOptions | None":
        """Options from `text` ("" for none)."""
        return _parse(text) if text else None

    def given(self, kernel: str) -> dict[str, int] | None:
        """The fields forced for `kernel`, or None when it is not named."""
        for k, f in self.fields:
            if k == kernel:
                return dict(f)
        return None

    def where(self, kernel: str, field: str | None = None) -> str:
        """How the caller wrote the key (for messages)."""
        if self.flat:
            key = f"kernel_options[{field!r}]" if field else "kernel_options"
            return f"{key} (for the {kernel} kernel)"
        return f"kernel_options[{kernel!r}]" + (f"[{field!r}]" if field else "")


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> "KernelOptions | None":
    return KernelOptions.of(json.loads(text))


def _unknown(key, where: str, allowed) -> str:
    near = closest(key, allowed) if isinstance(key, str) else None
    return (f"unknown key {key!r} in {where}" + (f"; did you mean {near!r}?" if near else "") +
            f" (allowed: {', '.join(allowed)})")


def _option_fields(value: dict, where: str, also=(),
                   allowed=OPTION_FIELDS) -> tuple[tuple[str, int], ...]:
    """A kernel's fields (of `allowed`), each checked on its own (what no kernel would take);
    `also`: other keys that would have been allowed instead (suggested for an unknown one)."""
    out = []
    for key, x in value.items():
        if key not in allowed:
            if key == "splits":
                raise ValueError(f"{where}: 'splits' (split-K) is a setting of the forward "
                                 f"kernel; put it in kernel_options['forward']")
            raise ValueError(_unknown(key, where, allowed + tuple(also)))
        name = f"{where}[{key!r}]"
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"{name} must be an int, got {x!r}")
        if key in ("block_m", "block_n") and (x < 16 or x & (x - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (16, 32, 64, 128, ...), got {x}")
        if key == "num_warps" and x not in NUM_WARPS:
            raise ValueError(f"{name} must be one of {', '.join(map(str, NUM_WARPS))}, got {x}")
        if key == "num_stages" and x < 1:
            raise ValueError(f"{name} must be >= 1, got {x}")
        if key == "splits" and not 1 <= x <= MAX_SPLITS:
            raise ValueError(f"{name} must be in 1..{MAX_SPLITS}, got {x}")
        out.append((key, x))
    return tuple(sorted(out))


@functools.lru_cache(maxsize=256)
def forced_configs(options: KernelOptions, target: Target, head_dim: int, v_dim: int,
                   dtype: torch.dtype, constraints: Constraints = Constraints()) -> dict:
    """{kernel: the Config `options` force on it, or None where they leave it to the policy},
    checked against what each kernel allows on `target` at these head dims, dtype and module
    constraints: a key tile of at least `constraints.min_block_n`, one configuration for every
    pass where `constraints.shared_tiles`, tiles Triton can hold, and (on a GPU) the policy's
    shared-memory estimate within the target's limit. Raises ValueError naming the key."""
    out = {}
    for kernel in KERNELS:
        given = options.given(kernel)
        if given is None:
            out[kernel] = None
            continue
        cfg = replace(config_for(kernel, target, head_dim, v_dim, dtype, constraints), **given)
        if cfg.block_n < constraints.min_block_n:
            raise ValueError(
                f"{options.where(kernel, 'block_n')} must be >= {constraints.min_block_n} for this "
                f"call (a `select topk` keeps its threshold in one key tile), got {cfg.block_n}")
        d = _pow2(max(head_dim, v_dim))
        for rows, cols in ((cfg.block_m, cfg.block_n), (cfg.block_m, d), (cfg.block_n, d)):
            if rows * cols > MAX_TILE_NUMEL:
                raise ValueError(
                    f"{options.where(kernel)}: block_m={cfg.block_m}, "
                    f"block_n={cfg.block_n} at head dim {max(head_dim, v_dim)} make a "
                    f"{rows} x {cols} tile, more than the {MAX_TILE_NUMEL} elements Triton "
                    f"allows in one tensor; use a smaller tile")
        out[kernel] = cfg
    if constraints.shared_tiles:
        _check_shared_tiles(options, out, target, head_dim, v_dim, dtype, constraints)
    if target.is_cuda:
        limit = MAX_SHARED.get(target.capability or 80, MAX_SHARED[80])
        for kernel, cfg in out.items():
            used = 0 if cfg is None else shared_bytes(kernel, cfg, head_dim, v_dim, dtype.itemsize)
            if used > limit:
                key = options.where(kernel if options.given(kernel) else "forward")
                raise ValueError(
                    f"{key}: block_m={cfg.block_m}, block_n={cfg.block_n}, "
                    f"num_stages={cfg.num_stages} needs about {used // 1024} KB of shared memory "
                    f"in the {kernel} kernel at head dims {head_dim}/{v_dim} in "
                    f"{str(dtype).replace('torch.', '')}, "
                    f"more than the {limit // 1024} KB a block may use on sm_{target.capability}; "
                    f"use smaller tiles or fewer stages")
    return out


def _check_shared_tiles(options: KernelOptions, out: dict, target: Target, head_dim: int,
                        v_dim: int, dtype: torch.dtype, constraints: Constraints) -> None:
    """Where keep decisions read the score every pass launches with the forward's configuration
    (`config_for`): the backward's options must agree with it, and it must fit them all."""
    fwd = out["forward"] or config_for("forward", target, head_dim, v_dim, dtype, constraints)
    fwd = replace(fwd, splits=0)  # split-K is the forward's alone
    for kernel in ("dq", "dkdv"):
        if out[kernel] is not None and out[kernel] != fwd:
            raise ValueError(
                f"{options.where(kernel)} resolves to {_fields(out[kernel])} but this pattern's "
                f"keep decisions read the score, so dq and dkdv launch with the forward kernel's "
                f"configuration ({_fields(fwd)}); set only 'forward' (or give them the same "
                f"values)")
    if out["forward"] is not None:
        out["dq"] = out["dkdv"] = fwd


def _fields(cfg: Config) -> str:
    return ", ".join(f"{f}={getattr(cfg, f)}" for f in OPTION_FIELDS)


# ------------------------------------------------------------------ split-K (flash-decoding)

#: the most programs one row tile's key tiles are split over
MAX_SPLITS = 64
#: a split keeps at least this many key tiles (fewer: the merge's traffic outweighs the gain)
MIN_SPLIT_TILES = 4
#: split until about this many waves of programs fill the GPU
SPLIT_WAVES = 2


@functools.lru_cache(maxsize=None)
def multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(cfg: Config, target: Target, programs: int, key_tiles,
                device: torch.device | None = None) -> int:
    """How many programs share one row tile's key tiles (split-K, flash-decoding): what the
    call forces (`cfg.splits`), else 1 off the GPU or where `programs` (query tiles x batch x
    heads) already fill it, else enough for `SPLIT_WAVES` waves over its multiprocessors, at
    most one split per `MIN_SPLIT_TILES` of the key tiles a row tile visits (`key_tiles()`, an
    estimate: a window of 4K over 128K keys visits the window's tiles, not 128K's) and
    `MAX_SPLITS`."""
    if cfg.splits:
        return cfg.splits
    device = torch.device(device) if device is not None else None
    if not target.is_cuda or programs <= 0 or device is None or device.type != "cuda":
        return 1  # (runtime/aot.py compiles for a GPU with CPU tensors: unsplit)
    sms = multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    want = -(-SPLIT_WAVES * sms // programs)
    return max(1, min(want, key_tiles() // MIN_SPLIT_TILES, MAX_SPLITS))
