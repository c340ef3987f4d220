"""Context parallelism (`attnc.parallel`): sharded calls on torch.distributed's gloo backend in
spawned CPU processes equal the single-process call, forward and backward; EMPTY shard pairs
are neither computed nor sent; mistakes are errors on every rank, never a hang.

Each world size runs all its cases in one spawn (process start-up dominates at these sizes).
"""
from __future__ import annotations

import functools
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

L, D = 64, 16


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(name, B=2, H=4, Hkv=2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=gen, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, generator=gen, dtype=dtype)
    args = {}
    if name == "sliding_window":
        args["window"] = 10
    if name == "document":
        args["doc"] = (torch.arange(L) // 24).expand(B, L).contiguous()
    if name == "alibi":
        args["slopes"] = torch.rand(H, generator=gen, dtype=dtype).requires_grad_()
    if name == "topk":
        args["top"] = 5
    if name == "topk_ties":  # many tied scores, exact in any order of summation (small ints)
        args["top"] = 5
        q, k = (torch.randint(-2, 3, t.shape, generator=gen).to(dtype) for t in (q, k))
    if name == "learned_sinks":
        args["sinks"] = torch.randn(H, generator=gen, dtype=dtype).requires_grad_()
    if name == "gaussian_mixture":  # learnable weights and widths of 3 Gaussians over an 8x8 grid
        args["width"] = 8
        args["alpha"] = torch.rand(H, 3, generator=gen, dtype=dtype).requires_grad_()
        args["sigma"] = (1 + torch.rand(H, 3, generator=gen, dtype=dtype)).requires_grad_()
    return q, k, v, args


def _grads(outs, leaves, weights):
    """Gradients of sum(out * w) over the outputs (on a shard: this rank's part of the loss,
    whose sum over the ranks is the whole sequence's)."""
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _weights(like):
    return torch.linspace(-1, 1, like.numel(), dtype=torch.float64).view(like.shape).to(like.dtype)


def _case(rank, world, name, order, backend, tol, dtype=None):
    """The sharded call against the whole sequence's: output and, for softmax patterns, the
    log-sum-exp, both in the loss (so the backward gets both gradients)."""
    import torch.distributed as dist

    import attnc
    import attnc.parallel as cp
    p = attnc.std(name.removesuffix("_ties"))
    lse = p.ir.normalizer == "softmax"
    if dtype is None:
        dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v, args = _inputs(name, dtype=dtype)
    float_args = [x for x in args.values() if isinstance(x, torch.Tensor) and x.requires_grad]
    # the whole sequence in one process
    def whole(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        floats = {n: x.detach().to(dtype).requires_grad_() for n, x in args.items()
                  if any(x is f for f in float_args)}
        got = p(*leaves, backend=backend, return_lse=lse, **{**args, **floats})
        got = list(got) if lse else [got]
        grads = _grads(got, leaves + list(floats.values()), [_weights(g) for g in got])
        return [g.detach() for g in got], grads

    full, want = whole(dtype)
    exact = whole(torch.float64) if dtype in (torch.bfloat16, torch.float16) else None
    # sharded
    # shards laid out [batch, length, heads, dim] (non-contiguous in the [b, h, l, d] view)
    shards = [cp.shard(t, order=order).transpose(1, 2).contiguous().transpose(1, 2)
              .requires_grad_() for t in (q, k, v)]
    out = cp.ring_attention(p, *shards, order=order, backend=backend, return_lse=lse, **args)
    out = list(out) if lse else [out]
    got = _grads(out, shards + float_args, [cp.shard(_weights(f), order=order) for f in full])
    got = [cp.unshard(g, order=order) for g in got[:3]] + list(got[3:])
    out = [cp.unshard(o.detach(), order=order) for o in out]
    for i, (mine, theirs) in enumerate(zip([*out, *got], [*full, *want])):
        what = f"{name}, {order}, {'output' if i < len(out) else 'gradient'} {i}"
        if exact is None:
            torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
        else:  # low precision: no further from fp64 than 3x the whole-sequence call's own error
            truth = [*exact[0], *exact[1]][i]
            own = (theirs.double() - truth).abs().max().item()
            err = (mine.double() - truth).abs().max().item()
            assert err <= 3 * own + 1e-6, f"{what}: error {err} against the whole call's {own}"
    dist.barrier()


def _worker(rank, world, port, cases):
    import datetime

    import torch.distributed as dist
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    if cases == [("timeout",)]:  # the group is unusable afterwards: leave at once
        _timeout(rank)
        os._exit(0)
    for case in cases:  # an exception is reported by spawn (the peers then time out)
        if case[0] == "report":
            _report(rank, world)
        elif case[0] == "errors":
            _errors(rank, world)
        elif case[0] == "options":
            _options(rank, world)
        elif case[0] == "compiled":
            _compiled(rank, world)
        elif case[0] == "partial":
            _partial(rank, world)
        else:
            _case(rank, world, *case)
    dist.barrier()
    # leave without tearing the group down: a peer that exits while another is still in
    # destroy_process_group can abort that one inside gloo (seen once in CI as SIGABRT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _report(rank, world):
    """A sliding window of 10 over 64 positions at world size 4 (chunks of 16): each query chunk
    reaches its own and the previous chunk only, so 16 - 7 = 9 of the 16 pairs are skipped, and
    each rank but the last sends its k and v shard to its right neighbour only."""
    import attnc
    import attnc.parallel as cp
    q, k, v, args = _inputs("sliding_window")
    shards = [cp.shard(t) for t in (q, k, v)]
    cp.ring_attention(attnc.std("sliding_window"), *shards, backend="reference", **args)
    report = cp.last_report()
    assert (report.pairs, report.skipped) == (16, 9), report
    chunk_bytes = 2 * (shards[1].numel() * shards[1].element_size())  # its k and v
    assert report.bytes_sent == (chunk_bytes if rank < world - 1 else 0), report


def _partial(rank, world):
    """Inference (no_grad), and gradients for only q or only a tensor argument, on both
    backends: the same as the whole sequence's call."""
    import attnc
    import attnc.parallel as cp
    p = attnc.std("alibi")
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        q, k, v, args = _inputs("alibi", dtype=dtype)
        full = p(q, k, v, backend=backend, **args)
        with torch.no_grad():
            out = cp.ring_attention(p, *(cp.shard(t) for t in (q, k, v)), backend=backend, **args)
        torch.testing.assert_close(cp.unshard(out), full.detach())
        for which in ("q", "slopes"):
            q1, s1 = q.detach().requires_grad_(which == "q"), args["slopes"].detach()
            s1.requires_grad_(which == "slopes")
            shards = [cp.shard(t) for t in (q1, k, v)]
            out = cp.ring_attention(p, *shards, backend=backend, slopes=s1)
            got, = torch.autograd.grad(out.sum(), [shards[0] if which == "q" else s1])
            if which == "q":
                got = cp.unshard(got)
            want, = torch.autograd.grad(p(q1, k, v, backend=backend, slopes=s1).sum(),
                                        [q1 if which == "q" else s1])
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def _compiled(rank, world):
    """Inside a torch.compile'd function the sharded call runs eagerly (a graph break), forward
    and backward, with the same result."""
    import warnings

    import attnc
    import attnc.parallel as cp
    q, k, v, _ = _inputs("causal")
    shards = [cp.shard(t).requires_grad_() for t in (q, k, v)]
    call = functools.partial(cp.ring_attention, attnc.std("causal"), backend="reference")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = torch.compile(lambda a, b, c: call(a, b, c) * 2, backend="eager")(*shards)
    # dynamo does not trace into it (it would warn about the pattern caches it met there)
    assert not [w for w in seen if "lru_cache" in str(w.message)], [str(w.message) for w in seen]
    got = torch.autograd.grad(out.sum(), shards)
    want = torch.autograd.grad((call(*shards) * 2).sum(), shards)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _options(rank, world):
    """kernel_options reach every pair's kernels, forward and backward: forced 16 x 16 tiles
    give the policy's result, and the backward kernels are asked for them."""
    import attnc
    import attnc.parallel as cp
    from attnc.runtime import ring_backward
    asked = []
    backward = ring_backward.triton_attention_backward

    def spy(*args, options="", **kwargs):
        asked.append(options)
        return backward(*args, options=options, **kwargs)

    ring_backward.triton_attention_backward = spy
    q, k, v, _ = _inputs("causal", dtype=torch.float32)
    shards = [cp.shard(t).requires_grad_() for t in (q, k, v)]
    results = []
    for options in (None, {"block_m": 16, "block_n": 16}):
        out = cp.ring_attention(attnc.std("causal"), *shards, backend="triton",
                                kernel_options=options)
        results.append([out, *torch.autograd.grad(out.sum(), shards)])
    ring_backward.triton_attention_backward = backward
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    assert "" in asked and '{"block_m": 16, "block_n": 16}' in asked, asked
    with pytest.raises(ValueError, match="block_m"):
        cp.ring_attention(attnc.std("causal"), *shards, backend="triton",
                          kernel_options={"block_m": 3})


def _errors(rank, world):
    import attnc
    import attnc.parallel as cp
    q, k, v, _ = _inputs("causal")
    shards = [cp.shard(t) for t in (q, k, v)]
    bad = shards[0][:, :, : (8 if rank == 0 else 16)]  # rank 0 passes a shorter shard
    with pytest.raises(ValueError, match="the shards differ between ranks"):
        cp.ring_attention(attnc.std("causal"), bad, shards[1][:, :, :bad.shape[2]],
                          shards[2][:, :, :bad.shape[2]])
    with pytest.raises(ValueError, match="arguments differ between ranks"):
        cp.ring_attention(attnc.std("sliding_window"), *shards, window=8 + rank)
    with pytest.raises(ValueError, match="return_lse=True needs the softmax normalizer"):
        cp.ring_attention(attnc.std("sigmoid"), *shards, return_lse=True)
    # an argument only rank 0 gets wrong: its own error there, a ValueError naming it elsewhere
    import attnc.runtime.binding as binding
    wrong = {"windw": 8} if rank == 0 else {"window": 8}
    with pytest.raises(binding.ArgumentError if rank == 0 else ValueError,
                       match="windw" if rank == 0 else r"in error on rank\(s\) \[0\]"):
        cp.ring_attention(attnc.std("sliding_window"), *shards, **wrong)
    with pytest.raises(ValueError, match="kernel_options"):  # the reference launches no kernels
        cp.ring_attention(attnc.std("causal"), *shards, backend="reference",
                          kernel_options={"block_m": 16})


def _timeout(rank):
    """Rank 1 never calls: rank 0's first wait gives up after TIMEOUT (2 s here) with an error
    that says what it waited for."""
    import datetime
    import time

    import attnc
    import attnc.parallel as cp
    from attnc.runtime import ring_transfers
    if rank == 1:
        time.sleep(5)
        return
    ring_transfers.TIMEOUT = datetime.timedelta(seconds=2)
    q, k, v, _ = _inputs("causal")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="waited 2 s for the other ranks to check their shards"):
        cp.ring_attention(attnc.std("causal"), *(cp.shard(t) for t in (q, k, v)))
    assert time.monotonic() - start < 6


def _spawn(world, cases):
    mp.spawn(_worker, args=(world, _port(), cases), nprocs=world, join=True)


REFERENCE = [(n, o, "reference", 1e-10) for n, o in (
    ("causal", "contiguous"), ("causal", "zigzag"), ("sliding_window", "contiguous"),
    ("document", "zigzag"), ("alibi", "contiguous"), ("gaussian_mixture", "zigzag"),
    ("topk", "contiguous"), ("topk_ties", "zigzag"), ("sigmoid", "zigzag"),
    ("learned_sinks", "contiguous"))] + [
    # bf16: partials merged in fp32 and rounded once (tolerance from the whole call's error)
    ("alibi", "zigzag", "reference", None, torch.bfloat16)]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_calls_equal_the_whole_sequence(world):
    _spawn(world, REFERENCE + ([("report",), ("errors",)] if world == 4 else [("compiled",)]))


def test_a_rank_that_never_comes_is_a_timeout_error():
    _spawn(2, [("timeout",)])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_sharded_generated_kernels():
    _spawn(2, [(name, order, "triton", 2e-5) for name, order in (
        ("causal", "zigzag"), ("causal", "contiguous"), ("sliding_window", "contiguous"),
        ("document", "zigzag"), ("alibi", "contiguous"), ("gaussian_mixture", "contiguous"),
        ("topk", "zigzag"), ("sigmoid", "contiguous"), ("learned_sinks", "zigzag"))]
        + [("options",), ("partial",)])


@pytest.fixture
def group_of(monkeypatch):
    """A stand-in process group of `world` ranks, this process rank 0 (for the checks made
    before anything is sent)."""
    import torch.distributed as dist

    def make(world: int):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    return make


def test_position_keywords_are_refused(group_of):
    import attnc
    import attnc.parallel as cp
    group_of(2)
    q, k, v, _ = _inputs("causal")
    with pytest.raises(ValueError, match="places the shards itself .* q_start"):
        cp.ring_attention(attnc.std("causal"), q, k, v, q_start=3)


def test_a_group_of_one_rank_is_an_error(group_of):
    import attnc
    import attnc.parallel as cp
    group_of(1)
    q, k, v, _ = _inputs("causal")
    with pytest.raises(ValueError, match="at least 2 ranks"):
        cp.ring_attention(attnc.std("causal"), q, k, v)


def test_shard_and_unshard_orders():
    from attnc.runtime.ring_plan import shard, unshard
    x = torch.arange(16).view(1, 1, 16, 1)
    for order, first in (("contiguous", [0, 1, 2, 3]), ("zigzag", [0, 1, 14, 15])):
        parts = [shard(x, 4, r, order) for r in range(4)]
        assert parts[0].flatten().tolist() == first
        assert torch.equal(unshard(parts, order), x)


def test_transfers_go_in_rounds_one_ahead(monkeypatch):
    """Round d carries what each rank sends to the rank d after it. With chunk 0 reaching every
    chunk and chunk 2 reaching chunk 3 (world 4, contiguous), rank 2 sends to rank 3 in round 1
    and receives chunk 0 from rank 0 in round 2; `stream` posts round d + 1 before the caller
    works on round d, and skips a rank's empty rounds."""
    import torch.distributed as dist

    from attnc.runtime import ring_transfers
    from attnc.runtime.ring_plan import ShardPlan, chunks_of
    plan = ShardPlan(4, 8, chunks_of(4, "contiguous"),
                     frozenset({(q, 0) for q in range(4)} | {(q, q) for q in range(4)} | {(3, 2)}), 0)
    k = torch.zeros(1, 1, 8, 2)
    rounds = plan.kv_rounds(2, {"k": k})
    assert [sorted(s) for s, _ in rounds] == [[(3, 2, "k")], [], []]
    assert [sorted(r) for _, r in rounds] == [[], [(0, 0, "k")], []]
    events = []
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: events.append(("post", ops)) or [])
    monkeypatch.setattr(dist, "P2POp", lambda op, t, peer, group: (op.__name__, peer))
    for d, got in ring_transfers.stream(None, rounds):
        events.append(("round", d, sorted(got)))
    assert events == [("post", [("isend", 3)]), ("post", [("irecv", 0)]), ("round", 1, []),
                      ("round", 2, [(0, 0, "k")]), ("round", 3, [])]
    # the backward's round 2: rank 2 sends chunk 0's gradient home to rank 0; rank 0 gets it
    assert plan.grad_round(2, 2, {(0, "k"): k}, {"k": k})[0] == {(0, 0, "k"): k}
    assert sorted(plan.grad_round(0, 2, {}, {"k": k})[1]) == [(2, 0, "k")]


