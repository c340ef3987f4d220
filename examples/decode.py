"""Generation with a KV cache: prefill a prompt, then decode one token per step, with the
StreamingLLM pattern (a causal window that keeps the first tokens visible).

Each sequence of the batch has its own length. The cache is allocated once; every step writes
the new token's key and value at position `lens[b]`, then attends with the new query placed at
that position (`q_start=lens`) over the first `lens + 1` cached keys (`k_lens=`). The pattern is
the one a full-sequence call uses: nothing about decoding is written in it. At the end, every
generated row is checked against one call over the whole sequences.

Runs on the CPU (reference interpreter) in seconds; on a GPU the same calls run the generated
kernels. `python examples/decode.py`
"""
from __future__ import annotations

import torch

import attnc


def generate(batch=2, heads=8, kv_heads=2, head_dim=32, prompt=(40, 23), steps=12, device="cpu",
             backend="auto", seed=0):
    """Prefill and decode with random projections; returns (the decoded rows' outputs
    [batch, heads, steps, head_dim], those of one call over the full sequences)."""
    gen = torch.Generator().manual_seed(seed)
    p = attnc.std("streaming")
    window = {"window": 16, "sinks": 4, "backend": backend}
    max_len = max(prompt) + steps
    # the whole sequences' queries, keys and values (a model would produce them step by step)
    q_all = torch.randn(batch, heads, max_len, head_dim, generator=gen).to(device)
    k_all = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen).to(device)
    v_all = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen).to(device)

    k_cache = torch.zeros(batch, kv_heads, max_len, head_dim, device=device)
    v_cache = torch.zeros_like(k_cache)
    lens = torch.tensor(prompt, device=device)

    # prefill: each prompt into the cache, its queries placed at 0 (rows past a prompt are unused)
    for b, n in enumerate(prompt):
        k_cache[b, :, :n], v_cache[b, :, :n] = k_all[b, :, :n], v_all[b, :, :n]
    q_prompt = q_all[:, :, :max(prompt)]
    p(q_prompt, k_cache, v_cache, q_start=0, k_lens=lens, **window)

    # decode: one query per sequence and step
    rows, want = [], []
    batch_idx = torch.arange(batch, device=device)
    for _ in range(steps):
        q = q_all[batch_idx, :, lens].unsqueeze(2)                  # [batch, heads, 1, head_dim]
        k_cache[batch_idx, :, lens] = k_all[batch_idx, :, lens]     # append the new key/value
        v_cache[batch_idx, :, lens] = v_all[batch_idx, :, lens]
        rows.append(p(q, k_cache, v_cache, q_start=lens, k_lens=lens + 1, **window))
        want.append(lens.clone())
        lens = lens + 1

    full = p(q_all, k_all, v_all, **window)                         # one call, whole sequences
    positions = torch.stack(want, dim=1)                            # [batch, steps]
    expected = torch.stack([full[b, :, positions[b]] for b in range(batch)])
    return torch.cat(rows, dim=2), expected


if __name__ == "__main__":
    got, expected = generate()
    print(f"decoded {got.shape[2]} tokens for {got.shape[0]} sequences; max difference from the "
          f"full-sequence call: {(got - expected).abs().max().item():.2e}")
