"""`require cond`: constraints on parameters and sizes, checked when a call binds its arguments.

A require reads only parameters, sizes, literals and lets of those (a check-time SpecError
otherwise); a call that breaks one raises a SpecError at the statement with the values of the
names it reads. It is checked when a call's plan is made, so a cached call pays nothing for it,
and a call that fails is never cached.
"""
from __future__ import annotations

import pytest
import torch

import attnc
from attnc.dsl.parser import parse
from attnc.dsl.printer import print_module
from attnc.runtime import binding

WINDOW = ("pattern p(window: int = 4):\n"
          "    require window > 0\n"
          "    mask q >= k and q - k < window\n")


def _qkv(L=12, H=2, D=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, L, D, generator=g) for _ in range(3)]


def _error(fn) -> attnc.SpecError:
    with pytest.raises(attnc.SpecError) as info:
        fn()
    return info.value


# --------------------------------------------------------------------------- text and IR

def test_require_round_trips_through_the_printer():
    src = ("pattern p(n: int = 3, t: float = 1.0):\n"
           "    require 0 < n <= q_len and (t > 0.5 or not n % 2 == 0)\n"
           "    mask q >= k\n")
    m = parse(src)
    assert print_module(m) == src
    assert parse(print_module(m)) == m


def test_require_is_part_of_the_ir_and_its_digest():
    with_req = attnc.compile(WINDOW)
    without = attnc.compile(WINDOW.replace("    require window > 0\n", ""))
    other = attnc.compile(WINDOW.replace("window > 0", "window > 1"))
    assert "require ($window > 0)" in with_req.ir_text()
    assert len({with_req.digest, without.digest, other.digest}) == 3
    assert with_req.ir != without.ir


def test_a_require_that_always_holds_is_dropped_and_duplicates_are_checked_once():
    p = attnc.compile("import std.sliding_window\n"
                      "pattern p(w: int = 8):\n"
                      "    require head_dim > 0 or true\n"
                      "    use sliding_window(window = w)\n"
                      "    use sliding_window(window = w)\n", path="dup.attn")
    assert len(p.ir.requires) == 1
    assert attnc.compile("import std.sliding_window\npattern p:\n    use sliding_window(window = 3)\n").ir.requires == ()


# --------------------------------------------------------------------------- checking

@pytest.mark.parametrize("cond,where", [
    ("q < window", "q"), ("k > 0", "k"), ("b == 0", "b"), ("h < heads", "h"),
    ("score > 0.0", "score"), ("t[0] > 0.0", "t[0]"), ("d > 0", "d")])
def test_require_may_not_read_positions_scores_or_tensors(cond, where):
    src = ("pattern p(window: int = 4):\n"
           "    tensor t: float[heads]\n"
           "    let d = q - k\n"
           f"    require {cond}\n"
           "    mask q >= k\n")
    err = _error(lambda: attnc.compile(src, path="r.attn"))
    assert len(err.diagnostics) == 1, err.render()
    d = err.diagnostics[0]
    assert (d.span.line, d.span.col) == (4, 13)
    assert "only parameters, sizes, literals and lets of those" in d.message or "`score` can be used only" in d.message
    if where != "score":
        assert "mask" in d.hint


def test_require_must_be_a_boolean():
    err = _error(lambda: attnc.compile("pattern p(n: int = 1):\n    require n\n    mask q >= k\n"))
    assert "must be a boolean" in err.message


def test_require_may_read_lets_of_parameters_and_sizes():
    p = attnc.compile("pattern p(window: int = 4):\n"
                      "    let span = 2 * window\n"
                      "    require span <= q_len\n"
                      "    mask q - k < window\n", path="let.attn")
    q, k, v = _qkv(L=8)
    p(q, k, v)  # 8 <= 8
    err = _error(lambda: p(q, k, v, window=5))
    assert err.message == "require failed: span <= q_len with span = 10, q_len = 8"


# --------------------------------------------------------------------------- calls

def test_a_failing_require_is_a_spec_error_at_the_statement_with_the_values():
    p = attnc.compile(WINDOW, path="w.attn")
    q, k, v = _qkv()
    err = _error(lambda: p(q, k, v, window=-1))
    assert str(err.span) == "w.attn:2:5"
    assert err.message == "require failed: window > 0 with window = -1"
    assert "^~~~~~~~~~~~~~~~~~" in err.render()


def test_requires_on_sizes_and_float_parameters():
    p = attnc.compile("pattern p(tau: float = 1.0):\n"
                      "    require q_len % 4 == 0 and k_len >= q_len\n"
                      "    require tau != 0.0\n"
                      "    score /= tau\n", path="s.attn")
    q, k, v = _qkv(L=12)
    p(q, k, v, tau=0.5)
    q2, k2, v2 = _qkv(L=10)
    err = _error(lambda: p(q2, k2, v2))
    assert err.message == "require failed: q_len % 4 == 0 and k_len >= q_len with q_len = 10, k_len = 10"
    assert _error(lambda: p(q, k, v, tau=0.0)).message == "require failed: tau != 0.0 with tau = 0.0"


def test_require_is_checked_when_the_plan_is_made_not_on_every_call(monkeypatch):
    calls = []
    check = binding.check_requires
    monkeypatch.setattr(binding, "check_requires", lambda *a: calls.append(1) or check(*a))
    p = attnc.compile(WINDOW)
    q, k, v = _qkv()
    for _ in range(3):
        p(q, k, v, window=3)
    assert len(calls) == 1  # the cached plan is not re-checked
    for _ in range(2):  # a failing call makes no plan: the second one with the bad value raises too
        with pytest.raises(attnc.SpecError, match="require failed"):
            p(q, k, v, window=0)
    assert len(calls) == 3
    p(q, k, v, window=3)
    assert len(calls) == 3


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_require_is_checked_on_every_backend_before_any_kernel(backend):
    # before the backend is even looked at: also without a GPU or Triton's interpreter
    q, k, v = _qkv()
    with pytest.raises(attnc.SpecError, match="require failed: window > 0 with window = 0"):
        attnc.std("sliding_window")(q, k, v, window=0, backend=backend)