def test_what_the_pairs_call():
    """A pair's pattern sees the whole sequence's lengths, has no sink (the merge adds it once
    per row) and keeps top-k keys by a threshold tensor instead of selecting."""
    import math

    import attnc
    from attnc.runtime import ring_patterns as rp
    causal = attnc.std("causal")
    assert rp.whole(causal, 64) is causal and rp.pairs(causal, 64) is causal
    sigmoid = rp.whole(attnc.std("sigmoid"), 64)
    assert sigmoid.ir.bias.op == "const" and sigmoid.ir.bias.value == -math.log(64)
    doc = rp.whole(attnc.std("document"), 64).ir.tensor("doc")
    assert [d.value for d in doc.dims[1:]] == [64]  # passed whole: [batch, N]
    sinks = rp.pairs(attnc.std("learned_sinks"), 64)
    assert sinks.ir.sink is None and rp.whole(attnc.std("learned_sinks"), 64).ir.sink is not None
    topk = rp.pairs(attnc.std("topk"), 64).ir
    assert topk.topk is None and topk.tensors[-1].name == "ring_kth"
    assert "score >= ring_kth[b, h, q]" in str(topk.scores[-1])
    clash = attnc.Pattern.from_source("pattern p(ring_kth: int = 3):\n    select topk(ring_kth)\n")
    assert rp.threshold_name(clash.ir) == "ring_kth_"
    assert rp.pairs(clash, 64).ir.tensors[-1].name == "ring_kth_"


