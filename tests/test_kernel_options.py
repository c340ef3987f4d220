"""`kernel_options=`: a call forces the generated kernels' tiles, warps and stages, checked
against what each kernel allows; `attnc.kernel_options_for` says what a call launches with, and
passed back it reproduces the same kernels. Launches are observed through `run_launch`; GPU
targets are stood in for by the interpreter (`Target.of` patched), as in tests/test_policy.py."""
from __future__ import annotations

import collections
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.runtime import backward, dispatch, policy, tune
from attnc.runtime.policy import Config, Target

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the generated kernels under TRITON_INTERPRET=1")

TOPK = "pattern t(top: int = 40):\n    mask q >= k\n    select topk(top)\n"
ROLES = {"attn_fwd": "forward", "attn_bwd_dq": "dq", "attn_bwd_dkdv": "dkdv"}


def _qkv(L=40, D=16, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, L, D, generator=g).requires_grad_(grad) for _ in range(3)]


@pytest.fixture
def launches(monkeypatch):
    """{kernel role: [launch meta, ...]} of every generated kernel the test runs."""
    seen: dict[str, list[dict]] = {}

    def spy(run):
        def record(compiled, launch):
            seen.setdefault(ROLES.get(launch.name, launch.name), []).append(dict(launch.meta))
            return run(compiled, launch)
        return record
    monkeypatch.setattr(dispatch, "run_launch", spy(dispatch.run_launch))
    monkeypatch.setattr(backward, "run_launch", spy(backward.run_launch))
    return seen


def _tiles(meta: dict) -> tuple[int, int]:
    return meta["BLOCK_M"], meta["BLOCK_N"]


