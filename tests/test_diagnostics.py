"""Diagnostics: every mistake a user can make gives one clear error at the right place.

Each `tests/golden/diagnostics/NAME.attn` holds a spec with one mistake; `NAME.txt` holds the
rendered error (`file:line:col: error: ...`, the source line, a caret, a hint). Run
`pytest --update-golden` to rewrite the `.txt` files after an intended change, and read the diff.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attnc.runtime.binding import ArgumentError
from spec_errors import check_golden_error, golden_error

import attnc

GOLDEN = Path(__file__).parent / "golden" / "diagnostics"

# name -> (line, column) where the one error must point; None: an error with no position
SPEC_ERRORS = {
    "unknown_name": (2, 15),
    "mask_not_bool": (2, 10),
    "bool_score": (2, 13),
    "default_type_mismatch": (1, 20),
    "inconsistent_indent": (3, 3),
    "missing_colon": (1, 27),
    "topk_float": (3, 17),
    "unknown_function": (2, 10),
    "wrong_arity": (2, 14),
    "tensor_rank": (3, 14),
    "use_cycle": (2, 5),
    "import_nonexistent": (1, 1),
    "duplicate_pattern": (4, 9),
    "empty_file": (1, 1),
    "no_pattern": (1, 1),
    "int_overflow": (2, 18),
    "ambiguous_let": (8, 14),
    "use_positional_after_keyword": (5, 20),
    # keywords are reserved: the caret is under the keyword spelled as a name
    "keyword_as_let": (2, 9),
    "keyword_true_as_let": (2, 9),
    "keyword_as_pattern": (1, 9),
    "keyword_as_parameter": (1, 11),
    # operators of other languages get the word this one spells them with
    "ampersands_for_and": (2, 17),
    "pipes_for_or": (2, 17),
    "bang_for_not": (2, 10),
    "assign_for_compare": (2, 16),
    # `require`: a condition on parameters and sizes only, bool, true for some call
    "require_reads_index": (2, 13),
    "require_not_bool": (2, 13),
    "require_never_holds": (3, 5),
    # bit operators take ints; `any` / `all` take booleans, `sum` numbers
    "bitand_on_bools": (2, 10),
    "invert_bool": (2, 10),
    "shift_count_not_static": (2, 26),
    "any_of_numbers": (2, 14),
    "sum_of_booleans": (2, 14),
    # a parameter or tensor cannot take the name of a keyword the call takes itself
    "reserved_keyword_parameter": (1, 16),
    "reserved_keyword_tensor": (3, 12),
    # a pattern called in a mask, `P(args)`: only in masks, only a mask-only pattern, args as `use`
    "pattern_call_has_score": (6, 10),
    "pattern_call_outside_mask": (4, 19),
    "pattern_call_shadowed": (4, 10),
    "pattern_call_positional_after_keyword": (4, 34),
    "pattern_call_missing_argument": (4, 10),
    "pattern_call_cycle": (2, 10),
    "pattern_as_value": (4, 10),
    "function_keyword_argument": (2, 20),
}

# the hint each of these errors must give
HINTS = {
    "keyword_as_let": "pick another name, e.g. `mask_`",
    "keyword_true_as_let": "pick another name, e.g. `true_`",
    "ampersands_for_and": "write `and`",
    "pipes_for_or": "write `or`",
    "bang_for_not": "write `not`",
    "assign_for_compare": "write `==` to compare",
    "require_reads_index": "to exclude positions write `mask ...`",
    "bitand_on_bools": "for booleans write `and`",
    "invert_bool": "write `not` for a boolean",
    "sum_of_booleans": "`any(...)` or `all(...)` combine booleans",
    "reserved_keyword_parameter": "rename the parameter, e.g. `scale_`",
    "reserved_keyword_tensor": "rename the tensor, e.g. `backend_`",
    "pattern_call_has_score": "write `use tempered(...)`",
    "pattern_call_outside_mask": "write `mask causal()` for its masks",
    "pattern_call_shadowed": "rename the parameter to call the pattern",
    "pattern_as_value": "call it in a mask for its masks: `mask causal()`",
}

# Call-time mistakes, all on the pattern in call_*.attn (heads = 2):
# name -> (keyword arguments, expected exception type, (line, col) or None)
CALL_ERRORS = {
    "call_missing_parameter": (lambda: dict(slopes=torch.ones(2)), ArgumentError, (1, 18)),
    "call_unknown_keyword": (lambda: dict(window=4, windw=4, slopes=torch.ones(2)), ArgumentError, (1, 9)),
    "call_tensor_shape": (lambda: dict(window=4, slopes=torch.ones(3)), ValueError, None),
    "call_tensor_dtype": (lambda: dict(window=4, slopes=torch.ones(2, dtype=torch.int64)), ValueError, None),
    # run-time errors of the reference, in their own files
    "call_index_out_of_range": (lambda: dict(t=torch.ones(2)), attnc.SpecError, (3, 16)),
    "call_require_failed": (lambda: dict(window=-1), attnc.SpecError, (2, 5)),
    "call_shift_count": (lambda: dict(c=70), attnc.SpecError, (2, 21)),
}


def _render(err: Exception) -> str:
    if isinstance(err, attnc.SpecError):
        text = err.render()
    else:
        text = f"{type(err).__name__}: {err}"
    # the list of standard-library files grows; keep golden files independent of it
    names = ", ".join(attnc.std_names())
    return text.replace(names, "<the standard library's file names>")


def _compile_error(name: str) -> attnc.SpecError:
    return golden_error(GOLDEN, name)


def test_every_golden_file_has_a_case():
    names = {p.stem for p in GOLDEN.glob("*.attn")}
    assert names == set(SPEC_ERRORS) | set(CALL_ERRORS)


@pytest.mark.parametrize("name", sorted(SPEC_ERRORS))
def test_spec_error(name, golden):
    check_golden_error(GOLDEN, name, SPEC_ERRORS[name], golden, render=_render)


@pytest.mark.parametrize("name", sorted(HINTS))
def test_hint(name):
    assert HINTS[name] in (_compile_error(name).diagnostics[0].hint or "")


def test_keyword_errors_underline_the_whole_keyword():
    span = _compile_error("keyword_as_parameter").diagnostics[0].span
    assert span.end_col - span.col == len("score")
    span = _compile_error("ampersands_for_and").diagnostics[0].span
    assert span.end_col - span.col == len("&&")


def test_unknown_name_suggests_the_nearest():
    assert _compile_error("unknown_name").diagnostics[0].hint == "did you mean `k`?"


def test_missing_stdlib_file_lists_what_exists():
    hint = _compile_error("import_nonexistent").diagnostics[0].hint
    for name in attnc.std_names():
        assert name in hint


def test_use_cycle_names_the_cycle():
    assert "a -> b -> a" in _compile_error("use_cycle").message


@pytest.mark.parametrize("name", sorted(CALL_ERRORS))
def test_call_error(name, golden):
    make_kwargs, kind, where = CALL_ERRORS[name]
    p = attnc.load(GOLDEN / f"{name}.attn")
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(kind) as info:
        p(q, q, q, backend="reference", **make_kwargs())
    err = info.value
    if isinstance(err, attnc.SpecError):
        span = err.diagnostics[0].span
        assert (None if span is None else (span.line, span.col)) == where
    else:
        assert "`slopes`" in str(err) and "[heads]" in str(err) or "float" in str(err)
    # golden text with the path made relative, so the file is the same on every machine
    text = _render(err).replace(str(GOLDEN / f"{name}.attn"), f"{name}.attn")
    golden.check(GOLDEN / f"{name}.txt", text)


def test_unknown_keyword_suggests_the_nearest():
    p = attnc.load(GOLDEN / "call_unknown_keyword.attn")
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ArgumentError) as info:
        p(q, q, q, window=4, windw=4, slopes=torch.ones(2))
    assert info.value.diagnostics[0].hint == "did you mean `window`?"