def test_the_scale_estimate_runs_and_agrees_with_the_layout():
    """bench/ring_scale.py --smoke: its tile counts equal `p.layout`'s, and its pairs the plan's
    (both asserted inside), at N = 32K over 4 ranks."""
    import pathlib
    import subprocess
    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "ring_scale.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| sliding_window | 32K | 4 | contiguous | 7 of 16 | 32 MiB | 96 MiB |" in res.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_the_rank_benchmark_agrees_in_its_smoke_run():
    """bench/ring_rank.py --smoke: one rank's pair calls and merges, and its pair backwards'
    dq, equal one call per query chunk over the whole sequence (asserted inside), for each
    pattern."""
    import pathlib
    import subprocess
    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "ring_rank.py"
    res = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("| 512 | 4 |") == 3, res.stdout


def _posted(plan, rank, monkeypatch):
    """The batches rank `rank` posts in a forward and a backward with gradients for k and v, in
    posting order: each a list of (op, peer, shape), from the real code with the transfers
    recorded instead of made."""
    import torch.distributed as dist

    from attnc.runtime import ring, ring_backward
    batches = []
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: batches.append(ops) or [])
    monkeypatch.setattr(dist, "P2POp", lambda op, t, peer, group: (op.__name__, peer,
                                                                    tuple(t.shape)))
    k = torch.zeros(1, 1, plan.chunk * len(plan.held[rank]), 2)

    class Grads:
        def pairs(self, c, kk, vv, home):
            return torch.zeros_like(kk), torch.zeros_like(vv)

        def take_home(self, received):
            pass

    for _ in ring._key_chunks(plan, rank, None, {"k": k, "v": k}):
        pass
    ring_backward.pass_back(None, plan, rank, k, k, Grads(), kv_grad=True)
    return batches


