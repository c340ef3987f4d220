"""The op table (lowering/ops.py) and IR validity (lowering/verify.py).

The proof that an op's meaning lives in one place: a throwaway function `cube` declared in
`dsl/types.py` and registered in the op table at test time, and nothing else, parses, checks,
folds, runs in the reference, differentiates, is bounded by the analysis and prints to Triton
(and runs there, under the interpreter) — then is gone again.
"""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attnc
from attnc.dsl import types as T
from attnc.lowering import ops
from attnc.lowering.bounds import Evaluator as Bounds
from attnc.lowering.derivative import SEED, statement_grad
from attnc.lowering.evaluate import Env, Evaluator
from attnc.lowering.intervals import Iv
from attnc.lowering.ir import Node, PatternIR, const
from attnc.lowering.triton_forms import Call
from attnc.lowering.verify import verify, verify_expr

CUBED = """pattern cubed(a: float = 0.5):
    score = cube(score * a) + cube(2.0)
    mask cube(q - k) >= 0.0
"""


def _f(op, *args):
    return Node(op, "float", args)


CUBE = ops.Op(
    "cube", 1, ops.floats,
    fold=lambda x: x ** 3,
    torch=lambda x: x * x * x,
    interval=ops.increasing(lambda x: x ** 3),
    derivative=lambda n, g: (_f("mul", g, _f("mul", const(3.0), _f("mul", n.args[0], n.args[0]))),),
    triton=Call("_cube"),
    helper="@triton.jit\ndef _cube(x):\n    return x * x * x\n")


@contextlib.contextmanager
def defined(name: str, function: T.Function, op: ops.Op):
    """`name` as a function of the language and an IR op, for the duration of the block."""
    T.define_function(name, function)
    ops.register(op)
    try:
        yield
    finally:
        ops.unregister(name)
        T.undefine_function(name)


def _qkv(L=24, D=16):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, L, D, generator=g) for _ in range(3))


def test_a_registered_unary_function_works_in_every_pass(kernel_cache_dir):
    with defined("cube", T.Function(1, 1, "float"), CUBE):
        p = attnc.compile(CUBED)  # parses, checks, lowers, verifies

        score, mask = p.ir.scores[0], p.ir.masks[0]
        assert score.args[1] == const(8.0)  # folded: cube(2.0)

        q, k, v = _qkv()
        s = (q @ k.transpose(-1, -2)) / 4.0
        keep = torch.arange(24).view(-1, 1) >= torch.arange(24).view(1, -1)
        want = torch.softmax(torch.where(keep, (s * 0.5) ** 3 + 8.0, -torch.inf), -1) @ v
        torch.testing.assert_close(p(q, k, v, backend="reference"), want)

        grad = statement_grad(score)  # d/ds (cube(s a) + 8) = 3 (s a)^2 a
        env = Env({}, {"a": 0.5, SEED.value: 1.0}, {}, torch.float64, torch.device("cpu"), 0, 24, 1, 2, 24)
        ev = Evaluator(env)
        s64 = s.double()
        ev.volatile[("score", None)] = s64
        torch.testing.assert_close(ev.eval(grad.d_score).expand_as(s64), 3 * (s64 * 0.5) ** 2 * 0.5)

        box = {"q": Iv(torch.tensor(0.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)),
               "k": Iv(torch.tensor(5.0, dtype=torch.float64), torch.tensor(6.0, dtype=torch.float64))}
        bounds = Bounds(box, "cpu").eval(mask.args[0])
        assert (float(bounds.lo), float(bounds.hi)) == (-216.0, -8.0)
        counts = p.layout(q_len=64, block=16).counts()
        assert (counts["empty"], counts["partial"], counts["full"]) == (6, 4, 6)

        src = p.triton_source()
        assert "def _cube(x):" in src and "_cube(score * prm_a) + 8.0" in src
        torch.testing.assert_close(p(q, k, v, backend="triton"), want, atol=2e-3, rtol=2e-3)

    assert "cube" not in ops.TABLE and "cube" not in T.FUNCTIONS and "_cube" not in ops.triton_helpers()
    with pytest.raises(attnc.SpecError, match="unknown function `cube`"):
        attnc.compile("pattern again:\n    score = cube(score)\n")


