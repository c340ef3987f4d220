"""The public entry points: load a `.attn` file, compile source text, take a stdlib pattern."""
from __future__ import annotations

import functools
import os

from .dsl import config
from .dsl.diagnostics import SpecError
from .dsl.loader import stdlib_names, stdlib_source
from .runtime.binding import ArgumentError
from .runtime.pattern import Pattern


def _user_facing(fn):
    """No raw lark/torch/Python traceback reaches a user unless ATTNC_DEBUG=1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SpecError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError, TypeError):
            raise
        except Exception as e:  # an internal error: report it as one, keep the chain for debugging
            if config.debug():
                raise
            raise SpecError(None, f"internal error in attnc: {type(e).__name__}: {e}",
                            "this is a bug in attnc; set ATTNC_DEBUG=1 to see the traceback") from None
    return wrapper


@_user_facing
def compile(source: str, name: str | None = None, path: str = "<string>") -> Pattern:
    """Parse, check and lower a pattern from source text."""
    return Pattern.from_source(source, name, path)


@_user_facing
def load(path: str | os.PathLike, name: str | None = None) -> Pattern:
    """Load a pattern from a `.attn` file (`name=` picks one when the file has several)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return compile(text, name, path)


@_user_facing
def std(name: str) -> Pattern:
    """A pattern from the standard library, e.g. ``attnc.std("sliding_window")``."""
    file = name.split(".")[0]
    return compile(stdlib_source(file), name.split(".")[1] if "." in name else file, f"<std>/{file}.attn")


def std_names() -> list[str]:
    """Names of the standard-library pattern files."""
    return stdlib_names()


@_user_facing
def kernel_options_for(pattern: Pattern, q, k, v, **arguments) -> dict:
    """The launch settings attnc chooses for the call ``pattern(q, k, v, **arguments)``:
    ``{'forward': {...}, 'dq': {...}, 'dkdv': {...}}``, each with block_m, block_n, num_warps
    and num_stages. Pass it back as ``pattern(q, k, v, kernel_options=..., **arguments)`` to pin
    the same kernels (benchmarks, bug reports). Takes the call's own keywords (scale=,
    backend=, kernel_options= to see what partial options resolve to)."""
    if not isinstance(pattern, Pattern):
        raise ValueError(f"kernel_options_for: `pattern` must be an attnc.Pattern, got "
                         f"{type(pattern).__name__}")
    return pattern.kernel_options_for(q, k, v, **arguments)
