"""Neural-network modules: ``attnc.nn.PatternAttention``, an `nn.Module` that owns a pattern's
learnable tensors."""
from __future__ import annotations

import os

import torch
from torch import nn

from .api import load, std
from .runtime.pattern import Pattern

__all__ = ["PatternAttention"]


def _resolve(pattern) -> Pattern:
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, (str, os.PathLike)):
        text = os.fspath(pattern)
        return load(text) if text.endswith(".attn") or os.path.exists(text) else std(text)
    raise TypeError(f"pattern must be an attnc.Pattern, a .attn path or a stdlib name, got {type(pattern).__name__}")


class PatternAttention(nn.Module):
    """Attention with an attnc pattern; its float tensors are learnable parameters.

    ``PatternAttention("gaussian_mixture", side=8, alpha=torch.ones(4, 3), sigma=torch.full((4, 3), 2.0))``
    registers ``alpha`` and ``sigma`` as ``nn.Parameter``s (copies of the given values) unless
    listed in ``frozen=``, in which case they are buffers. Scalar parameters are fixed at
    construction; int/bool tensors (document ids, flags) and any argument may also be passed per
    call: ``module(q, k, v, doc=ids)``. The state dict holds the tensors by their pattern names.
    """

    def __init__(self, pattern, *, frozen: tuple[str, ...] = (), backend: str = "auto",
                 scale: float | None = None, **arguments):
        super().__init__()
        self.pattern = _resolve(pattern)
        self.backend, self.scale = backend, scale
        names = {t.name: t for t in self.pattern.tensors}
        self._scalars = {}
        for key, value in arguments.items():
            spec = names.get(key)
            if spec is None:
                self._scalars[key] = value  # checked (with suggestions) at call time
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"tensor argument `{key}` must be a torch.Tensor, got {type(value).__name__}")
            if spec.elem == "float" and key not in frozen:
                self.register_parameter(key, nn.Parameter(value.detach().clone()))
            else:
                self.register_buffer(key, value.detach().clone())
        unknown = set(frozen) - set(names)
        if unknown:
            raise ValueError(f"frozen= names unknown tensors: {', '.join(sorted(unknown))}")

    def forward(self, q, k, v, **call_arguments):
        args = dict(self._scalars)
        for t in self.pattern.tensors:
            if hasattr(self, t.name) and t.name not in call_arguments:
                args[t.name] = getattr(self, t.name)
        args.update(call_arguments)
        return self.pattern(q, k, v, scale=self.scale, backend=self.backend, **args)

    def extra_repr(self) -> str:
        scalars = ", ".join(f"{k}={v!r}" for k, v in self._scalars.items())
        return f"{self.pattern.name}" + (f", {scalars}" if scalars else "")
