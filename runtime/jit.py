"""The JIT: generate a kernel module on first use, cache it in memory and on disk, import it.

Modules are content-addressed: the file name is a hash of the generated text (which spells out
the canonical IR, the specialization and the skeleton) together with the attnc and Triton
versions. They live in `$ATTNC_CACHE_DIR` (default `~/.cache/attnc`), are written atomically
(a temporary file in the same directory, then `os.replace`), and are imported from the file with
importlib, since Triton reads a kernel's source from its file. Several threads share one lock;
several processes may race to write the same file, and either complete copy is the same text.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from types import ModuleType

from ..dsl import config
from ..lowering.emit import Kernel, emit_forward
from ..lowering.ir import PatternIR

_LOCK = threading.Lock()
_MEMORY: dict[tuple, "Compiled"] = {}


@dataclass
class Stats:
    """Counters for tests and debugging: `generated` counts modules emitted in this process."""

    generated: int = 0
    disk_hits: int = 0
    memory_hits: int = 0


STATS = Stats()


@dataclass(frozen=True)
class Compiled:
    kernel: Kernel
    module: ModuleType
    path: str


def cache_dir() -> str:
    """The kernel cache directory (`config.cache_dir()`), created on demand."""
    d = config.cache_dir()
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise _unwritable(d, e) from None
    return d


def _unwritable(directory: str, e: OSError) -> OSError:
    return type(e)(f"attnc cannot write generated kernels to its cache directory {directory} "
                   f"({e.strerror or e}); set ATTNC_CACHE_DIR to a writable directory")


def versions() -> str:
    import triton
    return f"attnc {config.VERSION} / triton {triton.__version__}"


def module_key(source: str) -> str:
    h = hashlib.sha256()
    h.update(versions().encode())
    h.update(b"\0")
    h.update(source.encode())
    return h.hexdigest()[:40]


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".py", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _import(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton resolves a kernel's globals through its module
    spec.loader.exec_module(module)
    return module


def load_source(source: str) -> tuple[ModuleType, str]:
    """Write (if absent) and import the module whose text is `source`; returns (module, path)."""
    key = module_key(source)
    path = os.path.join(cache_dir(), f"attnc_{key}.py")
    existing = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            existing = f.read()
    if existing == source:
        STATS.disk_hits += 1
    else:  # absent, or torn by a crash of an older writer: (re)write it whole
        try:
            _write_atomic(path, source)
        except OSError as e:
            raise _unwritable(os.path.dirname(path), e) from None
    return _import(path, f"attnc_generated_{key}"), path


def forward_kernel(ir: PatternIR, specialization: dict[str, object], wide: bool = False,
                   positions: bool = False) -> Compiled:
    """The compiled forward module for `ir` specialized on its int/bool parameters (`wide`: with
    int64 index arithmetic; `positions`: for calls with positions)."""
    key = ("forward", ir, ir.path, tuple(sorted(specialization.items())), wide, positions)
    return _cached(key, lambda: emit_forward(ir, specialization, wide, positions))


def backward_kernel(ir: PatternIR, specialization: dict[str, object], wrt: tuple[str, ...] = (),
                    wide: bool = False, positions: bool = False) -> Compiled:
    """The compiled backward module (dQ, dK, dV and the gradients of the float tensor arguments
    named in `wrt`) for `ir` specialized on its int/bool parameters."""
    from ..lowering.emit_backward import emit_backward
    wrt = tuple(sorted(wrt))
    key = ("backward", ir, ir.path, tuple(sorted(specialization.items())), wrt, wide, positions)
    return _cached(key, lambda: emit_backward(ir, specialization, wrt, wide, positions))


def _cached(key: tuple, emit) -> Compiled:
    """The module for `key` from memory, else `emit()`ed, written (or found) on disk and imported."""
    with _LOCK:
        hit = _MEMORY.get(key)
        if hit is not None:
            STATS.memory_hits += 1
            return hit
        kernel = emit()
        module, path = load_source(kernel.source)
        STATS.generated += 1
        compiled = Compiled(kernel, module, path)
        _MEMORY[key] = compiled
        return compiled


#: bumped whenever loaded modules are forgotten, so caches of prepared launches built on them
#: (dispatch's templates) know to rebuild
GENERATION = 0


def clear_memory_cache() -> None:
    """Forget loaded modules (the disk cache stays); for tests of the on-disk path."""
    global GENERATION
    with _LOCK:
        _MEMORY.clear()
        GENERATION += 1