def test_require_is_checked_by_layout():
    with pytest.raises(attnc.SpecError, match="require failed: window > 0"):
        attnc.std("sliding_window").layout(q_len=64, window=-3)


def test_require_is_checked_under_torch_compile_with_dynamic_lengths():
    p = attnc.compile("pattern p:\n    require q_len % 2 == 0\n    mask q >= k\n", path="even.attn")
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: p(q, k, v), fullgraph=True, backend="aot_eager",
                             dynamic=True)
    q, k, v = _qkv(L=8)
    torch.testing.assert_close(compiled(q, k, v), p(q, k, v))
    q, k, v = _qkv(L=9)
    with pytest.raises(attnc.SpecError, match="require failed: q_len % 2 == 0 with q_len = 9"):
        compiled(q, k, v)


# --------------------------------------------------------------------------- through `use`

def test_a_require_brought_in_by_use_names_the_use():
    p = attnc.compile("import std.sliding_window\n"
                      "pattern p(w: int = 3):\n"
                      "    use sliding_window(window = w - 4)\n", path="u.attn")
    q, k, v = _qkv()
    err = _error(lambda: p(q, k, v))
    assert err.message == "require failed: window > 0 with window = -1"
    assert str(err.span).endswith("sliding_window.attn:10:5")
    assert err.diagnostics[0].hint == "required by the `use` at u.attn:3:5"
    p(q, k, v, w=5)


def test_a_use_that_can_never_meet_a_require_is_an_error_when_loaded():
    err = _error(lambda: attnc.compile("import std.sliding_window\n"
                                       "pattern p:\n"
                                       "    use sliding_window(window = 0)\n", path="z.attn"))
    assert err.message == "require failed: window > 0 with window = 0"
    assert err.diagnostics[0].hint == "required by the `use` at z.attn:3:5"


# --------------------------------------------------------------------------- the stdlib

STDLIB_BREAKS = [
    ("sliding_window", dict(window=-1)), ("sliding_window", dict(window=0)),
    ("streaming", dict(window=0)), ("streaming", dict(sinks=-1)),
    ("chunked", dict(chunk=0)), ("dilated", dict(dilation=0)), ("dilated", dict(window=0)),
    ("strided", dict(stride=0)), ("strided_fixed", dict(stride=8, summary=9)),
    ("strided_fixed", dict(summary=-1)), ("prefix_lm", dict(prefix=-1)),
    ("longformer", dict(window=0)), ("topk", dict(top=0)), ("temperature", dict(tau=0.0)),
    ("softcap", dict(cap=-1.0)), ("alibi_2d", dict(width=0)),
    ("gaussian_mixture", dict(width=4, n=0)), ("gaussian_mixture", dict(width=-4)),
    ("relative_bias", dict(max_distance=-1)),
    ("neighborhood_2d", dict(height=4, width=4, kernel=2)),
    ("neighborhood_2d", dict(height=4, width=4, kernel=5)),
    ("neighborhood_2d", dict(height=4, width=4, kernel=3, dilation=0)),
]


@pytest.mark.parametrize("name,args", STDLIB_BREAKS, ids=lambda x: str(x))
def test_the_stdlib_states_its_constraints(name, args):
    p = attnc.std(name)
    q, k, v = _qkv(L=16)
    # tensors of any shape: the requires are checked before the tensors' shapes
    tensors = {t.name: torch.zeros(1, dtype={"int": torch.long, "bool": torch.bool}.get(t.elem, torch.float))
               for t in p.tensors}
    with pytest.raises(attnc.SpecError, match="require failed") as info:
        p(q, k, v, **args, **tensors)
    assert str(info.value.span).endswith(f"{name}.attn:{info.value.span.line}:5")


def test_document_masks_need_every_key_labelled():
    """`document` labels queries and keys with one id table: with more keys than queries it
    takes an id for every key."""
    q, _, _ = _qkv(L=8)
    _, k, v = _qkv(L=10)
    with pytest.raises(ValueError, match=r"`doc` must have shape \[batch, max\(q_len, k_len\)\] = \[1, 10\]"):
        attnc.std("document")(q, k, v, doc=torch.zeros(1, 8, dtype=torch.long))
    attnc.std("document")(q, k, v, doc=torch.zeros(1, 10, dtype=torch.long))


def test_sliding_window_with_a_negative_window_no_longer_returns_zeros():
    q, k, v = _qkv()
    with pytest.raises(attnc.SpecError):
        attnc.std("sliding_window")(q, k, v, window=-1)


def test_a_require_may_sum_over_a_static_range_but_not_read_the_loop_variable():
    p = attnc.compile("pattern p(n: int = 3):\n"
                      "    require sum(n for i in range(n)) < q_len\n"
                      "    mask q >= k\n", path="sum.attn")
    q, k, v = _qkv(L=12)
    p(q, k, v, n=3)  # 9 < 12
    err = _error(lambda: p(q, k, v, n=4))  # 16
    assert err.message == "require failed: sum(n for i in range(n)) < q_len with n = 4, q_len = 12"
    # a loop variable is not a parameter or size: a sum over it is known only when the kernel runs
    err = _error(lambda: attnc.compile("pattern p(n: int = 3):\n"
                                       "    require sum(i for i in range(n)) < q_len\n"
                                       "    mask q >= k\n"))
    assert "may use only parameters, sizes, literals and lets of those" in err.message