def test_a_missing_rule_fails_loudly_naming_the_op():
    bare = ops.Op("bare", 1, ops.floats)
    with defined("bare", T.Function(1, 1, "float"), bare):
        p = attnc.compile("pattern p:\n    score = bare(score) + bare(1.0)\n    mask bare(q - k) >= 0.0\n")
        assert "bare(1.0)" in repr(p.ir.scores[0])  # no fold rule: left for run time
        with pytest.raises(attnc.SpecError, match="IR op `bare` has no torch rule"):
            p(*_qkv(), backend="reference")
        with pytest.raises(attnc.SpecError, match="IR op `bare` has no triton rule"):
            p.triton_source()
        with pytest.raises(attnc.SpecError, match="IR op `bare` has no derivative rule"):
            statement_grad(p.ir.scores[0])
        lay = p.layout(q_len=64, block=16)  # no interval rule: unbounded, and said so
        assert lay.counts()["partial"] == 16 and any("uses `bare`" in n for n in lay.notes)


def test_every_function_of_the_language_is_an_op():
    assert set(T.FUNCTIONS) - {"clamp"} <= set(ops.TABLE)  # clamp lowers to min and max


def test_only_environment_reading_ops_lack_a_torch_rule():
    compound = {name for name, op in ops.TABLE.items() if op.arity != 0}
    loops = {"sum", "any", "all"}  # evaluated and printed by unrolling
    assert {name for name in compound if ops.TABLE[name].torch is None} == {"load", "cast"} | loops
    assert {name for name in compound if ops.TABLE[name].triton is None} == {"load"} | loops


def test_registering_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        ops.register(ops.TABLE["exp"])
    with pytest.raises(ValueError, match="already defined"):
        T.define_function("exp", T.FUNCTIONS["exp"])


def test_monotone_interval_rules():
    lo, hi = torch.tensor([-2.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 2.0], dtype=torch.float64)
    up = ops.increasing(torch.exp)(None, Iv(lo, hi))
    down = ops.decreasing(torch.neg)(None, Iv(lo, hi))
    assert torch.equal(up.lo, lo.exp()) and torch.equal(up.hi, hi.exp())
    assert torch.equal(down.lo, -hi) and torch.equal(down.hi, -lo)


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("node, message", [
    (Node("frobnicate", "int"), "IR op `frobnicate` is not in the op table"),
    (Node("add", "int", (const(1), const(1.0))), "`add` of \\(int, float\\) gives nothing"),
    (Node("exp", "float", (const(1),)), "`exp` of \\(int\\) gives nothing"),
    (Node("lt", "int", (const(1), const(2))), "`lt` of \\(int, int\\) gives bool, but this node is int"),
    (Node("neg", "int", (const(1), const(2))), "`neg` takes 1 argument"),
    (Node("where", "float", (const(1), const(1.0), const(2.0))), "`where` of \\(int, float, float\\)"),
])
def test_verify_rejects_ill_formed_expressions(node, message):
    with pytest.raises(attnc.SpecError, match="internal: .*" + message):
        verify_expr(node)


def test_verify_checks_a_pattern_against_its_declarations():
    p = attnc.std("alibi").ir
    assert verify(p) is p
    q_lt_k = Node("lt", "bool", (Node("index", "int", (), "q"), Node("index", "int", (), "k")))
    as_score = PatternIR("bad", (), (), (q_lt_k,), ())
    with pytest.raises(attnc.SpecError, match="a score is bool, not float"):
        verify(as_score)
    undeclared = PatternIR("bad", (), (), (Node("param", "float", (), "t"),), ())
    with pytest.raises(attnc.SpecError, match="parameter `t` is float, declared nowhere"):
        verify(undeclared)
    unread = PatternIR("bad", (), (), (Node("load", "float", (const(0),), "w"),), ())
    with pytest.raises(attnc.SpecError, match="tensor `w` does not match its declaration"):
        verify(unread)


def test_derivatives_of_every_stdlib_pattern_verify():
    for name in attnc.std_names():
        for s in attnc.std(name).ir.scores:
            grad = statement_grad(s)  # verifies its results
            verify_expr(grad.d_score)
