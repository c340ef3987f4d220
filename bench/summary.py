"""The short table a GPU session ends with, from the forward and forward+backward result tables.

    python bench/summary.py bench/out/forward.md bench/out/backward.md

Per pattern and N: attnc's speed relative to FlexAttention (Flex ms / attnc ms; > 1 is faster)
forward and forward+backward, relative to SDPA for causal, and what `select topk` costs
(sharp_topk / tau_causal, forward). The targets of issue 11 are >= 1.1x Flex, >= 0.9x SDPA,
top-k <= 1.8x.
"""
from __future__ import annotations

import sys


def _rows(path: str) -> list[dict]:
    """The data rows of a Markdown result table, by header name ({} for a missing file)."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return []
    table = [ln for ln in lines if ln.startswith("|")]
    if len(table) < 2:
        return []
    names = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(names, (c.strip() for c in ln.strip("|").split("|")))) for ln in table[2:]]


def _ms(x: str | None) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def main(argv) -> int:
    fwd = _rows(argv[0]) if argv else []
    bwd = _rows(argv[1]) if len(argv) > 1 else []
    both = {(r["pattern"], r["N"]): r for r in bwd}
    print("| pattern | N | fwd vs Flex | fwd vs SDPA | fwd+bwd vs Flex |\n|---|---|---|---|---|")
    for r in fwd:
        a = _ms(r.get("attnc ms"))
        b = both.get((r["pattern"], r["N"]), {})
        print(f"| {r['pattern']} | {r['N']} | {_ratio(_ms(r.get('Flex ms')), a)} | "
              f"{_ratio(_ms(r.get('SDPA ms')), a)} | "
              f"{_ratio(_ms(b.get('Flex ms')), _ms(b.get('attnc ms')))} |")
    by = {(r["pattern"], r["N"]): _ms(r.get("attnc ms")) for r in fwd}
    for (name, n), ms in sorted(by.items()):
        if name == "sharp_topk":
            print(f"\ntop-k cost, N={n}: sharp_topk / tau_causal = {_ratio(ms, by.get(('tau_causal', n)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
