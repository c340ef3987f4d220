"""Golden generated code: every change to emission is a diff a reviewer reads.

`tests/golden/kernels/NAME.ir.txt` holds the lowered IR of a standard pattern, `NAME.forward.txt`
and `NAME.backward.txt` the generated forward and backward modules (the backward with the
gradients of every float tensor argument). `pytest --update-golden` rewrites them after an
intended change; read the diff before committing it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import attnc
from attnc.lowering.derivative import differentiable_tensors
from attnc.lowering.emit import emit_forward
from attnc.lowering.emit_backward import emit_backward
from attnc.runtime.binding import specialization_of
from attnc.runtime.samples import pattern_parameters

GOLDEN = Path(__file__).parent / "golden" / "kernels"
#: the patterns; their kernels are specialized on the shared sample arguments (runtime/samples.py)
PATTERNS = ("causal", "document", "gaussian_mixture", "learned_sinks", "sigmoid", "streaming", "topk")


@pytest.mark.parametrize("name", PATTERNS)
def test_generated_code_matches_golden(name, golden):
    p = attnc.std(name)
    spec = specialization_of(p.ir, pattern_parameters(p.ir))
    golden.check(GOLDEN / f"{name}.ir.txt", p.ir_text())
    golden.check(GOLDEN / f"{name}.forward.txt", emit_forward(p.ir, spec).source)
    wrt = tuple(differentiable_tensors(p.ir))
    golden.check(GOLDEN / f"{name}.backward.txt", emit_backward(p.ir, spec, wrt).source)


def test_every_golden_file_belongs_to_a_pattern():
    """A pattern dropped from the list takes its golden files with it."""
    expected = {f"{n}.{kind}.txt" for n in PATTERNS for kind in ("ir", "forward", "backward")}
    assert {p.name for p in GOLDEN.glob("*.txt")} <= expected
