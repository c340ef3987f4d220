"""Differential fuzzing: random patterns and inputs, checked against the reference semantics.

A *case* is a pattern (`.attn` text) plus everything needed to call it: shapes, dtype, tile
shape, parameter values and a seed for q, k, v and tensor arguments. `check_case` runs the
properties of issue 6 on one case:

- ``compile``    a well-typed generated pattern parses, checks and lowers;
- ``roundtrip``  `parse(print(ast)) == ast`, and the printed text is a fixed point;
- ``robustness`` mutations of the text only ever raise `SpecError`, each in under a second;
- ``layout``     the block layout (and its closed form) is sound against the dense mask;
- ``kernel``     the generated kernel agrees with an fp64 reference: outputs and LSE within a
                 tolerance scaled by the same-dtype reference's own error, identical fully
                 masked rows;
- ``grad``       the generated backward kernels agree with autograd through the fp64 reference:
                 dQ, dK, dV and float tensor-argument gradients of a random linear loss on the
                 output and LSE, within the same dtype-scaled tolerance (rows decided by a near
                 top-k tie carry no loss).

Hypothesis generates the cases (`cases()`) and shrinks a failure over the pattern AST and the
inputs; `save_reproducer` writes the minimal case as `NAME.attn` + `NAME.json` (the corpus
format replayed by tests/test_fuzz.py), and `replay` runs a saved case again.

The package, one module per role (hypothesis, a test dependency, is needed from here on only:
`import attnc` and the other commands never import this package):

- `case`         `Case`, the `Profile`s, the hypothesis strategy `cases()`, `inputs`;
- `outcomes`     `PropertyFailure`, `Rejected`, `Unsupported`, `Stats`;
- `properties`   the front-end and layout properties, and `check_case`;
- `differential` the `kernel` and `grad` properties (tolerances, fragile top-k rows);
- `engine`       `search`: hypothesis over cases, finding and shrinking a failure;
- `corpus`       reproducer files: save, load, replay;
- `interpreter`  whether kernels can run here, and the re-run under Triton's interpreter;
- `driver`       the command line.

Command line (see docs/testing.md)::

    python -m attnc.runtime.fuzz [FILE] [--name P] [--seconds N] [--seed S]
                                 [--backend triton|reference] [--max-patterns N]

Cases a pattern's own semantics refuses (the reference raises `SpecError`/`ValueError` at call
time, e.g. a tensor index out of range) are *rejected*, counted and not failures. A kernel that
refuses a case cleanly with a `SpecError` naming the construct is counted as *unsupported*.
"""
from __future__ import annotations

try:
    import hypothesis  # noqa: F401  (a test extra; `attnc` itself never imports this package)
except ModuleNotFoundError as e:
    if e.name != "hypothesis":
        raise
    raise ModuleNotFoundError("the fuzzer needs hypothesis, a test dependency: pip install 'attnc[test]'",
                              name="hypothesis") from None

from .case import CI_CHEAP, CI_KERNEL, DTYPES, LONG, PROFILES, SUPPORTED_TILES, Case, Profile, cases, inputs
from .corpus import load_reproducer, replay, save_reproducer
from .differential import TOLERANCE, TOPK_MARGIN, check_grad, check_kernel
from .driver import main
from .engine import hypothesis_settings, search
from .interpreter import kernel_backend_ready
from .outcomes import PROPERTIES, PropertyFailure, Rejected, Stats, Unsupported
from .properties import ODD_TILES, check_case, check_compile, check_layout, check_robustness, check_roundtrip

__all__ = ["CI_CHEAP", "CI_KERNEL", "DTYPES", "LONG", "ODD_TILES", "PROFILES", "PROPERTIES", "SUPPORTED_TILES",
           "TOLERANCE", "TOPK_MARGIN", "Case", "Profile", "PropertyFailure", "Rejected", "Stats", "Unsupported",
           "cases", "check_case", "check_compile", "check_grad", "check_kernel", "check_layout",
           "check_robustness", "check_roundtrip", "hypothesis_settings", "inputs", "kernel_backend_ready",
           "load_reproducer", "main", "replay", "save_reproducer", "search"]
