"""Quickstart: load a pattern, call it on random CPU tensors, look at the result.

    python examples/quickstart.py
"""
from pathlib import Path

import torch

import attnc

here = Path(__file__).resolve().parent

# A pattern from a file: StreamingLLM's sink tokens + causal sliding window.
streaming = attnc.load(here / "streaming.attn")
print(streaming)

B, H, N, D = 1, 4, 256, 64
q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
out, lse = streaming(q, k, v, window=64, sinks=4, backend="reference", return_lse=True)
print("output", tuple(out.shape), "mean", f"{out.mean():+.4f}", "lse[0, 0, :4]", lse[0, 0, :4].tolist())

# A pattern from source text, with a tensor argument (one ALiBi slope per head).
alibi = attnc.compile("""
pattern alibi:
    tensor slopes: float[heads]
    score -= slopes[h] * abs(q - k)
    mask q >= k
""")
slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
out = alibi(q, k, v, slopes=slopes, backend="reference")
print("alibi output", tuple(out.shape), "std", f"{out.std():.4f}")

# A pattern from the standard library.
causal = attnc.std("causal")
reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
print("std causal matches SDPA:", torch.allclose(causal(q, k, v), reference, atol=1e-5))

# Mistakes are reported against the spec, with a caret under the culprit.
try:
    attnc.compile("pattern oops:\n    mask q >= kk\n")
except attnc.SpecError as e:
    print(e)