def _runs_in_order(queues) -> bool:
    """Whether every rank's batches complete when each rank runs its batches strictly in the
    order it posted them, as NCCL runs grouped point-to-point calls on one stream: a batch
    completes together with the batches that hold its matches (the i-th send from a to b meets
    the i-th receive at b from a, of the same shape), once all of them are at their ranks'
    heads."""
    where, seen = {}, {}
    for r, batches in enumerate(queues):
        for i, ops in enumerate(batches):
            for op, peer, shape in ops:
                pair = (r, peer) if op == "isend" else (peer, r)
                n = seen[(pair, op)] = seen.get((pair, op), -1) + 1
                where[(pair, op, n)] = (r, i, shape)
    for (pair, op, n), (r, i, shape) in where.items():
        other = where.get((pair, "irecv" if op == "isend" else "isend", n))
        assert other is not None and other[2] == shape, (pair, op, n, "unmatched")
    heads = [0] * len(queues)
    while any(h < len(q) for h, q in zip(heads, queues)):
        ready = {r for r, (h, q) in enumerate(zip(heads, queues)) if h < len(q)}
        changed = True
        while changed:  # drop ranks whose head batch waits on a batch that is not at a head
            changed = False
            for r in sorted(ready):
                for (pair, op, n), (rr, i, _) in where.items():
                    if rr == r and i == heads[r]:
                        o = where[(pair, "irecv" if op == "isend" else "isend", n)]
                        if o[0] not in ready or heads[o[0]] != o[1]:
                            ready.discard(r)
                            changed = True
                            break
        if not ready:
            return False
        for r in ready:
            heads[r] += 1
    return True


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_transfers_cannot_deadlock_on_an_in_order_backend(world, monkeypatch):
    """For plans of causal, local, document-like and random reach, in both orders, every
    rank's forward and backward batches are matched one for one and complete when each rank
    runs them in posting order (NCCL's one stream), not only out of order (gloo)."""
    import random

    from attnc.runtime.ring_plan import ShardPlan, chunks_of
    # the check itself: two ranks that each send first, then receive, in separate batches
    # wait for each other forever
    crossed = [[[("isend", 1 - r, (2,))], [("irecv", 1 - r, (2,))]] for r in range(2)]
    assert not _runs_in_order(crossed) and _runs_in_order([crossed[0], crossed[1][::-1]])
    rng = random.Random(world)
    for order in ("contiguous", "zigzag"):
        held = chunks_of(world, order)
        n = world * len(held[0])
        reach = {
            "causal": {(q, k) for q in range(n) for k in range(q + 1)},
            "local": {(q, k) for q in range(n) for k in (q - 1, q) if k >= 0},
            "random": {(q, k) for q in range(n) for k in range(n) if q == k or rng.random() < .3},
            "everything": {(q, k) for q in range(n) for k in range(n)},
        }
        for name, pairs in reach.items():
            plan = ShardPlan(world, 4, held, frozenset(pairs), n * n - len(pairs))
            queues = [_posted(plan, r, monkeypatch) for r in range(world)]
            assert _runs_in_order(queues), (order, name)
