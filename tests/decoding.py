"""What the decoding tests share (test_positions, test_split_k, test_gqa_packing, test_paged):
the device, the marker of tests that run generated kernels, and random q, k, v."""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: tests that run generated kernels: under Triton's interpreter or on a GPU
needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def qkv(B, H, Hkv, Lq, Lk, dtype=torch.float32, seed=0, head_dim=16, device=DEVICE):
    """Random q [B, H, Lq, D], k and v [B, Hkv, Lk, D] (on DEVICE unless told)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, head_dim, generator=gen).to(device, dtype)
            for h, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk))]
