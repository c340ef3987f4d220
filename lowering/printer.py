"""A compact, deterministic text form of IR expressions and patterns (for tests and debugging).

Inlined lets make the IR a DAG: a sub-expression used twice is one node with two parents, and
printing it as a tree doubles it at every level. The tree printers therefore name each large
sub-expression that occurs more than once (`t0`, `t1`, ... children first) and print it once,
so their output stays about as large as the DAG.
"""
from __future__ import annotations

from collections import Counter

from .traverse import walk, walk_all

_SYM = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "**",
        "and": "and", "or": "or", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=",
        "bitand": "&", "bitor": "|", "bitxor": "^", "lshift": "<<", "rshift": ">>"}


#: a repeated sub-expression is named when its inline text would have more nodes than this
SHARE_THRESHOLD = 12


def shared_names(roots) -> dict:
    """{node: name} for the sub-expressions of `roots` worth naming: structurally repeated (two
    or more parents, or a parent and a root) and over SHARE_THRESHOLD nodes when inlined."""
    uses: Counter = Counter(roots)
    order = walk_all(roots)
    for n in order:
        uses.update(n.args)
    names: dict = {}
    size: dict = {}
    for n in order:  # children first
        size[n] = 1 + sum(1 if a in names else size[a] for a in n.args)
        if uses[n] > 1 and n.args and size[n] > SHARE_THRESHOLD:
            names[n] = f"t{len(names)}"
    return names


def format_expr(n) -> str:
    """`n` as text, repeated large sub-expressions named: `expr where t0 = ..., t1 = ...`."""
    names = shared_names([n])
    if not names:
        return format_node(n)
    defs = ", ".join(f"{name} = {format_node(m, names, define=True)}" for m, name in names.items())
    return f"{format_node(n, names)} where {defs}"


def format_node(n, names: dict | None = None, define: bool = False) -> str:
    """`n` as a tree; a node in `names` prints as its name (unless it is the one being defined)."""
    if names and not define and n in names:
        return names[n]
    if names:
        sub = lambda a: format_node(a, names)  # noqa: E731
    else:
        sub = format_node
    if n.op == "const":
        return repr(n.value).lower() if isinstance(n.value, bool) else repr(n.value)
    if n.op in ("index", "size", "loopvar"):
        return str(n.value)
    if n.op == "param":
        return f"${n.value}"
    if n.op == "score":
        return "score"
    if n.op == "load":
        return f"{n.value}[{', '.join(sub(a) for a in n.args)}]"
    if n.op in _SYM:
        return f"({sub(n.args[0])} {_SYM[n.op]} {sub(n.args[1])})"
    if n.op == "invert":
        return f"~{sub(n.args[0])}"
    if n.op == "where":
        c, a, b = n.args
        return f"({sub(a)} if {sub(c)} else {sub(b)})"
    if n.op in ("sum", "any", "all"):
        return f"{n.op}({sub(n.args[1])} for {n.value} in range({sub(n.args[0])}))"
    if n.op == "cast":
        return f"float({sub(n.args[0])})"
    return f"{n.op}({', '.join(sub(a) for a in n.args)})"


def format_pattern(p) -> str:
    lines = [f"pattern {p.name}(" + ", ".join(f"{x.name}: {x.type}" + (f" = {x.default!r}" if x.default is not None else "")
                                             for x in p.params) + ")"]
    names = shared_names(p.nodes())
    fmt = lambda n: format_node(n, names)  # noqa: E731
    for r in p.requires:
        lines.append(f"  require {format_node(r.cond)}")
    for t in p.tensors:
        lines.append(f"  tensor {t.name}: {t.elem}[{', '.join(fmt(d) for d in t.dims)}]")
    for m, name in names.items():
        lines.append(f"  let {name} = {format_node(m, names, define=True)}")
    for s in p.scores:
        lines.append(f"  score = {fmt(s)}")
    for m in p.masks:
        lines.append(f"  mask {fmt(m)}")
    if p.topk is not None:
        lines.append(f"  select topk({fmt(p.topk)})")
    args = [f"{name} = {fmt(x)}" for name, x in (("bias", p.bias), ("sink", p.sink)) if x is not None]
    lines.append(f"  normalize {p.normalizer}" + (f"({', '.join(args)})" if args else ""))
    return "\n".join(lines)


def canonical_text(p) -> str:
    """A linear-size, deterministic serialization of a pattern's IR as a numbered DAG.

    Structurally equal sub-expressions get one number, so shared lets cost nothing however
    deeply they nest; equal patterns give equal text (used for content hashes and cache keys)."""
    ids: dict = {}
    lines: list[str] = []

    def num(n) -> int:
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
    if p.sink is not None:
        head.append(f"sink %{num(p.sink)}")
    head += [f"require %{num(r.cond)}" for r in p.requires]
    return "\n".join(lines + head) + "\n"
