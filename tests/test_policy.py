"""The launch policy (tile tables, shared-memory model, candidates) and the autotuner's choice and
memory, without a GPU: the tuner takes a fake clock, and the end-to-end tuning path runs the
generated kernels under Triton's interpreter with a stand-in CUDA target."""
from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.lowering.signature import Constraints
from attnc.runtime import dispatch, policy, tune
from attnc.runtime.policy import INTERPRETER, Config, Target, config_for

H100, A100, RTX = Target("cuda", 90), Target("cuda", 80), Target("cuda", 89)


def test_the_tables_cover_every_kernel_architecture_and_head_dim():
    for kernel in policy.KERNELS:
        for target in (H100, A100, RTX):
            for d in (16, 64, 80, 128, 256):
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    cfg = config_for(kernel, target, d, d, dtype)
                    assert policy.fits(kernel, cfg, target, d, d, dtype), (kernel, target, d, dtype, cfg)
                    if dtype.itemsize >= 4:
                        assert cfg.num_stages <= 2
    assert config_for("forward", INTERPRETER, 64, 64, torch.float32) == policy.INTERPRETER_CONFIG


def test_shared_memory_model_matches_what_triton_allocated():
    """Figures from `bench/static.py` (sm_90, D=128 bf16, Triton 3.9): within 1 KB."""
    measured = {("forward", Config(128, 64, 8, 3)): 131072, ("dq", Config(128, 32, 8, 3)): 114688,
                ("dkdv", Config(32, 128, 8, 3)): 115200, ("forward", Config(128, 128, 8, 2)): 163840}
    for (kernel, cfg), bytes_ in measured.items():
        assert abs(policy.shared_bytes(kernel, cfg, 128, 128, 2) - bytes_) <= 1024


def test_consumer_gpus_get_fewer_stages_where_memory_is_short():
    big = config_for("forward", A100, 128, 128, torch.bfloat16)
    small = config_for("forward", RTX, 128, 128, torch.bfloat16)
    assert (small.block_m, small.block_n) == (big.block_m, big.block_n)
    assert small.num_stages < big.num_stages
    assert policy.shared_bytes("forward", small, 128, 128, 2) <= policy.MAX_SHARED[89]


def test_constraints_shape_the_choice():
    topk = Constraints(min_block_n=128, shared_tiles=True)
    fwd = config_for("forward", H100, 64, 64, torch.bfloat16, topk)
    assert fwd.block_n >= 128
    for kernel in ("dq", "dkdv"):  # keep decisions read the score: the forward's tiles
        assert config_for(kernel, H100, 64, 64, torch.bfloat16, topk) == fwd
    assert config_for("dkdv", H100, 64, 64, torch.bfloat16) != fwd
    for cfg in policy.candidates("dq", H100, 64, 64, torch.bfloat16, topk):
        assert cfg.block_n >= 128


def test_candidates_start_with_the_table_and_fit():
    for kernel in policy.KERNELS:
        cands = policy.candidates(kernel, A100, 128, 128, torch.float32)
        assert cands[0] == config_for(kernel, A100, 128, 128, torch.float32)
        assert len(set(cands)) == len(cands) > 1
        for c in cands:
            assert c.num_stages <= 2 and policy.fits(kernel, c, A100, 128, 128, torch.float32)


def test_override_forces_a_configuration():
    cfg = Config(64, 32, 4, 2)
    with policy.override({"dq": cfg}):
        assert config_for("dq", H100, 128, 128, torch.bfloat16) == cfg
        assert config_for("dkdv", H100, 128, 128, torch.bfloat16) != cfg
    assert config_for("dq", H100, 128, 128, torch.bfloat16) != cfg


# --------------------------------------------------------------------------- the tuner


class Clock:
    """A fake `do_bench`: milliseconds per configuration, and what it was asked to time."""

    def __init__(self, times):
        self.times, self.seen = times, []

    def __call__(self, fn):
        fn()
        return self.times[self.current]

    def run(self, cfg):
        self.current = cfg
        self.seen.append(cfg)


def test_tuner_keeps_the_fastest_and_remembers_it_across_processes(tmp_path):
    a, b, c = Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(128, 32, 8, 3)
    clock = Clock({a: 2.0, b: 1.0, c: 3.0})
    path = str(tmp_path / "tuning.json")
    t = tune.Tuner(bench=clock, path=path)
    assert t.choose("key", [a, b, c], clock.run) == b
    assert set(clock.seen) == {a, b, c}
    stored = json.loads(open(path).read())
    assert stored == {"key": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}}
    again = tune.Tuner(bench=None, path=path)  # a second process: no timing at all
    assert again.known("key") == b
    assert again.choose("key", [a, c], lambda cfg: pytest.fail("tuned twice")) == b


def test_tuner_skips_candidates_the_device_refuses(tmp_path):
    a, b = Config(128, 128, 8, 3), Config(64, 64, 4, 3)

    def run(cfg):
        if cfg == a:
            raise RuntimeError("out of resource: shared memory, Required: 262144")
    t = tune.Tuner(bench=lambda fn: (fn(), 1.0)[1], path=str(tmp_path / "t.json"))
    assert t.choose("k", [a, b], run) == b

    def broken(cfg):
        raise ValueError("a real bug")
    with pytest.raises(ValueError, match="a real bug"):
        tune.Tuner(bench=lambda fn: 1.0, path=str(tmp_path / "u.json")).choose("k2", [b], broken)


def test_tuning_is_off_without_a_gpu_or_the_variable(monkeypatch):
    monkeypatch.delenv("ATTNC_AUTOTUNE", raising=False)
    assert not tune.enabled(H100)
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    assert tune.enabled(H100) and not tune.enabled(INTERPRETER)


def test_tuning_runs_real_kernels_on_scratch_outputs(monkeypatch, tmp_path):
    """The whole path with the interpreter standing in for a GPU: each candidate launches the
    generated kernel on scratch outputs, the fastest (by a fake clock) is kept under a key of the
    pattern, kernel role, head dims, dtype and device, and the call's result is right."""
    p = attnc.std("sliding_window")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    fake = Target("cuda", 90)
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    monkeypatch.setattr(tune, "_device_name", lambda device: "Fake GPU")
    small = [Config(16, 16, 4, 1), Config(32, 16, 4, 1), Config(16, 32, 4, 1)]
    monkeypatch.setattr(tune, "candidates", lambda *a, **kw: small)
    timing = iter([3.0, 1.0, 2.0])
    tuner = tune.Tuner(bench=lambda fn: (fn(), next(timing))[1], path=str(tmp_path / "t.json"))
    monkeypatch.setattr(tune, "TUNER", tuner)
    monkeypatch.setattr(dispatch.Target, "of", staticmethod(lambda device: fake))
    monkeypatch.setattr(dispatch, "configure",
                        lambda *a, **kw: tune.configure(*a, tuner=tuner, **kw))
    out = p(q, k, v, window=9, backend="triton")
    want = p(q, k, v, window=9, backend="reference")
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    (key, cfg), = json.loads(open(tmp_path / "t.json").read()).items()
    assert Config(**cfg) == small[1]
    assert "|forward|d=16|dv=16|float32|Fake GPU|" in key
