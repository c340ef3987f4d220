"""Where generated kernels can run: on a GPU, or under Triton's interpreter, which must be on
before attnc is imported; without either, `attnc fuzz` runs itself again in a child process
that has it from the start."""
from __future__ import annotations

import subprocess
import sys

import torch

from ...dsl import config
from ..pattern import Pattern

_READY: list = []


def kernel_backend_ready() -> bool:
    """Whether generated kernels can run in this process: on a GPU, or under Triton's interpreter.

    The interpreter must be switched on (TRITON_INTERPRET=1) before attnc is imported; a tiny
    probe kernel tells whether that happened."""
    if not _READY:
        if torch.cuda.is_available():
            _READY.append(True)
        elif not config.interpreted():
            _READY.append(False)
        else:
            probe = Pattern.from_source("pattern probe:\n    mask q >= k\n")
            x = torch.zeros(1, 1, 1, 16)
            try:
                probe(x, x, x, backend="triton")
                _READY.append(True)
            except Exception as e:  # noqa: BLE001
                # switched on too late; any other error is the backend's, for the fuzzer to report
                _READY.append("outside of the scope of a kernel" not in str(e))
    return _READY[0]


def reexec_with_interpreter(argv) -> int:
    """Run this command again in a fresh process with TRITON_INTERPRET=1 set from the start."""
    return subprocess.call([sys.executable, "-m", "attnc.runtime.fuzz", *argv],
                           env=config.fuzz_child_environment())
