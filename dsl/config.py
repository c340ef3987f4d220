"""Configuration: the version and every environment variable attnc reads, in one place.

It sits in the lowest layer (`dsl/`) so that every layer may ask it; nothing else in attnc reads
`os.environ`. Values are read when asked, not at import, so a test (or a user) that sets a
variable before the first call is obeyed, as Triton obeys `TRITON_INTERPRET` when it is set
before a kernel is defined. The README lists the variables.

| variable | effect |
|---|---|
| `ATTNC_DEBUG=1` | internal tracebacks instead of one-line internal errors |
| `ATTNC_CACHE_DIR` | the kernel cache directory (default `~/.cache/attnc`) |
| `ATTNC_AUTOTUNE=1` | on a GPU, time a few launch configurations per kernel on first use and keep the fastest (runtime/tune.py) |
| `TRITON_INTERPRET=1` | generated kernels run under Triton's interpreter (CPU tensors) |

Internal, not for users (so not in the README): `ATTNC_FUZZ_CHILD=1` marks the process that
`attnc fuzz` starts again under Triton's interpreter (`fuzz_child_environment`), so that the
child, should the interpreter not work there either, reports it instead of starting another.
"""
from __future__ import annotations

import os

#: attnc's version (also `attnc.__version__`); part of every kernel cache key
VERSION = "0.1.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def debug() -> bool:
    """`ATTNC_DEBUG=1`: show internal tracebacks instead of hiding them behind a SpecError."""
    return _flag("ATTNC_DEBUG")


def cache_dir() -> str:
    """`$ATTNC_CACHE_DIR`, else `~/.cache/attnc` (not created here)."""
    return os.environ.get("ATTNC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "attnc")


def autotune() -> bool:
    """`ATTNC_AUTOTUNE=1`: on a GPU, tune launch configurations on first use (runtime/tune.py)."""
    return _flag("ATTNC_AUTOTUNE")


def interpreted() -> bool:
    """`TRITON_INTERPRET=1`: Triton runs kernels on the CPU with its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fuzz_child() -> bool:
    """`ATTNC_FUZZ_CHILD=1` (internal): this process is `attnc fuzz` run again under Triton's
    interpreter by `attnc fuzz` itself."""
    return _flag("ATTNC_FUZZ_CHILD")


def fuzz_child_environment() -> dict[str, str]:
    """The environment `attnc fuzz` runs itself again in: this process's, with
    `TRITON_INTERPRET=1` and the internal marker `ATTNC_FUZZ_CHILD=1`."""
    return dict(os.environ, TRITON_INTERPRET="1", ATTNC_FUZZ_CHILD="1")
