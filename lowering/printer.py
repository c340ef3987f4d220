"""A compact, deterministic text form of IR expressions and patterns (for tests and debugging)."""
from __future__ import annotations

_SYM = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "**",
        "and": "and", "or": "or", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


def format_node(n) -> str:
    if n.op == "const":
        return repr(n.value).lower() if isinstance(n.value, bool) else repr(n.value)
    if n.op in ("index", "size", "loopvar"):
        return str(n.value)
    if n.op == "param":
        return f"${n.value}"
    if n.op == "score":
        return "score"
    if n.op == "load":
        return f"{n.value}[{', '.join(format_node(a) for a in n.args)}]"
    if n.op in _SYM:
        return f"({format_node(n.args[0])} {_SYM[n.op]} {format_node(n.args[1])})"
    if n.op == "where":
        c, a, b = n.args
        return f"({format_node(a)} if {format_node(c)} else {format_node(b)})"
    if n.op == "sum":
        return f"sum({format_node(n.args[1])} for {n.value} in range({format_node(n.args[0])}))"
    if n.op == "cast":
        return f"float({format_node(n.args[0])})"
    return f"{n.op}({', '.join(format_node(a) for a in n.args)})"


def format_pattern(p) -> str:
    lines = [f"pattern {p.name}(" + ", ".join(f"{x.name}: {x.type}" + (f" = {x.default!r}" if x.default is not None else "")
                                             for x in p.params) + ")"]
    for t in p.tensors:
        lines.append(f"  tensor {t.name}: {t.elem}[{', '.join(format_node(d) for d in t.dims)}]")
    for s in p.scores:
        lines.append(f"  score = {format_node(s)}")
    for m in p.masks:
        lines.append(f"  mask {format_node(m)}")
    if p.topk is not None:
        lines.append(f"  select topk({format_node(p.topk)})")
    lines.append(f"  normalize {p.normalizer}" + (f"(bias = {format_node(p.bias)})" if p.bias is not None else ""))
    return "\n".join(lines)


def canonical_text(p) -> str:
    """A linear-size, deterministic serialization of a pattern's IR as a numbered DAG.

    Structurally equal sub-expressions get one number, so shared lets cost nothing however
    deeply they nest; equal patterns give equal text (used for content hashes and cache keys)."""
    ids: dict = {}
    lines: list[str] = []

    def num(n) -> int:
        from .ir import walk
        for m in walk(n):
            if m not in ids:
                args = ",".join(f"%{ids[a]}" for a in m.args)
                ids[m] = len(ids)
                lines.append(f"%{ids[m]} = {m.op}:{m.dtype} {m.value!r} ({args})")
        return ids[n]

    head = [f"pattern {p.name} normalizer={p.normalizer}"]
    head += [f"param {x.name}: {x.type} = {x.default!r}" for x in p.params]
    for t in p.tensors:
        head.append(f"tensor {t.name}: {t.elem}[{', '.join(f'%{num(d)}' for d in t.dims)}]")
    head += [f"score %{num(s)}" for s in p.scores]
    head += [f"mask %{num(m)}" for m in p.masks]
    if p.topk is not None:
        head.append(f"topk %{num(p.topk)}")
    if p.bias is not None:
        head.append(f"bias %{num(p.bias)}")
    return "\n".join(lines + head) + "\n"
