"""Split-K (flash-decoding): a row tile's key tiles shared by several programs, their partial
results merged by log-sum-exp (sigmoid: by sum).

Off the GPU the policy never splits, so these tests force it (`kernel_options={"forward":
{"splits": n}}`) and compare with the reference interpreter; the policy itself is tested on
its own (`policy.split_count`).
"""
from __future__ import annotations

import os

import pytest
import torch

import attnc
from attnc.runtime import dispatch, policy
from attnc.runtime.policy import Config, Target
from attnc.runtime.positions import positions_of

from decoding import DEVICE, needs_kernels, qkv

pytestmark = needs_kernels


def _check(p, q, k, v, splits, **kw):
    """Split output and LSE against the fp64 reference."""
    softmax = p.ir.normalizer == "softmax"
    got = p(q, k, v, backend="triton", kernel_options={"forward": {"splits": splits}},
            return_lse=softmax, **kw)
    want = p(q.double(), k.double(), v.double(), backend="reference", return_lse=softmax, **kw)
    if not softmax:
        got, want = (got, None), (want, None)
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-5, atol=2e-5)
    if softmax:
        torch.testing.assert_close(got[1].double(), want[1], rtol=2e-5, atol=2e-5)
    return got


CASES = [  # (pattern, arguments, q_len, k_len, k_lens, splits)
    ("causal", {}, 1, 400, [400, 77], 3),
    ("causal", {}, 37, 150, None, 4),
    ("streaming", {"window": 48, "sinks": 4}, 1, 500, [500, 130], 5),
    ("sliding_window", {"window": 70}, 3, 300, [300, 64], 2),
    ("alibi", {"slopes": "heads"}, 2, 260, [260, 90], 3),
    ("sigmoid", {}, 3, 200, [200, 50], 3),
    ("topk", {"top": 7}, 2, 200, [200, 50], 3),
    ("learned_sinks", {"sinks": "heads"}, 2, 200, [200, 50], 3),
    ("document", {"doc": "ids"}, 4, 300, [300, 33], 4),
    ("causal", {}, 1, 40, [40, 3], 16),   # more splits than key tiles: some take none
]


@pytest.mark.parametrize("name,args,Lq,Lk,lens,splits", CASES,
                         ids=[f"{c[0]}-q{c[2]}-k{c[3]}-s{c[5]}" for c in CASES])
def test_split_forward_matches_the_reference(name, args, Lq, Lk, lens, splits,
                                             forward_grids):
    launched = forward_grids
    B, H, Hkv = 2, 4, 2
    q, k, v = qkv(B, H, Hkv, Lq, Lk)
    gen = torch.Generator().manual_seed(1)
    args = dict(args)
    for n, x in args.items():
        if x == "heads":
            args[n] = torch.rand(H, generator=gen).to(DEVICE) * 0.3
        elif x == "ids":
            args[n] = torch.randint(0, 3, (B, Lk), generator=gen).sort(-1).values.to(DEVICE)
    if lens is not None:
        k_lens = torch.tensor(lens, device=DEVICE)
        args.update(q_start=k_lens - Lq, k_lens=k_lens)
    _check(attnc.std(name), q, k, v, splits, **args)
    kernels = [n for n, _ in launched]
    topk = attnc.std(name).ir.topk is not None
    assert kernels == (["attn_kth"] if topk else []) + ["attn_fwd", "attn_merge"]
    fwd_grid = dict(launched)["attn_fwd"]
    assert fwd_grid[2] == splits


def test_splitting_is_invisible_at_every_count():
    """The same call at 1..6 splits: the same result to rounding (the merge reorders sums)."""
    p = attnc.std("streaming")
    q, k, v = qkv(1, 2, 1, 1, 333, seed=2)
    kw = {"q_start": 332, "window": 100, "sinks": 3}
    base = p(q, k, v, backend="triton", **kw)
    for splits in range(2, 7):
        got = p(q, k, v, backend="triton", kernel_options={"forward": {"splits": splits}}, **kw)
        torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-6)


def test_an_empty_row_stays_zero_and_minus_inf_when_split():
    p = attnc.std("causal")
    q, k, v = qkv(2, 2, 2, 1, 64, seed=3)
    out, lse = _check(p, q, k, v, 4, q_start=torch.tensor([63, 0], device=DEVICE),
                      k_lens=torch.tensor([64, 0], device=DEVICE))
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


