"""The canonical printer: parse(print(ast)) == ast, and printed text re-checks."""
from hypothesis import HealthCheck, given, settings

from attnc.dsl.checker import check_library
from attnc.dsl.loader import build_library
from attnc.dsl.parser import parse
from attnc.dsl.printer import print_module
from attnc.dsl.strategies import modules


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules())
def test_round_trip(module):
    text = print_module(module)
    assert parse(text) == module, text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules())
def test_generated_patterns_are_well_typed(module):
    text = print_module(module)
    check_library(build_library(text, "fuzz.attn"))


def test_precedence_is_preserved():
    src = ("pattern p(a: int = 1):\n"
           "    mask not (q < k and k < a) or (q - (k - 1)) % -3 == 0\n"
           "    score = -(score ** 2) * 2.0 ** -1\n"
           "    mask (1 if q > k else 2) if (true if a > 0 else false) else 3 > 0\n")
    m = parse(src)
    assert parse(print_module(m)) == m
    assert print_module(parse(print_module(m))) == print_module(m)


def _doubling_lets(levels: int) -> str:
    """Each let uses the previous one three times: the inlined tree has ~3**levels nodes."""
    lines = ["pattern deep:", "    let a0 = q - k"]
    lines += [f"    let a{i} = a{i - 1} * a{i - 1} + a{i - 1}" for i in range(1, levels + 1)]
    lines += [f"    score += a{levels} % 7", f"    mask a{levels} % 3 != 1"]
    return "\n".join(lines) + "\n"


def test_ir_printers_name_shared_subexpressions_instead_of_repeating_them():
    import attnc
    p = attnc.compile(_doubling_lets(24), path="deep.attn")
    text = p.ir_text()
    assert len(text) < 4000 and "let t0 = " in text
    assert len(repr(p.ir.masks[0])) < 4000 and " where t0 = " in repr(p.ir.masks[0])
    # small patterns print as trees, without names
    assert "let" not in attnc.std("sliding_window").ir_text()
