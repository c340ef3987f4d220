"""Sample arguments for calling patterns: the values tests, the fuzzer, the CLI and the benchmarks
share.

- `ARGUMENTS`: parameter values, per pattern name, for the standard library's and the examples'
  patterns at small test sizes (lengths up to about 128), where a default is missing or too large;
- `random_tensor_arguments`: plausible random values for a pattern's tensor arguments;
- `sample_arguments`: both together, everything a call needs besides q, k and v.

The brute-force oracles (the dense mask and the exact tile classes) are in `maskview`.
"""
from __future__ import annotations

import torch

from ..lowering.ir import PatternIR
from .binding import tensor_shapes

#: parameter values for the stdlib and example patterns, sized for q_len, k_len <= 128: windows,
#: chunks and strides a few tiles of 16 or 32 wide, 10 x 10 grids, top-k narrower than a tile
#: row, a soft cap low enough that tanh bends
ARGUMENTS: dict[str, dict[str, object]] = {
    "alibi_2d": dict(width=10),
    "gaussian_mixture": dict(width=10, n=2),
    "gaussian_mixture_additive": dict(width=10, n=2),
    "neighborhood_2d": dict(height=10, width=10, kernel=3),
    "prefix_lm": dict(prefix=20),
    "sliding_window": dict(window=24),
    "streaming": dict(window=24, sinks=3),
    "chunked": dict(chunk=24),
    "dilated": dict(window=12, dilation=3),
    "strided": dict(stride=16),
    "strided_fixed": dict(stride=16, summary=4),
    "longformer": dict(window=16),
    "relative_bias": dict(max_distance=16),
    "topk": dict(top=7),
    "temperature": dict(tau=0.7),
    "softcap": dict(cap=2.0),
    "sharp_topk": dict(top=5),
    "causal_window": dict(window=20),
    "dilated_causal": dict(window=10, dilation=2),
}


def pattern_parameters(ir: PatternIR) -> dict[str, object]:
    """The `ARGUMENTS` entry of the pattern's name, restricted to parameters the pattern has."""
    return {n: v for n, v in ARGUMENTS.get(ir.name, {}).items() if ir.param(n) is not None}


def random_tensor_arguments(ir: PatternIR, sizes: dict[str, int], params: dict, *,
                            generator: torch.Generator | None = None,
                            device: str | torch.device = "cpu",
                            documents: float = 4.0) -> dict[str, torch.Tensor]:
    """Plausible random values for the pattern's tensor arguments.

    - int tensors look like packed-document ids: along the last dimension they start at 0 and
      step up by one at random boundaries (about `documents` documents per row);
    - bool tensors are random flags (about one in four true, e.g. global tokens);
    - float tensors hold small positive values in [0.1, 1) (slopes, widths, per-head scales).
    """
    out = {}
    for name, shape in tensor_shapes(ir, sizes, params).items():
        elem = ir.tensor(name).elem
        if any(s < 0 for s in shape):
            raise ValueError(f"tensor `{name}` would have a negative shape {shape}")
        if elem == "int":
            last = shape[-1] if shape else 1
            p = min(0.5, documents / max(last, 1))
            steps = torch.rand(shape, generator=generator) < p
            if shape and last > 0:
                steps[..., 0] = False
            value = torch.cumsum(steps.to(torch.int64), dim=-1) if shape else steps.to(torch.int64)
        elif elem == "bool":
            value = torch.rand(shape, generator=generator) < 0.25
        else:
            value = 0.1 + 0.9 * torch.rand(shape, generator=generator)
        out[name] = value.to(device)
    return out


def sample_arguments(ir: PatternIR, sizes: dict[str, int], overrides: dict | None = None, *,
                     seed: int = 0, device: str | torch.device = "cpu") -> dict[str, object]:
    """Arguments for a call of `ir` at `sizes`: the pattern's `ARGUMENTS` entry with `overrides`
    on top, and random tensor arguments (from `seed`) shaped for those values."""
    params = dict(pattern_parameters(ir), **(overrides or {}))
    values = {p.name: params.get(p.name, p.default) for p in ir.params}
    tensors = random_tensor_arguments(ir, sizes, values, generator=torch.Generator().manual_seed(seed),
                                      device=device)
    return {**params, **{n: t for n, t in tensors.items() if n not in params}}