def _grads(out, *leaves):
    return torch.autograd.grad(out.pow(2).sum(), leaves)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Calls resolve to an sm_90 target while the interpreter runs the kernels (num_warps and
    num_stages then travel with every launch); no launch prepared for the CPU is reused."""
    fake = Target("cuda", 90)
    monkeypatch.setattr(dispatch.Target, "of", staticmethod(lambda device: fake))
    monkeypatch.setattr(dispatch, "_TEMPLATES", collections.OrderedDict())
    return fake


# --------------------------------------------------------------------------- what launches


def test_options_set_each_kernels_tiles_and_results_still_match(launches):
    p = attnc.std("sliding_window")
    q, k, v = _qkv(grad=True)
    opts = {"forward": {"block_m": 16, "block_n": 64}, "dq": {"block_m": 64, "block_n": 16},
            "dkdv": {"block_m": 16, "block_n": 32}}
    out = p(q, k, v, window=9, backend="triton", kernel_options=opts)
    got = _grads(out, q, k, v)
    assert _tiles(launches["forward"][-1]) == (16, 64)
    assert _tiles(launches["dq"][-1]) == (64, 16)
    assert _tiles(launches["dkdv"][-1]) == (16, 32)
    ref = p(q, k, v, window=9, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(got, _grads(ref, q, k, v)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_flat_options_set_every_kernel_and_left_out_fields_keep_the_policy(launches):
    p = attnc.std("causal")
    q, k, v = _qkv(grad=True)
    _grads(p(q, k, v, backend="triton", kernel_options={"block_n": 16}), q, k, v)
    base = policy.INTERPRETER_CONFIG
    for role in policy.KERNELS:
        assert _tiles(launches[role][-1]) == (base.block_m, 16), role


def test_pattern_attention_passes_kernel_options_through(launches):
    """attnc.nn.PatternAttention gives kernel_options to every call, with learnable tensors."""
    from attnc.nn import PatternAttention
    m = PatternAttention("alibi", backend="triton", kernel_options={"block_m": 32, "block_n": 16},
                         slopes=torch.tensor([0.2, 0.4]))
    q, k, v = _qkv(grad=True)
    out = m(q, k, v)
    _grads(out, q, k, v, m.slopes)
    for role in policy.KERNELS:
        assert _tiles(launches[role][-1]) == (32, 16), role
    ref = attnc.std("alibi")(q, k, v, slopes=m.slopes, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_a_call_with_other_options_does_not_reuse_the_first_plan(launches):
    p = attnc.std("causal")
    q, k, v = _qkv()
    a = p(q, k, v, backend="triton", kernel_options={"block_m": 16, "block_n": 16})
    b = p(q, k, v, backend="triton", kernel_options={"forward": {"block_m": 64, "block_n": 32}})
    c = p(q, k, v, backend="triton")
    d = p(q, k, v, backend="triton", kernel_options={"block_m": 16, "block_n": 16})
    assert [_tiles(m) for m in launches["forward"]] == [(16, 16), (64, 32), (32, 32), (16, 16)]
    for x in (b, c, d):
        torch.testing.assert_close(x, a, atol=2e-6, rtol=2e-6)


def test_warps_and_stages_reach_a_gpu_launch(launches, fake_gpu):
    p = attnc.std("causal")
    q, k, v = _qkv(grad=True)
    opts = {"forward": {"block_m": 16, "block_n": 16, "num_warps": 2, "num_stages": 1},
            "dq": {"block_m": 16, "block_n": 16, "num_warps": 1, "num_stages": 2},
            "dkdv": {"block_m": 16, "block_n": 16, "num_warps": 8, "num_stages": 3}}
    out = p(q, k, v, backend="triton", kernel_options=opts)
    _grads(out, q, k, v)
    for role, want in opts.items():
        meta = launches[role][-1]
        assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"]) == \
            tuple(want[f] for f in policy.OPTION_FIELDS), role
    torch.testing.assert_close(out, p(q, k, v, backend="reference"), atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- kernel_options_for


def test_kernel_options_for_says_what_a_call_launches_with(launches):
    p = attnc.std("sliding_window")
    q, k, v = _qkv(grad=True)
    chosen = attnc.kernel_options_for(p, q, k, v, window=9, backend="triton")
    base = policy.INTERPRETER_CONFIG
    want = {role: {"block_m": base.block_m, "block_n": base.block_n,
                   "num_warps": base.num_warps, "num_stages": base.num_stages}
            for role in policy.KERNELS}
    want["forward"]["splits"] = 1  # no split-K under the interpreter unless forced
    assert chosen == want
    _grads(p(q, k, v, window=9, backend="triton"), q, k, v)
    for role in policy.KERNELS:
        assert _tiles(launches[role][-1]) == (chosen[role]["block_m"], chosen[role]["block_n"])


def test_kernel_options_for_round_trips_to_identical_output():
    p = attnc.std("alibi")
    q, k, v = _qkv(grad=True)
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)
    partial = {"forward": {"block_m": 16}, "dkdv": {"block_n": 64}}
    full = attnc.kernel_options_for(p, q, k, v, slopes=slopes, backend="triton",
                                    kernel_options=partial)
    assert full["forward"]["block_m"] == 16 and full["dkdv"]["block_n"] == 64
    assert set(full["dq"]) == set(policy.OPTION_FIELDS)
    a = p(q, k, v, slopes=slopes, backend="triton", kernel_options=partial)
    b = p(q, k, v, slopes=slopes, backend="triton", kernel_options=full)
    assert torch.equal(a, b)
    for x, y in zip(_grads(a, q, k, v, slopes), _grads(b, q, k, v, slopes)):
        assert torch.equal(x, y)
    plain = attnc.kernel_options_for(p, q, k, v, slopes=slopes, backend="triton")
    assert torch.equal(p(q, k, v, slopes=slopes, backend="triton", kernel_options=plain),
                       p(q, k, v, slopes=slopes, backend="triton"))


def test_kernel_options_for_reports_the_tuned_configuration(monkeypatch, tmp_path, fake_gpu):
    """With autotuning on, what the tuner remembered; a forced configuration is never tuned."""
    p = attnc.std("causal")
    q, k, v = _qkv()
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    monkeypatch.setattr(tune, "_device_name", lambda device: "Fake GPU")
    tuner = tune.Tuner(bench=lambda fn: pytest.fail("timed a forced configuration"),
                       path=str(tmp_path / "t.json"))
    monkeypatch.setattr(tune, "TUNER", tuner)
    kernel = dispatch.forward_kernel(p.ir, {}).kernel
    tuned = {"forward": Config(16, 32, 2, 1), "dq": Config(32, 16, 4, 2),
             "dkdv": Config(16, 16, 8, 1)}
    tuner._load().update({tune.tuning_key(kernel.pattern_key, role, 16, 16, torch.float32,
                                          "Fake GPU"): cfg for role, cfg in tuned.items()})
    got = attnc.kernel_options_for(p, q, k, v, backend="triton")
    assert got["forward"].pop("splits") == 1  # a CPU tensor is never split unless forced
    assert {role: Config(**fields) for role, fields in got.items()} == tuned
    forced = {"forward": {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1}}
    monkeypatch.setattr(tuner, "_load", lambda: {})  # nothing remembered: would tune...
    out = p(q, k, v, backend="triton", kernel_options=forced)  # ...but forced is not tuned
    torch.testing.assert_close(out, p(q, k, v, backend="reference"), atol=2e-5, rtol=2e-5)


def test_kernel_options_for_lets_the_tuner_choose_first(monkeypatch, tmp_path, fake_gpu):
    """With autotuning on and nothing tuned, the call runs once (forward and backward) so that
    the tuner chooses, as the call itself would have; what it chose is reported."""
    p = attnc.std("causal")
    q, k, v = _qkv()
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    monkeypatch.setattr(tune, "_device_name", lambda device: "Fake GPU")
    small = [Config(16, 16, 4, 1), Config(32, 16, 2, 1)]
    monkeypatch.setattr(tune, "candidates", lambda *a, **kw: small)
    timing = iter([2.0, 1.0] * 3)
    tuner = tune.Tuner(bench=lambda fn: (fn(), next(timing))[1], path=str(tmp_path / "t.json"))
    monkeypatch.setattr(tune, "TUNER", tuner)
    for module in (dispatch, backward):
        monkeypatch.setattr(module, "configure",
                            lambda *a, **kw: tune.configure(*a, tuner=tuner, **kw))
    got = attnc.kernel_options_for(p, q, k, v, backend="triton")
    assert got["forward"].pop("splits") == 1
    assert {role: Config(**fields) for role, fields in got.items()} == \
        {role: small[1] for role in policy.KERNELS}
    assert not q.requires_grad and len(tuner.memory) == 3


def test_kernel_options_for_needs_the_generated_kernels():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend='reference'.*launches no generated kernels"):
        attnc.kernel_options_for(attnc.std("causal"), q, k, v, backend="reference")
    with pytest.raises(ValueError, match="must be an attnc.Pattern"):
        attnc.kernel_options_for("causal", q, k, v)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("options, message", [
    ({"blockm": 16}, r"unknown key 'blockm' in kernel_options; did you mean 'block_m'\?"),
    ({"forward": {"num_warp": 4}},
     r"unknown key 'num_warp' in kernel_options\['forward'\]; did you mean 'num_warps'\?"),
    ({"fowrard": {"block_m": 16}, "dq": {}}, r"unknown key 'fowrard'.*did you mean 'forward'\?"),
    ({"dq": {"block_m": 16}, "block_n": 32}, r"mixes per-kernel dicts \('dq'\) with the flat key"),
    ([("block_m", 16)], r"kernel_options must be a dict, got list"),
    ({"dkdv": 16}, r"kernel_options\['dkdv'\] must be a dict"),
    ({"block_m": 48}, r"kernel_options\['block_m'\] must be a power of two >= 16"),
    ({"forward": {"block_n": 8}},
     r"kernel_options\['forward'\]\['block_n'\] must be a power of two"),
    ({"block_m": 32.0}, r"kernel_options\['block_m'\] must be an int, got 32.0"),
    ({"block_m": True}, r"must be an int, got True"),
    ({"num_warps": 3}, r"kernel_options\['num_warps'\] must be one of 1, 2, 4, 8, 16, got 3"),
    ({"dq": {"num_stages": 0}}, r"kernel_options\['dq'\]\['num_stages'\] must be >= 1, got 0"),
    ({"block_m": 4096, "block_n": 512}, r"4096 x 512 tile, more than the 1048576 elements"),
])
def test_every_bad_option_names_its_key(options, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        attnc.std("causal")(q, k, v, backend="triton", kernel_options=options)


def test_top_k_needs_its_key_tile_and_one_configuration_for_every_pass():
    p = attnc.compile(TOPK)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"kernel_options\['forward'\]\['block_n'\] must be >= 64 "
                                         r"for this call \(a `select topk`"):
        p(q, k, v, backend="triton", kernel_options={"forward": {"block_n": 32}})
    with pytest.raises(ValueError, match=r"kernel_options\['dq'\] resolves to .*keep decisions "
                                         r"read the score.*set only 'forward'"):
        p(q, k, v, backend="triton", kernel_options={"forward": {"block_m": 16},
                                                     "dq": {"block_m": 32}})
    chosen = attnc.kernel_options_for(p, q, k, v, backend="triton",
                                      kernel_options={"forward": {"block_m": 16}})
    assert chosen["forward"].pop("splits") == 1
    assert chosen["forward"] == chosen["dq"] == chosen["dkdv"]
    assert chosen["forward"]["block_m"] == 16 and chosen["forward"]["block_n"] == 64


def test_top_k_passes_share_the_forced_tiles(launches):
    p = attnc.compile(TOPK)
    q, k, v = _qkv(grad=True)
    out = p(q, k, v, top=5, backend="triton", kernel_options={"block_m": 16, "block_n": 16})
    got = _grads(out, q, k, v)
    for role in ("forward", "attn_kth", "dq", "dkdv"):
        assert _tiles(launches[role][-1]) == (16, 16), role
    ref = p(q, k, v, top=5, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(got, _grads(ref, q, k, v)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_shared_memory_must_fit_the_gpu(fake_gpu):
    q, k, v = _qkv(D=128)
    p = attnc.std("causal")
    too_big = {"dkdv": {"block_m": 128, "block_n": 128, "num_stages": 4}}
    with pytest.raises(ValueError, match=r"kernel_options\['dkdv'\]: block_m=128, block_n=128, "
                                         r"num_stages=4 needs about \d+ KB of shared memory in the "
                                         r"dkdv kernel .* more than the 227 KB a block may use on "
                                         r"sm_90"):
        p(q, k, v, backend="triton", kernel_options=too_big)
    assert policy.forced_configs(policy.KernelOptions.of(too_big), policy.INTERPRETER, 128, 128,
                                 torch.float32)["dkdv"].num_stages == 4  # no such limit on the CPU


def test_the_reference_backend_rejects_options_and_auto_warns():
    p = attnc.std("causal")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend='reference' launches none"):
        p(q, k, v, backend="reference", kernel_options={"block_m": 16})
    with pytest.warns(UserWarning, match="kernel_options are ignored: backend='auto' chose the "
                                         "reference"):
        out = p(q, k, v, kernel_options={"block_m": 16})
    torch.testing.assert_close(out, p(q, k, v))
    assert p(q, k, v, backend="reference", kernel_options={}) is not None  # {}: none given


# --------------------------------------------------------------------------- torch.compile


def test_options_travel_through_a_compiled_graph(launches):
    p = attnc.std("sliding_window")
    q, k, v = _qkv(grad=True)
    opts = {"forward": {"block_m": 16, "block_n": 16}, "dkdv": {"block_m": 16, "block_n": 64}}

    def f(q, k, v):
        return p(q, k, v, window=9, backend="triton", kernel_options=opts)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    got = _grads(out, q, k, v)
    assert _tiles(launches["forward"][-1]) == (16, 16)
    assert _tiles(launches["dq"][-1]) == (policy.INTERPRETER_CONFIG.block_m,
                                           policy.INTERPRETER_CONFIG.block_n)
    assert _tiles(launches["dkdv"][-1]) == (16, 64)
    eager = p(q, k, v, window=9, backend="triton", kernel_options=opts)
    assert torch.equal(out, eager)
    for a, b in zip(got, _grads(eager, q, k, v)):
        assert torch.equal(a, b)

    def bad(q, k, v):
        return p(q, k, v, window=9, backend="triton", kernel_options={"blok_m": 16})
    with pytest.raises(Exception, match="did you mean 'block_m'"):
        torch.compile(bad, fullgraph=True, backend="aot_eager")(q, k, v)


def test_deterministic_tensor_gradients_follow_a_tuned_dq_configuration(monkeypatch, tmp_path,
                                                                       fake_gpu):
    """Deterministic dQ writes one gradient slice per program: the buffers are sized by the
    configuration dQ launches with (here a tuned one with shorter query tiles than the table's),
    not by the table's."""
    p = attnc.std("alibi")
    q, k, v = _qkv(grad=True)
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    monkeypatch.setattr(tune, "_device_name", lambda device: "Fake GPU")
    tuner = tune.Tuner(bench=lambda fn: pytest.fail("tuned"), path=str(tmp_path / "t.json"))
    monkeypatch.setattr(tune, "TUNER", tuner)
    for module in (dispatch, backward):
        monkeypatch.setattr(module, "configure",
                            lambda *a, **kw: tune.configure(*a, tuner=tuner, **kw))
    key = dispatch.forward_kernel(p.ir, {"causal": True}).kernel.pattern_key
    small = Config(16, 16, 4, 1)
    assert small.block_m < policy.config_for("dq", fake_gpu, 16, 16, torch.float32).block_m
    tuner._load().update({tune.tuning_key(key, role, 16, 16, torch.float32, "Fake GPU"): small
                          for role in policy.KERNELS})
    torch.use_deterministic_algorithms(True)
    try:
        out = p(q, k, v, slopes=slopes, backend="triton")
        got = _grads(out, q, k, v, slopes)
    finally:
        torch.use_deterministic_algorithms(False)
    ref = p(q, k, v, slopes=slopes, backend="reference")
    for a, b in zip(got, _grads(ref, q, k, v, slopes)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
