"""Per-program values (lowering/uniform.py): what counts as uniform, the rewrites that move work
off the tiles, and that they keep the value (the reference evaluator is the judge)."""
from __future__ import annotations

import torch

import attnc
from attnc.lowering.derivative import SEED
from attnc.lowering.emit_backward import emit_backward
from attnc.lowering.evaluate import Env, Evaluator
from attnc.lowering.ir import Node, const, walk
from attnc.lowering.uniform import is_uniform, strength_reduce, uniform_roots

Q, K = Node("index", "int", (), "q"), Node("index", "int", (), "k")
H = Node("index", "int", (), "h")
SCORE = Node("score", "float", (), None)


def f(op, *args):
    return Node(op, "float", tuple(args))


def load(name, *idx):
    return Node("load", "float", tuple(idx), name)


def cast(n):
    return Node("cast", "float", (n,))


def test_what_is_uniform():
    assert is_uniform(load("slopes", H)) and is_uniform(f("mul", const(2.0), load("s", H)))
    assert not is_uniform(cast(Q)) and not is_uniform(SCORE) and not is_uniform(SEED)
    assert not is_uniform(load("table", Q))


def test_division_by_a_uniform_value_becomes_a_reciprocal_multiply():
    e = f("div", cast(Node("sub", "int", (Q, K))), load("w", H))
    out = strength_reduce(e)
    assert out.op == "mul" and out.args[1] == f("div", const(1.0), load("w", H))
    varying = f("div", load("w", H), cast(Q))  # a varying divisor stays a division
    assert strength_reduce(varying) == varying
    zero = f("div", cast(Q), const(0.0))
    assert strength_reduce(zero) == zero


def test_uniform_factors_of_a_product_are_gathered():
    e = f("neg", f("mul", f("mul", f("mul", SEED, SCORE), load("alpha", H)),
                   f("mul", const(2.0), load("sigma", H))))
    out = strength_reduce(e)
    assert out.op == "mul" and is_uniform(out.args[1]) and not is_uniform(out.args[0])
    varying_muls = [n for n in walk(out.args[0]) if n.op == "mul"]
    assert len(varying_muls) == 1  # g * score: one tile multiply left, not four


def test_rewrites_keep_the_value():
    g = torch.Generator().manual_seed(0)
    tensors = {"w": 0.5 + torch.rand(3, generator=g, dtype=torch.float64),
               "alpha": torch.rand(3, generator=g, dtype=torch.float64),
               "sigma": 1 + torch.rand(3, generator=g, dtype=torch.float64)}
    d2 = cast(Node("mul", "int", (Node("sub", "int", (Q, K)), Node("sub", "int", (Q, K)))))
    exprs = [f("div", d2, load("w", H)),
             f("mul", SCORE, f("exp", f("div", f("neg", d2), f("mul", const(2.0), f("mul", load("sigma", H), load("sigma", H)))))),
             f("neg", f("mul", f("mul", SCORE, load("alpha", H)), f("div", d2, load("sigma", H))))]
    sizes = dict(batch=1, heads=3, kv_heads=3, q_len=7, k_len=9, head_dim=4)
    env = Env(sizes, {}, tensors, torch.float64, "cpu", 0, 7, 1, 3, 9)
    score = torch.randn(1, 3, 7, 9, generator=g, dtype=torch.float64)
    for e in exprs:
        got = []
        for x in (e, strength_reduce(e)):
            ev = Evaluator(env)
            ev.volatile[("score", None)] = score
            got.append(ev.eval(x))
        torch.testing.assert_close(got[1], got[0], rtol=1e-12, atol=0)


def test_uniform_roots_are_the_largest_uniform_parts_and_shared_loads():
    s = load("sigma", H)
    recip = f("div", const(1.0), f("mul", const(2.0), f("mul", s, s)))
    e1 = f("exp", f("mul", cast(Q), recip))
    e2 = f("mul", SCORE, s)
    roots = uniform_roots([e1, e2])
    assert recip in roots and s in roots
    assert f("mul", s, s) not in roots  # inside the reciprocal only: printed there


def test_the_gaussian_mixture_backward_divides_per_program_only():
    """The symbolic derivative of `exp(-d2 / (2 σ²))` divides by σ-expressions; printed, every
    division is of per-program values, computed once before the tile math."""
    p = attnc.std("gaussian_mixture")
    src = emit_backward(p.ir, {"width": 10, "n": 2}, ("alpha", "sigma")).source
    body = src.split("def _score_grad_acc")[1].split("@triton.jit")[0]
    tile_lines = [ln for ln in body.splitlines() if "g_adj =" in ln or ln.strip().startswith("g =")]
    assert tile_lines and not any("/" in ln for ln in tile_lines)
    assert body.count("tl.load(tns_sigma") == 2  # one per mixture component, hoisted
