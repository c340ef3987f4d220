"""Files, imports and name resolution: turns a root `.attn` text into a `Library` of modules.

`import std.NAME` reads `stdlib/NAME.attn` from the installed package; `import "f.attn"` reads a
file relative to the importing one. Import cycles are errors (found with networkx). An import
brings the file's patterns (for `use`) and its file-level `def`s (for calls) into scope, under
`alias.` when it has one; `resolve_call` says what a call `f(...)` names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

import networkx as nx

from . import ast as A
from . import types as T
from .diagnostics import Diagnostic, SpecError, closest
from .parser import parse
from .source import SourceFile


@dataclass(eq=False)
class ModuleInfo:
    """One parsed file and the pattern names visible in it."""

    key: str
    source: SourceFile
    ast: A.Module
    scope: dict[str, "PatternRef"] = field(default_factory=dict)
    defs: dict[str, DefRef] = field(default_factory=dict)  # file-level defs visible here


@dataclass(frozen=True, eq=False)
class PatternRef:
    module: ModuleInfo
    pattern: A.Pattern

    @property
    def qualname(self) -> str:
        return f"{self.module.key}:{self.pattern.name}"


@dataclass(frozen=True, eq=False)
class DefRef:
    """A `def` of `module`: at file level (`pattern` None) or inside `pattern`."""

    module: ModuleInfo
    definition: A.Def
    pattern: A.Pattern | None = None

    @property
    def qualname(self) -> str:
        inner = f"{self.pattern.name}." if self.pattern is not None else ""
        return f"{self.module.key}:{inner}{self.definition.name}"


def resolve_call(name: str, module: ModuleInfo, local_defs: dict[str, DefRef]) -> DefRef | str | None:
    """What a call `name(...)` in `module` calls: a def of the enclosing pattern (`local_defs`,
    which shadow the file's), a def of the file or of a file it imports (`m.name` for an import
    `as m`), or a built-in function (its name); None if the name calls nothing."""
    found = local_defs.get(name) or module.defs.get(name)
    if found is not None:
        return found
    return name if name in T.FUNCTIONS else None


@dataclass(eq=False)
class Library:
    """The root module with everything it imports, transitively."""

    root: ModuleInfo
    modules: dict[str, ModuleInfo]

    def local_patterns(self) -> list[PatternRef]:
        return [PatternRef(self.root, p) for p in self.root.ast.patterns]


def stdlib_names() -> list[str]:
    files = resources.files("attnc.stdlib")
    return sorted(f.name[:-5] for f in files.iterdir() if f.name.endswith(".attn"))


def read_stdlib(name: str) -> str:
    return resources.files("attnc.stdlib").joinpath(f"{name}.attn").read_text()


def stdlib_source(name: str, prefix: str = "") -> str:
    """The text of the standard-library file `name`; an unknown name is a SpecError with the
    nearest one, spelled with `prefix` as the caller writes names (`std.` on the command line)."""
    names = stdlib_names()
    if name not in names:
        near = closest(name, names)
        raise SpecError(None, f"no standard pattern `{prefix}{name}`",
                        (f"did you mean `{prefix}{near}`? " if near else "") + "available: " + ", ".join(names))
    return read_stdlib(name)


def build_library(text: str, path: str = "<string>") -> Library:
    """Parse `text` and every module it imports; raise one SpecError with all problems found."""
    diags: list[Diagnostic] = []
    root_key = os.path.abspath(path) if os.path.exists(path) else path
    root = ModuleInfo(root_key, SourceFile(path, text), parse(text, path))
    modules = {root_key: root}
    graph = nx.DiGraph()
    graph.add_node(root_key)
    pending = [root]
    import_site: dict[tuple[str, str], A.Import] = {}
    while pending:
        mod = pending.pop()
        for imp in mod.ast.imports:
            target = _locate(mod, imp, diags)
            if target is None:
                continue
            key, display, text_of = target
            import_site[(mod.key, key)] = imp
            graph.add_edge(mod.key, key)
            if key not in modules:
                try:
                    sub = ModuleInfo(key, SourceFile(display, text_of), parse(text_of, display))
                except SpecError as e:
                    diags.extend(e.diagnostics)
                    continue
                modules[key] = sub
                pending.append(sub)
    for cycle in _cycles(graph):
        names = [_short(k) for k, _ in cycle] + [_short(cycle[0][0])]
        imp = import_site[cycle[0]]
        diags.append(Diagnostic(imp.span, "import cycle: " + " -> ".join(names)))
    for mod in modules.values():
        _fill_scope(mod, modules, diags)
    if diags:
        raise SpecError(diags)
    return Library(root, modules)


def _short(key: str) -> str:
    return key if key.startswith("std.") else os.path.basename(key)


def _cycles(graph: nx.DiGraph):
    """Each cycle once, as its edges, starting from the module found first (the root first)."""
    rank = {key: i for i, key in enumerate(graph.nodes)}
    seen = set()
    for cycle in nx.simple_cycles(graph):
        if frozenset(cycle) in seen:
            continue
        seen.add(frozenset(cycle))
        start = min(range(len(cycle)), key=lambda i: rank[cycle[i]])
        cycle = cycle[start:] + cycle[:start]
        yield [(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]


def _locate(mod: ModuleInfo, imp: A.Import, diags):
    if not imp.is_file:
        parts = imp.path.split(".")
        if parts[0] != "std" or len(parts) != 2:
            diags.append(Diagnostic(imp.span, f"cannot import `{imp.path}`",
                                    'import a standard pattern file as `import std.NAME`, '
                                    'or a file of your own as `import "file.attn"`'))
            return None
        name = parts[1]
        names = stdlib_names()
        if name not in names:
            near = closest(name, names)
            hint = (f"did you mean `std.{near}`? " if near else "") + \
                "the standard library has: " + ", ".join(names)
            diags.append(Diagnostic(imp.span, f"no standard pattern file `std.{name}`", hint))
            return None
        return f"std.{name}", f"<std>/{name}.attn", read_stdlib(name)
    base = os.path.dirname(mod.source.path) if not mod.key.startswith("std.") else ""
    full = os.path.abspath(os.path.join(base, imp.path))
    try:
        with open(full, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        diags.append(Diagnostic(imp.span, f"cannot read `{imp.path}`: {e.strerror or e}"))
        return None
    except UnicodeDecodeError:
        diags.append(Diagnostic(imp.span, f"`{imp.path}` is not UTF-8 text"))
        return None
    return full, os.path.relpath(full) if not os.path.isabs(imp.path) else full, text


def _defined_twice(span, message: str, first) -> Diagnostic:
    """A second definition of a file-level name, pointing back at the first (`first`: its span)."""
    return Diagnostic(span, message, f"first defined at line {first.line}; rename one of them"
                      if first else "rename one of them")


def _fill_scope(mod: ModuleInfo, modules: dict[str, ModuleInfo], diags):
    where: dict[str, str] = {}
    for p in mod.ast.patterns:
        if p.name in mod.scope:
            diags.append(_defined_twice(p.span, f"pattern `{p.name}` is defined twice in this file",
                                        mod.scope[p.name].pattern.span))
            continue
        mod.scope[p.name] = PatternRef(mod, p)
        where[p.name] = "here"
    def_where: dict[str, str] = {}
    for d in mod.ast.defs:
        clash = mod.defs.get(d.name) or mod.scope.get(d.name)
        if clash is not None:
            kind = "def" if isinstance(clash, DefRef) else "pattern"
            first = clash.definition.span if kind == "def" else clash.pattern.span
            diags.append(_defined_twice(d.span, f"`{d.name}` is already defined in this file as a {kind}",
                                        first))
            continue
        mod.defs[d.name] = DefRef(mod, d)
        def_where[d.name] = "here"
    for imp in mod.ast.imports:
        key = f"std.{imp.path.split('.')[-1]}" if not imp.is_file else \
            os.path.abspath(os.path.join(os.path.dirname(mod.source.path), imp.path))
        target = modules.get(key)
        if target is None:
            continue
        for p in target.ast.patterns:
            name = f"{imp.alias}.{p.name}" if imp.alias else p.name
            if name in mod.scope and mod.scope[name].module is not target:
                diags.append(Diagnostic(imp.span, f"`{name}` imported from `{imp.path}` clashes with "
                                                  f"the pattern `{name}` {where.get(name, 'imported earlier')}",
                                        f'import it under a prefix: `import {imp.path} as m`'))
                continue
            mod.scope[name] = PatternRef(target, p)
            where[name] = f"from `{imp.path}`"
        for d in target.ast.defs:
            name = f"{imp.alias}.{d.name}" if imp.alias else d.name
            mine = mod.defs.get(name)
            if mine is not None and mine.definition is not d:
                diags.append(Diagnostic(imp.span, f"`{name}` imported from `{imp.path}` clashes with "
                                                  f"the def `{name}` {def_where.get(name, 'imported earlier')}",
                                        f'import it under a prefix: `import {imp.path} as m`'))
                continue
            mod.defs[name] = DefRef(target, d)
            def_where[name] = f"from `{imp.path}`"
