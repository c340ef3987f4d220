"""Kernel emission (skeleton holes, determinism, spec comments), the JIT cache, backend choice,
and Triton errors reported as SpecErrors at the spec line."""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import threading

import pytest
import torch

import attnc
from attnc.lowering import emit, ops
from attnc.lowering.triton_forms import Call
from attnc.runtime import dispatch, jit

SOFTCAP = "# a test pattern\npattern capped(cap: float = 20.0):\n    mask q >= k\n    score = cap * tanh(score / cap)\n"


@pytest.fixture(autouse=True)
def cache_dir(kernel_cache_dir):
    return kernel_cache_dir


def small_qkv(L=20, D=16):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 1, L, D, generator=g) for _ in range(3))


# --------------------------------------------------------------------------- holes


def test_fill_indents_multiline_holes():
    text = "def f():\n    {{BODY}}\n    return {{X}}\n"
    assert emit.fill(text, {"BODY": "a = 1\nb = 2", "X": "a + b"}) == \
        "def f():\n    a = 1\n    b = 2\n    return a + b\n"


def test_fill_rejects_unknown_and_unused_holes():
    with pytest.raises(ValueError, match="without a value: \\['Y'\\]"):
        emit.fill("{{X}} {{Y}}", {"X": "1"})
    with pytest.raises(ValueError, match="values without a hole: \\['Z'\\]"):
        emit.fill("{{X}}", {"X": "1", "Z": "2"})


def test_skeleton_holes_are_all_filled():
    src = attnc.std("alibi").triton_source()
    assert "{{" not in src and "}}" not in src


# --------------------------------------------------------------------------- generated text


def test_generated_text_is_deterministic_and_points_at_the_spec():
    p = attnc.compile(SOFTCAP, path="capped.attn")
    a, b = p.triton_source(), attnc.compile(SOFTCAP, path="capped.attn").triton_source()
    assert a == b
    # the per-program reciprocal is computed once, the tile multiplies (lowering/uniform.py)
    assert "s0 = 1.0 / prm_cap  # capped.attn:4" in a
    assert "score = prm_cap * _tanh(score * s0)  # capped.attn:4" in a
    assert "keep0 = q >= k  # capped.attn:3" in a
    compile(a, "<generated>", "exec")  # valid Python


def test_int_parameters_are_specialized_floats_are_arguments():
    p = attnc.std("streaming")
    src = p.triton_source(window=77, sinks=5)
    assert "77" in src and "window" not in src.split("def _mask_mod")[1].split("@triton.jit")[0]
    assert "prm_cap" in attnc.std("softcap").triton_source(cap=3.0)
    assert attnc.std("softcap").triton_source(cap=3.0) == attnc.std("softcap").triton_source(cap=9.0)
    with pytest.raises(attnc.SpecError, match="no parameter or tensor `windw`"):
        p.triton_source(windw=3)


def test_precedence_and_python_floor_semantics_in_printed_code():
    p = attnc.compile("pattern e:\n    mask (q - k) % 3 == 0 and not (q < k or k // 2 > 5)\n")
    src = p.triton_source()
    assert "_mod(q - k, 3) == 0" in src  # a possibly negative operand needs Python semantics
    assert "~((q < k) | (k // 2 > 5))" in src  # k >= 0: C and Python agree, plain `//`


def test_sum_must_have_a_static_count():
    p = attnc.compile("pattern s:\n    score += sum(0.1 * i for i in range(q_len))\n")
    with pytest.raises(attnc.SpecError, match="range of `sum` must be known"):
        p.triton_source()


# --------------------------------------------------------------------------- cache


def test_modules_are_written_once_and_reloaded_from_disk(cache_dir):
    p = attnc.compile(SOFTCAP)
    first = jit.forward_kernel(p.ir, {})
    assert os.path.dirname(first.path) == str(cache_dir)
    assert os.path.basename(first.path).startswith("attnc_")
    with open(first.path) as f:
        assert f.read() == first.kernel.source
    assert jit.forward_kernel(p.ir, {}) is first  # memory hit
    jit.clear_memory_cache()
    hits = jit.STATS.disk_hits
    again = jit.forward_kernel(p.ir, {})
    assert again.path == first.path and jit.STATS.disk_hits == hits + 1
    assert [f for f in os.listdir(cache_dir) if f.startswith(".tmp")] == []


def test_cache_key_covers_specialization_and_versions(monkeypatch):
    p = attnc.std("streaming")
    a = jit.forward_kernel(p.ir, {"window": 10, "sinks": 1}).path
    b = jit.forward_kernel(p.ir, {"window": 11, "sinks": 1}).path
    assert a != b
    src = p.triton_source(window=10, sinks=1)
    key = jit.module_key(src)
    monkeypatch.setattr(jit, "versions", lambda: "attnc 0.0.0 / triton 0.0.0")
    assert jit.module_key(src) != key


def test_threads_share_one_module():
    p = attnc.compile(SOFTCAP)
    before = jit.STATS.generated
    results = []
    threads = [threading.Thread(target=lambda: results.append(jit.forward_kernel(p.ir, {}))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in results}) == 1 and jit.STATS.generated == before + 1


def test_processes_share_the_cache_directory(cache_dir):
    code = ("import attnc\nfrom attnc.runtime import jit\n"
            f"p = attnc.compile({SOFTCAP!r})\n"
            "for _ in range(20):\n    jit.clear_memory_cache(); c = jit.forward_kernel(p.ir, {})\n"
            "print(c.path)\n")
    env = dict(os.environ, ATTNC_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    paths = {pr.communicate(timeout=120)[0].strip() for pr in procs}
    assert all(pr.returncode == 0 for pr in procs)
    assert len(paths) == 1
    files = os.listdir(cache_dir)
    assert [f for f in files if f.startswith(".tmp")] == []
    assert len([f for f in files if f.endswith(".py")]) == 1


# --------------------------------------------------------------------------- errors and backends


def test_triton_failure_is_a_spec_error_at_the_spec_line(monkeypatch):
    monkeypatch.setitem(ops.TABLE, "tanh", dataclasses.replace(ops.TABLE["tanh"], triton=Call("tl.no_such_function")))
    p = attnc.compile(SOFTCAP, path="capped.attn")
    q, k, v = small_qkv()
    with pytest.raises(attnc.SpecError) as info:
        p(q, k, v, backend="triton")
    err = info.value
    assert err.span.line == 4 and err.span.source.path == "capped.attn"
    assert "Triton could not compile" in err.message
    assert "generated kernel: " in str(err) and "attnc_" in str(err)
    assert "score = cap * tanh(score / cap)" in str(err)  # the spec line with a caret


def test_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = small_qkv()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attnc.std("causal")(q, k, v, backend="triton")


def test_auto_backend_uses_the_reference_on_cpu(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("the Triton backend was chosen for CPU tensors")
    monkeypatch.setattr(dispatch, "triton_attention", fail)
    q, k, v = small_qkv()
    attnc.std("causal")(q, k, v)


def test_float64_is_refused_with_a_hint():
    q, k, v = (t.double() for t in small_qkv())
    with pytest.raises(ValueError, match="backend='reference'"):
        attnc.std("causal")(q, k, v, backend="triton")
