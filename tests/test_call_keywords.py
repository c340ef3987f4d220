"""The keywords a call takes itself (`scale`, `backend`, ...) cannot name a parameter or tensor:
a call could not pass such an argument. The list lives in one place, `CALL_KEYWORDS` in
dsl/checker.py; this file holds `Pattern.__call__` to it, so a new call keyword that is not
added there fails here."""
from __future__ import annotations

import inspect

import pytest

import attnc
from attnc.dsl.checker import CALL_KEYWORDS
from attnc.runtime.pattern import Pattern

#: reserved for keywords to come (none at present)
COMING: set[str] = set()


def _keyword_only(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


#: keywords of the other calls that take a pattern's arguments by name
OTHER_CALLS = {"block", "device", "frozen"}


def test_the_list_is_the_call_signature():
    assert set(CALL_KEYWORDS) == _keyword_only(Pattern.__call__) | COMING | OTHER_CALLS
    assert {n for n, (_, reserved) in CALL_KEYWORDS.items() if reserved} == \
        (COMING | OTHER_CALLS) - _keyword_only(Pattern.__call__)


def test_the_other_calls_that_take_arguments_by_name_are_covered():
    from attnc.nn import PatternAttention
    sizes = {"batch", "heads", "kv_heads", "head_dim"}  # names of sizes, reserved anyway
    assert _keyword_only(Pattern.layout) - sizes <= set(CALL_KEYWORDS)
    assert _keyword_only(PatternAttention.__init__) <= set(CALL_KEYWORDS)


def test_kernel_options_for_takes_no_keyword_the_list_lacks():
    assert _keyword_only(Pattern.kernel_options_for) <= set(CALL_KEYWORDS)


def _error(src: str) -> attnc.SpecError:
    with pytest.raises(attnc.SpecError) as info:
        attnc.compile(src, path="kw.attn")
    return info.value


DECLARATIONS = {
    "parameter": ("pattern p(w: int = 2, {}: float = 1.0):\n    mask q - k < w\n", 1),
    "tensor": ("pattern p:\n    tensor {}: float[heads]\n    mask q >= k\n", 2),
}


@pytest.mark.parametrize("what", sorted(DECLARATIONS))
@pytest.mark.parametrize("name", sorted(CALL_KEYWORDS))
def test_a_call_keyword_cannot_be_declared(name, what):
    template, line = DECLARATIONS[what]
    err = _error(template.format(name))
    assert len(err.diagnostics) == 1, err.render()
    d = err.diagnostics[0]
    assert f"`{name}`" in d.message and f"cannot name a {what}" in d.message
    assert d.hint.startswith(f"rename the {what}, e.g. `{name}_`")
    assert (d.span.line, d.span.col) == (line, template.splitlines()[line - 1].index("{}") + 1)
    assert d.span.end_col - d.span.col == len(name)


def test_the_renamed_declaration_is_fine_and_callable():
    import torch
    p = attnc.compile("pattern p(scale_: float = 1.0):\n    tensor backend_: float[heads]\n"
                      "    score = score * scale_ + backend_[h]\n")
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    out = p(q, q, q, scale=0.5, backend="reference", scale_=2.0, backend_=torch.zeros(2, dtype=torch.float64))
    want = torch.softmax(q @ q.transpose(-1, -2), -1) @ q
    torch.testing.assert_close(out, want)


def test_a_call_keyword_in_an_imported_file_is_reported_there(tmp_path):
    (tmp_path / "lib.attn").write_text("pattern helper(return_lse: bool = false):\n    mask q >= k\n")
    main = tmp_path / "main.attn"
    main.write_text('import "lib.attn"\npattern p:\n    use helper\n')
    with pytest.raises(attnc.SpecError) as info:
        attnc.load(str(main))
    assert info.value.span.source.path.endswith("lib.attn") and "`return_lse`" in info.value.message


def test_lets_and_loop_variables_may_use_the_names():
    """Only what a call passes is reserved; a let never is an argument."""
    attnc.compile("pattern p:\n    let scale = 0.5\n    score *= scale + sum(0.0 for k_lens in range(2))\n")
