"""The autotuner: on a GPU, time a few launch configurations of a kernel and keep the fastest.

Off by default; `ATTNC_AUTOTUNE=1` turns it on (CUDA targets only: the interpreter has nothing to
time). The first call of a pattern's kernel with given head dims and dtype on a device runs each
candidate of `policy.candidates` on scratch copies of the call's outputs (so the call itself is
not disturbed, and atomically accumulated gradients are not doubled), with Triton's `do_bench`,
and keeps the fastest. Results are keyed by (pattern digest and specialization, kernel role,
head dims, dtype, device name, attnc and Triton versions) and stored as JSON next to the kernel
cache (`$ATTNC_CACHE_DIR/tuning.json`), so a second process does not tune again.

A module whose keep decisions read the score (`Constraints.shared_tiles`) tunes only its forward
configuration; its backward passes use that one, as the policy requires. A configuration the
call forces (`kernel_options=`) is launched as given and never tuned.
"""
from __future__ import annotations

import json
import os
import threading
import warnings

import torch

from ..dsl import config
from ..lowering.signature import Constraints
from .jit import Compiled
from .launch import Call, launch
from .policy import OPTION_FIELDS, Config, Target, candidates, config_for

_LOCK = threading.Lock()
FILE = "tuning.json"


def _path() -> str:
    return os.path.join(config.cache_dir(), FILE)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def tuning_key(pattern_key: str, role: str, head_dim: int, v_dim: int, dtype: torch.dtype,
               device_name: str) -> str:
    import triton
    return (f"{pattern_key}|{role}|d={head_dim}|dv={v_dim}|{str(dtype).replace('torch.', '')}|"
            f"{device_name}|attnc {config.VERSION}|triton {triton.__version__}")


class Tuner:
    """Chooses and remembers configurations. `bench(fn) -> milliseconds` times a callable
    (Triton's `do_bench` by default; tests pass a fake)."""

    def __init__(self, bench=None, path: str | None = None):
        self.bench = bench
        self.path = path
        self.memory: dict[str, Config] | None = None

    def _file(self) -> str:
        return self.path or _path()

    def _load(self) -> dict[str, Config]:
        if self.memory is None:
            self.memory = {}
            try:
                with open(self._file(), encoding="utf-8") as f:
                    stored = json.load(f)
                self.memory = {k: Config(**v) for k, v in stored.items()}
            except (OSError, ValueError, TypeError):
                pass  # no file yet, or one this version cannot read: tune again
        return self.memory

    def _save(self) -> None:
        path = self._file()
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({k: {f: getattr(v, f) for f in OPTION_FIELDS}  # tiles, warps, stages
                           for k, v in sorted(self.memory.items())}, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:  # the choices stay in memory for this process
            warnings.warn(f"attnc could not save tuned configurations to {path} ({e.strerror or e});"
                          f" set ATTNC_CACHE_DIR to a writable directory to keep them", stacklevel=2)

    def known(self, key: str) -> Config | None:
        with _LOCK:
            return self._load().get(key)

    def choose(self, key: str, candidates: list[Config], run) -> Config:
        """The fastest of `candidates` by `run(config)` (which launches the kernel once; a
        candidate that fails to compile or launch, e.g. out of shared memory, is skipped),
        remembered under `key`."""
        with _LOCK:
            hit = self._load().get(key)
            if hit is not None:
                return hit
            bench = self.bench or _do_bench
            best, best_ms = None, float("inf")
            for cfg in candidates:
                try:
                    run(cfg)  # compile outside the timing
                    ms = bench(lambda: run(cfg))
                except Exception as e:  # noqa: BLE001 — a candidate the device refuses
                    if "resource" not in str(e).lower() and "shared memory" not in str(e).lower():
                        raise
                    continue
                if ms < best_ms:
                    best, best_ms = cfg, ms
            if best is None:
                raise RuntimeError(f"attnc autotuning: no candidate configuration ran ({key})")
            self.memory[key] = best
            self._save()
            return best


def _do_bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=20)


TUNER = Tuner()


def enabled(target: Target) -> bool:
    return target.is_cuda and config.autotune()


#: the roles of call tensors a kernel writes (tuning runs get scratch copies of these)
OUTPUTS = ("out", "lse", "kth", "dq", "dk", "dv")


def chosen(pattern_key: str, kernel: str, target: Target, head_dim: int, v_dim: int,
           dtype: torch.dtype, device: torch.device, constraints: Constraints,
           tuner: Tuner | None = None) -> Config | None:
    """What `configure` gives `kernel` ('forward', 'dq', 'dkdv') of a pattern's module when
    the call forces nothing, as far as it is known without launching: the policy's table, or
    with autotuning on the remembered choice (None while the tuner has not chosen)."""
    base = config_for(kernel, target, head_dim, v_dim, dtype, constraints)
    if not enabled(target):
        return base
    role = "forward" if constraints.shared_tiles else kernel
    key = tuning_key(pattern_key, role, head_dim, v_dim, dtype, _device_name(device))
    return (tuner or TUNER).known(key)


def configure(compiled: Compiled, name: str, target: Target, call: Call, layout_for,
              tuner: Tuner = TUNER, forced: Config | None = None, **facts) -> Config:
    """The launch configuration of kernel `name` for this call: `forced` (the call's
    `kernel_options`, already checked), else the policy's table, or with autotuning on
    (`enabled`) a remembered or freshly tuned one. `layout_for(config)` gives the block layout
    a configuration's tiles need (None when the kernel reads none); `facts` are the call's
    constexprs (see `launch.launch`).

    The top-k threshold kernel and the passes of a module whose keep decisions read the score
    take the forward's configuration (tuned by the forward); deterministic tensor gradients
    ([programs, numel] buffers sized by the grid of `chosen`'s configuration, see
    `backward.backward_launches`) are not tuned."""
    if forced is not None:
        return forced
    kernel = compiled.kernel
    sig = kernel.signature(name)
    q, v = call.tensors["q"], call.tensors["v"]
    known = chosen(kernel.pattern_key, sig.config, target, q.shape[3], v.shape[3], q.dtype,
                   q.device, kernel.constraints, tuner)
    if known is not None:
        return known
    base = config_for(sig.config, target, q.shape[3], v.shape[3], q.dtype, kernel.constraints)
    role = "forward" if kernel.constraints.shared_tiles else sig.config
    if (role == "forward" and name != "attn_fwd") or facts.get("DETERMINISTIC"):
        return base
    key = tuning_key(kernel.pattern_key, role, q.shape[3], v.shape[3], q.dtype,
                     _device_name(q.device))

    def run(cfg: Config) -> None:
        scratch = Call({r: (torch.empty_like(t) if r in OUTPUTS and t is not None else t)
                        for r, t in call.tensors.items()}, call.sizes, call.scale, call.bound,
                       {n: torch.zeros_like(g) for n, g in call.grads.items()})
        L = launch(compiled, name, scratch, cfg, target, layout_for(cfg), **facts)
        L.fn[L.grid](*L.args, **L.meta)

    return tuner.choose(key, candidates(role, target, q.shape[3], v.shape[3], q.dtype,
                                        kernel.constraints), run)