def test_a_repeated_split_call_reuses_its_launches(forward_grids):
    launched = forward_grids
    p = attnc.std("causal")
    q, k, v = qkv(1, 2, 2, 1, 100, seed=4)
    opts = {"forward": {"splits": 3}}
    first = p(q, k, v, backend="triton", kernel_options=opts, q_start=99)
    again = p(q, k, v, backend="triton", kernel_options=opts, q_start=99)
    assert torch.equal(first, again)
    assert [n for n, _ in launched] == ["attn_fwd", "attn_merge"] * 2


def test_kernel_options_for_reports_and_reproduces_the_split():
    p = attnc.std("causal")
    q, k, v = qkv(1, 2, 2, 1, 100, seed=5)
    got = attnc.kernel_options_for(p, q, k, v, backend="triton", q_start=99,
                                   kernel_options={"forward": {"splits": 3}})
    assert got["forward"]["splits"] == 3 and "splits" not in got["dq"]
    plain = attnc.kernel_options_for(p, q, k, v, backend="triton", q_start=99)
    assert plain["forward"]["splits"] == 1  # off the GPU the policy does not split


@pytest.mark.parametrize("options,match", [
    ({"dq": {"splits": 2}}, r"'splits' \(split-K\) is a setting of the forward kernel"),
    ({"forward": {"splits": 0}}, r"kernel_options\['forward'\]\['splits'\] must be in 1\.\.64"),
    ({"forward": {"splits": 65}}, r"must be in 1\.\.64"),
    ({"forward": {"split": 2}}, r"did you mean 'splits'"),
])
def test_bad_split_options_are_value_errors(options, match):
    q, k, v = qkv(1, 1, 1, 1, 16)
    with pytest.raises(ValueError, match=match):
        attnc.std("causal")(q, k, v, backend="triton", kernel_options=options)


def test_flat_splits_set_the_forward_only():
    opts = policy.KernelOptions.of({"block_m": 16, "splits": 2})
    assert opts.given("forward") == {"block_m": 16, "splits": 2}
    assert opts.given("dq") == {"block_m": 16}


# ------------------------------------------------------------------ the policy


GPU = torch.device("cuda", 0)  # a descriptor only: nothing runs on it


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(policy, "multiprocessors", lambda index: 132)
    return Target("cuda", 90)


def test_split_count_fills_the_gpu_only_when_needed(h200):
    cfg = Config(128, 64, 8, 3)
    many = lambda: 2048
    assert policy.split_count(cfg, h200, 256, many, GPU) == 1       # programs fill it
    assert policy.split_count(cfg, h200, 64, many, GPU) == 5        # 2 waves of 132
    assert policy.split_count(cfg, h200, 2, many, GPU) == 64        # capped
    assert policy.split_count(cfg, h200, 2, lambda: 65, GPU) == 16  # a 4K window's tiles
    assert policy.split_count(cfg, h200, 2, lambda: 3, GPU) == 1    # too few to share
    assert policy.split_count(Config(128, 64, splits=7), h200, 256, many, GPU) == 7
    assert policy.split_count(cfg, policy.INTERPRETER, 2, many, GPU) == 1


def test_the_estimate_sees_the_window_not_the_cache():
    """The key tiles a decode step visits, from the placed closed form: a window of 4096 (plus
    its sinks) over a 128K cache is about 66 tiles of 64, causal all 2048."""
    q = torch.zeros(8, 32, 1, 128)
    k = torch.zeros(1, 1, 1, 1).expand(8, 8, 131072, 128)  # no memory behind it
    cfg = Config(128, 64)
    for name, args, want in (("streaming", {"window": 4096, "sinks": 4}, range(64, 70)),
                             ("causal", {}, range(2048, 2049))):
        p = attnc.std(name)
        bound = p.bind(q, k, k, args)
        bound.positions = positions_of(q, k, q_start=131071)
        kernel = dispatch.forward_kernel(p.ir, *dispatch.call_specialization(p.ir, bound)).kernel
        assert dispatch._visited_key_tiles(kernel, bound, 1, 131072, cfg)() in want, name


def test_the_decode_benchmark_agrees_in_its_smoke_run():
    """bench/decode.py --smoke: attnc (contiguous and paged), FlexAttention and SDPA agree on
    tiny decode steps (the GPU run times them)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    res = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True,
                         check=False,
                         timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| causal")]
    assert len(rows) == 4 and any("(paged)" in r for r in rows)
