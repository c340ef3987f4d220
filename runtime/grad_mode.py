"""Autograd recorded inside a custom op's implementation, which torch runs below autograd."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def autograd_inside_op():
    """Record autograd inside a custom op's implementation (a no-op outside one)."""
    keys = torch._C.DispatchKey
    with torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False), \
            torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False), torch.enable_grad():
        yield
