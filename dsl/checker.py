"""Semantic checks over a `Library`: names, types, arities, imports, `use` cycles and `def`s.

The checker collects every error it can find; a wrongly typed expression gets the poison type
`ERR` so that one mistake is reported once. Its result is the per-pattern `Signature` (the
parameters and tensors a caller must supply).

A `def` is checked where it is defined (its declared parameter types, the others poisoned, so
that unknown names and the like are reported there) and again at each call, with the call's
argument types (memoized per def and types): an error the argument types cause is reported at
the call. Recursion between defs is found on the graph of calls, like `use` cycles.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import singledispatchmethod

import networkx as nx

from . import ast as A
from . import types as T
from .diagnostics import Diagnostic, SpecError, closest
from .loader import DefRef, Library, PatternRef, resolve_call
from .printer import print_expr, print_stmt
from .source import Span

MAX_INT = 2 ** 63 - 1
NORMALIZERS = {"softmax": ("sink",), "sigmoid": ("bias",)}
SELECTS = {"topk": 1}
#: the keywords a call of a pattern takes itself (`Pattern.__call__` in runtime/pattern.py, which
#: tests/test_call_keywords.py holds to this list), those of the other calls that take a
#: pattern's arguments by name (`p.layout`, `attnc.nn.PatternAttention`), and those reserved for
#: keywords to come: no parameter or tensor may take one of these names, since a call could not
#: pass it. name -> (what the keyword gives, not a keyword of `p(...)` itself)
CALL_KEYWORDS = {
    "scale": ("the softmax scale", False),
    "backend": ("the backend", False),
    "return_lse": ("whether the log-sum-exp is returned", False),
    "kernel_options": ("the kernels' launch settings", False),
    "q_start": ("the absolute position of the first query", False),
    "k_start": ("the absolute position of the first key", False),
    "k_lens": ("the key length of each sequence", False),
    "block_table": ("the page table of a paged key/value cache", False),
    "block": ("the tile shape of `p.layout(block=...)`", True),
    "device": ("the device of `p.layout(device=...)`", True),
    "frozen": ("the fixed tensors of `attnc.nn.PatternAttention(frozen=...)`", True),
}


@dataclass
class PatternInfo:
    """What a pattern exposes to a caller and to patterns that `use` it."""

    ref: PatternRef
    params: dict[str, A.Param] = field(default_factory=dict)
    tensors: dict[str, A.TensorDecl] = field(default_factory=dict)
    lets: dict[str, str] = field(default_factory=dict)  # name -> type
    # lets brought in by more than one definition (`use` of two patterns that both define it):
    # name -> where they came from; such a name may not be referenced
    ambiguous: dict[str, str] = field(default_factory=dict)
    let_origin: dict[str, str] = field(default_factory=dict)  # name -> "at line N" / "by `use P` at line N"
    has_select: bool = False
    has_normalize: bool = False
    # why a call of this pattern cannot stand in a mask (it has a score statement, `select` or
    # `normalize`, directly or by `use`), e.g. "a `score` statement at f.attn:3:5"; None if it can
    not_a_mask: str | None = None
    # this pattern's own lets whose value is known before the kernel runs (see `_Val.static`)
    static_lets: set[str] = field(default_factory=set)
    defs: dict[str, DefRef] = field(default_factory=dict)  # its own defs (not shared by `use`)


@dataclass(frozen=True)
class _Val:
    type: str
    static: bool  # known before the kernel runs: literals, parameters, sizes and lets of those


class _Scope:
    def __init__(self, info: PatternInfo, module=None):
        self.info = info
        self.loop_vars: dict[str, str] = {}
        self.module = module if module is not None else info.ref.module
        self.args: dict[str, _Val] | None = None  # inside a def's body: its parameters
        self.in_def: DefRef | None = None  # the def whose body this is


@dataclass
class _DefSite:
    """A def and what its body sees: `info` holds the names of its pattern as they stand at the
    def (a copy; empty at file level), including the pattern's defs up to this one."""

    ref: DefRef
    info: PatternInfo
    ok: bool = True  # the definition itself checked without errors


class Checker:
    def __init__(self, lib: Library):
        self.lib = lib
        self.diags: list[Diagnostic] = []
        self.root_diags = self.diags  # `diags` is swapped while a def's body is checked for a call
        self._allow_score, self._allow_names = False, True
        self.infos: dict[int, PatternInfo] = {}
        self.in_progress: set[int] = set()
        self.uses = nx.DiGraph()
        self.use_sites: dict[tuple[str, str], Span | None] = {}
        self.call_edges: set[tuple[str, str]] = set()  # edges of `uses` first made by a pattern call
        self.def_sites: dict[int, _DefSite] = {}
        self.def_calls = nx.DiGraph()  # def qualname -> the defs its body calls
        self.def_call_sites: dict[tuple[str, str], Span | None] = {}
        self.def_names: dict[str, str] = {}  # def qualname -> its name
        self.def_stack: list[str] = []  # the defs whose bodies are being checked
        self.instances: dict[tuple, tuple[_Val, Diagnostic | None]] = {}

    def error(self, span, message, hint=None):
        self.diags.append(Diagnostic(span, message, hint))

    # ------------------------------------------------------------------ patterns

    def run(self) -> dict[str, PatternInfo]:
        for mod in self.lib.modules.values():
            for d in mod.ast.defs:
                self._def_site(DefRef(mod, d))
        for mod in self.lib.modules.values():
            for p in mod.ast.patterns:
                self.pattern_info(PatternRef(mod, p))
        for cycle in nx.simple_cycles(self.uses):
            cycle = self._rotate_to_first_use(cycle)
            names = [c.split(":", 1)[1] for c in cycle] + [cycle[0].split(":", 1)[1]]
            span = self.use_sites[(cycle[0], cycle[1 % len(cycle)])]
            edges = {(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))}
            if edges & self.call_edges:
                self.error(span, "cycle of patterns: " + " -> ".join(names),
                           "a pattern cannot include or call itself, directly or through others")
                continue
            self.error(span, "`use` cycle: " + " -> ".join(names),
                       "a pattern cannot include itself, directly or through others")
        self._report_recursion()
        root = self.lib.root
        if not root.ast.patterns and not root.ast.defs and not any(d.span and d.span.source is root.source
                                                                   for d in self.diags):
            from .source import Span as S
            src = self.lib.root.source
            self.error(S(src, 1, 1, 1, 2), "no pattern in this file" if src.text.strip() else "empty file",
                       "define one: `pattern name(param: int = 1):` followed by indented statements")
        self.diags.sort(key=lambda d: (d.span.source.path, d.span.line, d.span.col) if d.span else ("", 0, 0))
        if self.diags:
            raise SpecError(_dedup(self.diags))
        return {p.name: self.infos[id(p)] for p in self.lib.root.ast.patterns}

    def _rotate_to_first_use(self, cycle: list[str]) -> list[str]:
        """Start a cycle at its `use` that comes first in the source, so reports are stable."""
        def where(i):
            span = self.use_sites[(cycle[i], cycle[(i + 1) % len(cycle)])]
            return (span.source.path, span.line, span.col) if span else ("", 0, 0)
        first = min(range(len(cycle)), key=where)
        return cycle[first:] + cycle[:first]

    def pattern_info(self, ref: PatternRef) -> PatternInfo:
        key = id(ref.pattern)
        if key in self.infos:
            return self.infos[key]
        info = PatternInfo(ref)
        if key in self.in_progress:  # a use cycle; reported once the graph is complete
            return info
        self.in_progress.add(key)
        self._check_pattern(ref, info)
        self.in_progress.discard(key)
        self.infos[key] = info
        return info

    def _check_pattern(self, ref: PatternRef, info: PatternInfo):
        p = ref.pattern
        self.uses.add_node(ref.qualname)
        for prm in p.params:
            if prm.name in info.params:
                self.error(prm.span, f"parameter `{prm.name}` is declared twice")
                continue
            self._check_new_name(prm.name, prm.span, info, "parameter")
            self._check_call_keyword(prm.name, prm.span, "parameter")
            if prm.type not in A.SCALAR_TYPES:
                near = closest(prm.type, A.SCALAR_TYPES)
                self.error(prm.span, f"unknown parameter type `{prm.type}`",
                           f"did you mean `{near}`?" if near else "parameter types are int, float and bool")
            elif prm.default is not None:
                val = self.expr(prm.default, _Scope(PatternInfo(ref)), allow_names=False)
                if val.type != T.ERR and not _assignable(val.type, prm.type):
                    self.error(prm.default.span,
                               f"default value of `{prm.name}` is {val.type}, but `{prm.name}` is declared {prm.type}",
                               _default_hint(prm.type))
            info.params[prm.name] = prm
        scope = _Scope(info)
        for stmt in p.body:
            self.stmt(stmt, scope, ref)

    def _check_call_keyword(self, name, span, what: str) -> None:
        """A parameter or tensor may not take the name of a keyword of the call (CALL_KEYWORDS)."""
        if name not in CALL_KEYWORDS:
            return
        meaning, reserved = CALL_KEYWORDS[name]
        where = _name_span(span, name)
        if reserved:
            self.error(where, f"`{name}` is reserved for a keyword ({meaning}), "
                              f"so it cannot name a {what}", f"rename the {what}, e.g. `{name}_`")
        else:
            self.error(where, f"`{name}` is a keyword of the call itself (`p(q, k, v, {name}=...)`: "
                              f"{meaning}), so it cannot name a {what}",
                       f"rename the {what}, e.g. `{name}_`: a call gives `{name}=` to attnc, "
                       "never to the pattern")

    def _check_new_name(self, name, span, info: PatternInfo, what: str) -> bool:
        if name in A.INDEX_NAMES or name in A.SIZE_NAMES or name == "score":
            self.error(span, f"`{name}` is a built-in name and cannot be a {what}")
            return False
        if name in T.FUNCTIONS:
            self.error(span, f"`{name}` is a function name and cannot be a {what}")
            return False
        for kind, table in (("parameter", info.params), ("tensor", info.tensors), ("let", info.lets),
                            ("def", info.defs)):
            if name in table:
                self.error(span, f"`{name}` is already defined as a {kind}")
                return False
        if name in info.ambiguous:
            self.error(span, f"`{name}` is already defined ({info.ambiguous[name]})")
            return False
        return True

    # ------------------------------------------------------------------ statements

    @singledispatchmethod
    def stmt(self, s, scope: _Scope, ref: PatternRef):
        raise TypeError(s)

    @stmt.register
    def _(self, s: A.TensorDecl, scope, ref):
        if s.elem not in A.ELEM_TYPES:
            near = closest(s.elem, A.ELEM_TYPES)
            self.error(s.span, f"unknown tensor element type `{s.elem}`",
                       f"did you mean `{near}`?" if near else "element types are int, float and bool")
        if not s.dims:
            self.error(s.span, f"tensor `{s.name}` needs at least one dimension")
        for d in s.dims:
            v = self.expr(d, scope)
            if v.type not in (T.INT, T.ERR):
                self.error(d.span, f"a tensor dimension must be an int, not {v.type}")
            elif v.type == T.INT and not v.static:
                self.error(d.span, "a tensor dimension may use only sizes, parameters and literals")
        self._check_call_keyword(s.name, s.span, "tensor")
        if self._check_new_name(s.name, s.span, scope.info, "tensor"):
            scope.info.tensors[s.name] = s

    @stmt.register
    def _(self, s: A.Let, scope, ref):
        v = self.expr(s.value, scope, allow_score=False)
        if self._check_new_name(s.name, s.span, scope.info, "let"):
            scope.info.lets[s.name] = v.type
            if v.static:
                scope.info.static_lets.add(s.name)
            scope.info.let_origin[s.name] = f"at line {s.span.line}" if s.span else "here"

    @stmt.register
    def _(self, s: A.Mask, scope, ref):
        v = self.expr(s.cond, scope, allow_score=True, allow_patterns=True)
        if v.type not in (T.BOOL, T.ERR):
            self.error(s.cond.span, f"a mask must be a boolean, but this is {v.type}",
                       "compare it: e.g. `mask q >= k`")

    @stmt.register
    def _(self, s: A.ScoreStmt, scope, ref):
        _not_a_mask(scope.info, "a `score` statement", s.span)
        v = self.expr(s.value, scope, allow_score=True)
        if v.type == T.BOOL:
            self.error(s.value.span, "a boolean cannot be used as a score",
                       "to exclude positions, write `mask <condition>` instead")

    @stmt.register
    def _(self, s: A.Select, scope, ref):
        _not_a_mask(scope.info, "a `select`", s.span)
        if scope.info.has_select:
            self.error(s.span, "a pattern can have only one `select`")
        scope.info.has_select = True
        if s.kind not in SELECTS:
            near = closest(s.kind, SELECTS)
            self.error(s.span, f"unknown selection `{s.kind}`", f"did you mean `{near}`?" if near else
                       "available: " + ", ".join(SELECTS))
            return
        if len(s.args) != 1 or s.args[0].name is not None:
            self.error(s.span, "`select topk` takes one positional argument, the number of keys to keep")
            return
        v = self.expr(s.args[0].value, scope)
        if v.type not in (T.INT, T.ERR):
            self.error(s.args[0].value.span, f"the count of `topk` must be an int, not {v.type}",
                       "e.g. `select topk(32)`")
        elif v.type == T.INT and not v.static:
            self.error(s.args[0].value.span, "the count of `topk` may use only sizes, parameters and literals")

    @stmt.register
    def _(self, s: A.Normalize, scope, ref):
        _not_a_mask(scope.info, "a `normalize`", s.span)
        if scope.info.has_normalize:
            self.error(s.span, "a pattern can have only one `normalize`")
        scope.info.has_normalize = True
        if s.kind not in NORMALIZERS:
            near = closest(s.kind, NORMALIZERS)
            self.error(s.span, f"unknown normalizer `{s.kind}`", f"did you mean `{near}`?" if near else
                       "available: " + ", ".join(NORMALIZERS))
            return
        allowed = NORMALIZERS[s.kind]
        for a in s.args:
            if a.name is None or a.name not in allowed:
                self.error(a.span, f"`{s.kind}` takes " + (
                    "no arguments" if not allowed else "only keyword arguments " + ", ".join(f"`{n}`" for n in allowed)))
                continue
            v = self.expr(a.value, scope, allow_score=False)
            if v.type not in T.NUMERIC + (T.ERR,):
                self.error(a.value.span, f"`{a.name}` must be a number, not {v.type}")

    @stmt.register
    def _(self, s: A.Require, scope, ref):
        v = self.expr(s.cond, scope, allow_score=False)
        if v.type not in (T.BOOL, T.ERR):
            self.error(s.cond.span, f"a `require` must be a boolean, but this is {v.type}",
                       "compare it: e.g. `require window > 0`")
        elif v.type == T.BOOL and not v.static:
            self.error(s.cond.span, "a `require` may use only parameters, sizes, literals and lets of those",
                       "it is checked when a call binds its arguments, before any position "
                       "(`b h q k`), score or tensor exists; to exclude positions write `mask ...`")

    @stmt.register
    def _(self, s: A.Use, scope, ref):
        target = ref.module.scope.get(s.target)
        if target is None:
            near = closest(s.target, ref.module.scope)
            self.error(s.span, f"unknown pattern `{s.target}`",
                       f"did you mean `{near}`?" if near else "import it first, e.g. `import std.causal`")
            return
        self.uses.add_edge(ref.qualname, target.qualname)
        self.use_sites.setdefault((ref.qualname, target.qualname), s.span)
        other = self.pattern_info(target)
        self._bind_arguments(s.target, target, other, s.args, s.span, scope, f"use {s.target}")
        here = f"by `use {s.target}` at line {s.span.line}" if s.span else f"by `use {s.target}`"
        self._bring_in(s.target, other, s.span, scope, here)
        if other.not_a_mask is not None:
            _not_a_mask(scope.info, f"`use {s.target}`", s.span, other.not_a_mask)
        if other.has_select:
            if scope.info.has_select:
                self.error(s.span, f"`{s.target}` has a `select`, and so does this pattern")
            scope.info.has_select = True
        if other.has_normalize:
            if scope.info.has_normalize:
                self.error(s.span, f"`{s.target}` has a `normalize`, and so does this pattern")
            scope.info.has_normalize = True

    def _bind_arguments(self, name: str, target: PatternRef, other: PatternInfo, args, span, scope, how: str):
        """Check the arguments of `use NAME(args)` or of a pattern call `NAME(args)` (`how` is
        `use NAME` or `NAME`) against the parameters of `target`."""
        positional = list(target.pattern.params)
        given = set()
        seen_keyword = False
        for i, a in enumerate(args):
            if a.name is None and seen_keyword:
                self.error(a.span, "a positional argument cannot follow a keyword argument",
                           f"name it, e.g. `{positional[i].name if i < len(positional) else 'name'}=...`")
            seen_keyword = seen_keyword or a.name is not None
            if a.name is None:
                if i >= len(positional):
                    self.error(a.span, f"`{name}` takes {len(positional)} parameters, {len(args)} given")
                    continue
                pname = positional[i].name
            else:
                pname = a.name
            prm = other.params.get(pname)
            if prm is None:
                near = closest(pname, other.params)
                self.error(a.span, f"`{name}` has no parameter `{pname}`",
                           f"did you mean `{near}`?" if near else
                           "its parameters: " + (", ".join(other.params) or "none"))
                continue
            if pname in given:
                self.error(a.span, f"parameter `{pname}` given twice")
            given.add(pname)
            v = self.expr(a.value, scope, allow_score=False)
            if v.type != T.ERR and not _assignable(v.type, prm.type):
                self.error(a.value.span, f"`{pname}` of `{name}` is {prm.type}, given {v.type}")
            elif v.type != T.ERR and not v.static and prm.type == T.INT:
                self.error(a.value.span, f"`{pname}` must be known before the kernel runs: "
                                         "use only sizes, parameters and literals")
        for prm in other.params.values():
            if prm.name not in given and prm.default is None:
                self.error(span, f"`{how}` needs a value for its parameter `{prm.name}`",
                           f"e.g. `{how}({prm.name}=...)`")

    def _bring_in(self, target_name: str, other: PatternInfo, span, scope, here: str):
        """Make the tensors and lets of an included or called pattern visible to the includer
        (`here` says where they came from, for the error about an ambiguous let)."""
        for name, decl in other.tensors.items():
            mine = scope.info.tensors.get(name)
            if mine is not None:
                if mine.elem != decl.elem or len(mine.dims) != len(decl.dims):
                    self.error(span, f"tensor `{name}` of `{target_name}` clashes with the tensor `{name}` here")
                continue
            if self._check_new_name(name, span, scope.info, "tensor"):
                scope.info.tensors[name] = decl
        for name, typ in other.lets.items():
            info = scope.info
            if name in info.params or name in info.tensors:
                continue  # the includer's own name keeps its meaning; the let stays private
            if name in info.lets or name in info.ambiguous:
                before = info.ambiguous.get(name) or info.let_origin.get(name, "earlier")
                info.lets.pop(name, None)
                info.ambiguous[name] = f"{before} and {here}"
                continue
            info.lets[name] = typ
            info.let_origin[name] = here

    @stmt.register
    def _(self, s: A.Def, scope, ref):
        dref = DefRef(ref.module, s, ref.pattern)
        named = self._check_def_name(s, scope.info)
        scope.info.defs[s.name] = dref  # even when misnamed: its calls are not errors too
        # the body sees the pattern's names as they stand here, and this def (so that calling
        # itself is reported as recursion)
        seen = replace(scope.info, params=dict(scope.info.params), tensors=dict(scope.info.tensors),
                       lets=dict(scope.info.lets), ambiguous=dict(scope.info.ambiguous),
                       static_lets=set(scope.info.static_lets), defs={**scope.info.defs, s.name: dref})
        site = self._check_def(_DefSite(dref, seen))
        site.ok = site.ok and named

    # ------------------------------------------------------------------ defs

    def _def_site(self, dref: DefRef) -> _DefSite:
        """The site of a def, its definition checked (file-level defs on first need)."""
        site = self.def_sites.get(id(dref.definition))
        if site is None:  # its own errors go to the file's, even while a call's body is checked
            saved, self.diags = self.diags, self.root_diags
            try:
                named = self._check_def_name(dref.definition, PatternInfo(None))
                site = self._check_def(_DefSite(dref, PatternInfo(None)))
                site.ok = site.ok and named
            finally:
                self.diags = saved
        return site

    def _check_def_name(self, d: A.Def, info: PatternInfo) -> bool:
        if d.name in T.FUNCTIONS:
            self.error(d.span, f"`{d.name}` is a built-in function and cannot be redefined",
                       f"pick another name, e.g. `{d.name}_`")
            return False
        return self._check_new_name(d.name, d.span, info, "def")

    def _check_def(self, site: _DefSite) -> _DefSite:
        """Check a def where it is defined: its parameters, and its body with the declared types
        (an undeclared one poisoned: its type comes from each call)."""
        d, dref = site.ref.definition, site.ref
        self.def_sites[id(d)] = site
        self.def_names[dref.qualname] = d.name
        self.def_calls.add_node(dref.qualname)
        before = len(self.diags)
        args: dict[str, _Val] = {}
        for prm in d.params:
            if prm.name in args:
                self.error(prm.span, f"parameter `{prm.name}` of `{d.name}` is declared twice")
                continue
            if prm.name not in A.INDEX_NAMES:  # positions are not visible in a body: no clash
                self._check_new_name(prm.name, prm.span, site.info, "parameter")
            typ = T.ERR
            if prm.type is not None and prm.type not in A.SCALAR_TYPES:
                near = closest(prm.type, A.SCALAR_TYPES)
                self.error(prm.span, f"unknown parameter type `{prm.type}`",
                           f"did you mean `{near}`?" if near else "parameter types are int, float and bool")
            elif prm.type is not None:
                typ = prm.type
            args[prm.name] = _Val(typ, True)
        self._def_body(site, args)
        site.ok = len(self.diags) == before
        return site

    def _def_body(self, site: _DefSite, args: dict[str, _Val]) -> _Val:
        scope = _Scope(site.info, site.ref.module)
        scope.args, scope.in_def = args, site.ref
        flags = (getattr(self, "_allow_score", False), getattr(self, "_allow_names", True),
                 getattr(self, "_allow_patterns", False))
        # a def's body calls functions and defs, never a pattern (those stand for masks)
        self._allow_score, self._allow_names, self._allow_patterns = False, True, False
        self.def_stack.append(site.ref.qualname)
        try:
            return self._expr(site.ref.definition.body, scope)
        finally:
            self.def_stack.pop()
            self._allow_score, self._allow_names, self._allow_patterns = flags

    def _call_def(self, e: A.Call, dref: DefRef, scope: _Scope) -> _Val:
        """A call of a def: its arity and declared types here, then its body with these
        argument types; an error there is reported at this call."""
        if e.keywords:
            self.error(e.keywords[0].span, f"`{e.func}` takes no keyword arguments",
                       f"pass its arguments in order: `{e.func}(...)`")
            return _Val(T.ERR, False)
        args = [self._expr(a, scope) for a in e.args]
        static = all(a.static for a in args)
        d = dref.definition
        if scope.in_def is not None:
            edge = (scope.in_def.qualname, dref.qualname)
            self.def_calls.add_edge(*edge)
            self.def_call_sites.setdefault(edge, e.span)
        if not self._allow_names:
            self.error(e.span, "a default value must be a constant",
                       "a def cannot be called in a default value")
            return _Val(T.ERR, True)
        site = self._def_site(dref)
        if len(args) != len(d.params):
            n = len(d.params)
            self.error(e.span, f"`{e.func}` takes {n} argument{'s' if n != 1 else ''}, {len(args)} given",
                       f"it is defined as `{_def_header(d)}`" + (f" at {d.span}" if d.span else ""))
            return _Val(T.ERR, static)
        types, bad = [], False
        for prm, a, v in zip(d.params, e.args, args):
            if prm.type in A.SCALAR_TYPES and v.type != T.ERR and not _assignable(v.type, prm.type):
                self.error(a.span, f"argument `{prm.name}` of `{e.func}` is {prm.type}, given {v.type}",
                           f"it is defined as `{_def_header(d)}`" + (f" at {d.span}" if d.span else ""))
                bad = True
            types.append(prm.type if prm.type in A.SCALAR_TYPES else v.type)
        if bad or not site.ok or T.ERR in types or dref.qualname in self.def_stack:
            return _Val(T.ERR, static)  # reported already (a recursion: once the graph is whole)
        key = (id(d), tuple(types), tuple(a.static for a in args))
        if key not in self.instances:
            saved, self.diags = self.diags, []
            try:
                val = self._def_body(site, {p.name: _Val(t, a.static)
                                            for p, t, a in zip(d.params, types, args)})
            finally:
                found, self.diags = self.diags, saved
            self.instances[key] = (val, found[0] if found else None)
        val, failure = self.instances[key]
        if failure is None:
            return val
        given = ", ".join(f"{p.name}: {t}" for p, t in zip(d.params, types))
        hint = f"at {failure.span} in the body of `{d.name}`" if failure.span else f"in the body of `{d.name}`"
        if failure.hint:
            hint += f" ({failure.hint})"
        self.error(e.span, f"`{e.func}` cannot be called with {given}: {failure.message}", hint)
        return _Val(T.ERR, static)

    def _def_body_name(self, e: A.Name, scope: _Scope) -> _Val | None:
        """A name in a def's body: a parameter, or None when the pattern's rules resolve it; the
        positions and `score` are not visible there."""
        n, name = e.id, scope.in_def.definition.name
        if n in scope.args:
            return scope.args[n]
        if n in A.INDEX_NAMES or n == "score":
            sees = "its parameters, the sizes and the parameters, tensors and lets of its " \
                "pattern above it" if scope.in_def.pattern is not None else "its parameters and the sizes"
            params = ", ".join([p.name for p in scope.in_def.definition.params] + [n if n != "score" else "s"])
            self.error(e.span, f"`{n}` is not visible in the body of `{name}`",
                       f"a def sees {sees}; pass `{n}` as an argument: "
                       f"`def {name}({params}) = ...` called as `{name}(..., {n})`")
            return _Val(T.ERR, False)
        info = scope.info
        if n in scope.loop_vars or n in A.SIZE_NAMES or n in T.FUNCTIONS or \
                any(n in t for t in (info.params, info.lets, info.ambiguous, info.tensors)) or \
                isinstance(resolve_call(n, scope.module, info.defs), DefRef):
            return None
        pattern = scope.in_def.pattern
        if pattern is not None and any(isinstance(s, (A.Let, A.TensorDecl)) and s.name == n
                                       for s in pattern.body):
            self.error(e.span, f"`{n}` is defined after `{name}`",
                       f"a def sees the lets and tensors above it: move `def {name}` below `{n}`")
            return _Val(T.ERR, False)
        visible = list(scope.args) + list(scope.loop_vars) + list(A.SIZE_NAMES) + list(info.params) + \
            list(info.lets)
        near = closest(n, visible)
        self.error(e.span, f"unknown name `{n}`", f"did you mean `{near}`?" if near else
                   "a def sees its parameters, the sizes and the names of its pattern above it"
                   if pattern is not None else "a def sees its parameters and the sizes")
        return _Val(T.ERR, False)

    def _report_recursion(self):
        seen = set()
        for cycle in nx.simple_cycles(self.def_calls):
            if frozenset(cycle) in seen:
                continue
            seen.add(frozenset(cycle))
            cycle = self._rotate_to_first_call(cycle)
            names = [self.def_names[c] for c in cycle] + [self.def_names[cycle[0]]]
            self.error(self.def_call_sites[(cycle[0], cycle[1 % len(cycle)])],
                       "recursive def: " + " -> ".join(names),
                       "a def cannot call itself, directly or through other defs; "
                       "write a bounded repetition with `sum(... for i in range(n))`")

    def _rotate_to_first_call(self, cycle: list[str]) -> list[str]:
        """Start a cycle of defs at its call that comes first in the source."""
        def where(i):
            span = self.def_call_sites[(cycle[i], cycle[(i + 1) % len(cycle)])]
            return (span.source.path, span.line, span.col) if span else ("", 0, 0)
        first = min(range(len(cycle)), key=where)
        return cycle[first:] + cycle[:first]

    # ------------------------------------------------------------------ expressions

    def expr(self, e: A.Expr, scope: _Scope, allow_score: bool = False, allow_names: bool = True,
             allow_patterns: bool = False) -> _Val:
        self._allow_score = allow_score
        self._allow_names = allow_names
        self._allow_patterns = allow_patterns  # a mask: `P(args)` may call a pattern
        return self._expr(e, scope)

    @singledispatchmethod
    def _expr(self, e, scope) -> _Val:
        raise TypeError(e)

    @_expr.register
    def _(self, e: A.Num, scope):
        if isinstance(e.value, int):
            if abs(e.value) > MAX_INT:
                self.error(e.span, "integer literal does not fit in 64 bits")
                return _Val(T.ERR, True)
            return _Val(T.INT, True)
        if e.value != e.value or e.value in (float("inf"), float("-inf")):
            self.error(e.span, "float literal is out of range")
            return _Val(T.ERR, True)
        return _Val(T.FLOAT, True)

    @_expr.register
    def _(self, e: A.Bool, scope):
        return _Val(T.BOOL, True)

    @_expr.register
    def _(self, e: A.Name, scope):
        info = scope.info
        n = e.id
        if not self._allow_names:
            self.error(e.span, "a default value must be a constant")
            return _Val(T.ERR, True)
        if scope.args is not None:
            val = self._def_body_name(e, scope)
            if val is not None:
                return val
        if n in scope.loop_vars:
            return _Val(T.INT, False)
        if n in A.INDEX_NAMES:
            return _Val(T.INT, False)
        if n in A.SIZE_NAMES:
            return _Val(T.INT, True)
        if n == "score":
            if not self._allow_score:
                self.error(e.span, "`score` can be used only in `score` statements and masks")
                return _Val(T.ERR, False)
            return _Val(T.FLOAT, False)
        if n in info.params:
            return _Val(info.params[n].type, True)
        if n in info.ambiguous:
            self.error(e.span, f"`{n}` is ambiguous: it is defined {info.ambiguous[n]}",
                       "rename one of the lets, or compute the value here with a `let` of another name")
            return _Val(T.ERR, False)
        if n in info.lets:
            return _Val(info.lets[n], n in info.static_lets)
        if n in info.tensors:
            self.error(e.span, f"tensor `{n}` must be indexed",
                       f"e.g. `{n}[{', '.join(['h'] * len(info.tensors[n].dims))}]`")
            return _Val(T.ERR, False)
        if n in T.FUNCTIONS:
            self.error(e.span, f"`{n}` is a function; call it: `{n}(...)`")
            return _Val(T.ERR, False)
        if isinstance(resolve_call(n, scope.module, info.defs), DefRef):
            self.error(e.span, f"`{n}` is a def; call it: `{n}(...)`")
            return _Val(T.ERR, False)
        visible = list(A.INDEX_NAMES) + list(A.SIZE_NAMES) + list(info.params) + list(info.lets) + \
            list(scope.loop_vars) + (["score"] if self._allow_score else [])
        near = n.lower() if n in ("True", "False") else closest(n, visible)
        if n in info.ref.module.scope:
            self.error(e.span, f"`{n}` is a pattern, not a value",
                       f"call it in a mask for its masks: `mask {n}()`, or include it: `use {n}`")
            return _Val(T.ERR, False)
        self.error(e.span, f"unknown name `{n}`", f"did you mean `{near}`?" if near else None)
        return _Val(T.ERR, False)

    @_expr.register
    def _(self, e: A.Call, scope):
        target = resolve_call(e.func, scope.module, scope.info.defs)
        if isinstance(target, DefRef):  # a def shadows a pattern of the same name
            return self._call_def(e, target, scope)
        in_pattern = scope.info.ref is not None  # not the body of a file-level def
        if in_pattern and e.func not in T.FUNCTIONS and e.func in scope.info.ref.module.scope:
            return self._pattern_call(e, scope)
        args = [self._expr(a, scope) for a in e.args]
        if e.func not in T.FUNCTIONS:
            defs = sorted(set(scope.info.defs) | set(scope.module.defs))
            patterns = list(scope.info.ref.module.scope) if self._allow_patterns and in_pattern else []
            near = closest(e.func, list(T.FUNCTIONS) + defs + patterns)
            hint = f"did you mean `{near}`?" if near else "functions: " + ", ".join(sorted(T.FUNCTIONS)) + \
                ("; defs: " + ", ".join(defs) if defs else "")
            if e.func in scope.info.tensors:
                hint = f"`{e.func}` is a tensor; index it with square brackets: `{e.func}[...]`"
            self.error(e.span, f"unknown function `{e.func}`", hint)
            return _Val(T.ERR, False)
        if e.keywords:
            self.error(e.keywords[0].span, f"`{e.func}` takes no keyword arguments",
                       f"pass its arguments in order: `{e.func}(...)`")
            return _Val(T.ERR, False)
        lo, hi = T.FUNCTIONS[e.func].min_args, T.FUNCTIONS[e.func].max_args
        if len(args) < lo or (hi is not None and len(args) > hi):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            self.error(e.span, f"`{e.func}` takes {want} argument{'s' if want != '1' else ''}, "
                               f"{len(args)} given")
            return _Val(T.ERR, False)
        t = T.call_result(e.func, [a.type for a in args])
        if t is None:
            bad = next(a for a, v in zip(e.args, args) if v.type not in T.NUMERIC)
            self.error(bad.span, f"`{e.func}` needs numbers, not bool")
            return _Val(T.ERR, False)
        return _Val(t, all(a.static for a in args))

    def _pattern_call(self, e: A.Call, scope) -> _Val:
        """`P(args)` in a mask: the conjunction of P's masks, P's tensors and lets brought in as
        by `use`. A name of the pattern (parameter, tensor, let, loop variable) hides P."""
        info = scope.info
        local = _local_kind(e.func, scope)
        if local is not None:
            self.error(e.span, f"`{e.func}` is a {local} here, which hides the pattern `{e.func}`",
                       f"rename the {local} to call the pattern")
            return _Val(T.ERR, False)
        if not self._allow_patterns:
            self.error(e.span, f"`{e.func}` is a pattern: a call of it can stand only in a `mask`",
                       f"write `mask {print_expr(e)}` for its masks, or `use {e.func}(...)` "
                       "to include all of its statements")
            return _Val(T.ERR, False)
        target = info.ref.module.scope[e.func]
        edge = (info.ref.qualname, target.qualname)
        if edge not in self.use_sites:
            self.call_edges.add(edge)
        self.uses.add_edge(*edge)
        self.use_sites.setdefault(edge, e.span)
        flags = self._allow_score, self._allow_names, self._allow_patterns
        try:  # checking P and the arguments checks other expressions
            other = self.pattern_info(target)
            if other.not_a_mask is not None:
                self.error(e.span, f"`{e.func}` cannot stand for a mask: it has {other.not_a_mask}",
                           "a pattern called in a mask gives only the conjunction of its masks; "
                           f"to include its other statements too, write `use {e.func}(...)`")
                return _Val(T.ERR, False)
            args = tuple(A.Arg(None, a, span=a.span) for a in e.args) + e.keywords
            self._bind_arguments(e.func, target, other, args, e.span, scope, e.func)
            line = f" at line {e.span.line}" if e.span else ""
            self._bring_in(e.func, other, e.span, scope, f"by `{e.func}(...)`{line}")
        finally:
            self._allow_score, self._allow_names, self._allow_patterns = flags
        return _Val(T.BOOL, False)

    @_expr.register
    def _(self, e: A.Index, scope):
        idx = [self._expr(i, scope) for i in e.indices]
        decl = scope.info.tensors.get(e.tensor)
        if decl is None:
            near = closest(e.tensor, scope.info.tensors)
            self.error(e.span, f"unknown tensor `{e.tensor}`",
                       f"did you mean `{near}`?" if near else
                       f"declare it: `tensor {e.tensor}: float[heads]`")
            return _Val(T.ERR, False)
        if len(e.indices) != len(decl.dims):
            self.error(e.span, f"tensor `{e.tensor}` has {len(decl.dims)} dimension"
                               f"{'s' if len(decl.dims) != 1 else ''} but is indexed with {len(e.indices)}",
                       f"declared as `{print_stmt(decl)}` at line {decl.span.line}" if decl.span else None)
            return _Val(T.ERR, False)
        for i, v in zip(e.indices, idx):
            if v.type not in (T.INT, T.ERR):
                self.error(i.span, f"a tensor index must be an int, not {v.type}",
                           "use floor() or ceil() to turn a float into an int")
        return _Val(decl.elem if decl.elem in A.ELEM_TYPES else T.ERR, False)

    @_expr.register
    def _(self, e: A.Unary, scope):
        v = self._expr(e.operand, scope)
        if v.type == T.ERR:
            return v
        if e.op == "not":
            if v.type != T.BOOL:
                self.error(e.span, f"`not` needs a boolean, not {v.type}")
                return _Val(T.ERR, v.static)
            return v
        if e.op == "~":
            if v.type != T.INT:
                self.error(e.span, f"`~` (bitwise not) needs an int, not {v.type}",
                           "write `not` for a boolean" if v.type == T.BOOL else
                           "floor() or ceil() turn a float into an int")
                return _Val(T.ERR, v.static)
            return v
        if v.type not in T.NUMERIC:
            self.error(e.span, f"unary `{e.op}` needs a number, not {v.type}")
            return _Val(T.ERR, v.static)
        return v

    @_expr.register
    def _(self, e: A.Binary, scope):
        l, r = self._expr(e.left, scope), self._expr(e.right, scope)
        lit = isinstance(e.right, A.Num) and isinstance(e.right.value, int) and e.right.value >= 0
        t = T.binary_result(e.op, l.type, r.type, lit)
        if t is None:
            if e.op in ("and", "or"):
                self.error(e.span, f"`{e.op}` needs booleans, got {l.type} and {r.type}",
                           "compare numbers first, e.g. `q - k > 0`")
            elif e.op in T.BIT_OPERATORS:
                word = {"&": "and", "|": "or"}.get(e.op)
                self.error(e.span, f"`{e.op}` is a bit operator on ints, got {l.type} and {r.type}",
                           f"for booleans write `{word}`" if word and T.BOOL in (l.type, r.type) else
                           "floor() or ceil() turn a float into an int")
            else:
                self.error(e.span, f"`{e.op}` needs numbers, got {l.type} and {r.type}")
            return _Val(T.ERR, l.static and r.static)
        if e.op in ("<<", ">>") and t == T.INT and not _known_when_unrolled(e.right, scope):
            self.error(e.right.span, f"the count of `{e.op}` must be known before the kernel runs: "
                                     "use only sizes, parameters, literals and loop variables")
            return _Val(T.ERR, False)
        return _Val(t, l.static and r.static)

    @_expr.register
    def _(self, e: A.Compare, scope):
        vals = [self._expr(o, scope) for o in e.operands]
        ok = True
        for op, a, b in zip(e.ops, vals, vals[1:]):
            t = T.compare_result(op, a.type, b.type)
            if t is None:
                self.error(e.span, f"cannot compare {a.type} with {b.type} using `{op}`")
                ok = False
            elif t == T.ERR:
                ok = False
        return _Val(T.BOOL if ok else T.ERR, all(v.static for v in vals))

    @_expr.register
    def _(self, e: A.IfExp, scope):
        c = self._expr(e.cond, scope)
        a, b = self._expr(e.body, scope), self._expr(e.orelse, scope)
        if c.type not in (T.BOOL, T.ERR):
            self.error(e.cond.span, f"the condition of `if` must be a boolean, not {c.type}")
        static = a.static and b.static and c.static
        if T.ERR in (a.type, b.type):
            return _Val(T.ERR, static)
        if a.type == b.type == T.BOOL:
            return _Val(T.BOOL, static)
        if a.type in T.NUMERIC and b.type in T.NUMERIC:
            return _Val(T.promote(a.type, b.type), static)
        self.error(e.span, f"the branches of `if` have different types: {a.type} and {b.type}")
        return _Val(T.ERR, static)

    @_expr.register
    def _(self, e: A.SumGen, scope):
        n = self._expr(e.count, scope)
        if n.type not in (T.INT, T.ERR):
            self.error(e.count.span, f"`range` needs an int, not {n.type}")
        elif n.type == T.INT and not n.static:
            self.error(e.count.span, f"the range of `{e.kind}` must be known before the kernel "
                                     "runs: use only sizes, parameters and literals")
        if e.var in scope.loop_vars or e.var in A.INDEX_NAMES or e.var in A.SIZE_NAMES or \
                e.var in scope.info.params or e.var in scope.info.lets or e.var in scope.info.tensors or \
                e.var in (scope.args or ()):
            self.error(e.span, f"loop variable `{e.var}` hides another name; pick a fresh one")
        outer = dict(scope.loop_vars)
        scope.loop_vars[e.var] = T.INT
        body = self._expr(e.body, scope)
        scope.loop_vars = outer
        if e.kind == "sum" and body.type == T.BOOL:
            self.error(e.body.span, "`sum` needs numbers, not booleans",
                       "`any(...)` or `all(...)` combine booleans")
            return _Val(T.ERR, False)
        if e.kind != "sum" and body.type in T.NUMERIC:
            self.error(e.body.span, f"`{e.kind}` needs booleans, not {body.type}",
                       "compare first, e.g. `q - k == i`")
            return _Val(T.ERR, False)
        return _Val(body.type, body.static and n.static)


def _known_when_unrolled(e: A.Expr, scope) -> bool:
    """Whether `e` is known when the kernel is compiled, once loops are unrolled: it reads only
    literals, sizes, parameters, lets of those and loop variables (a shift count)."""
    if isinstance(e, (A.Num, A.Bool)):
        return True
    if isinstance(e, A.Name):
        info = scope.info
        return (e.id in scope.loop_vars or e.id in A.SIZE_NAMES or e.id in info.params
                or e.id in info.static_lets)
    parts = {A.Unary: lambda: (e.operand,), A.Binary: lambda: (e.left, e.right),
             A.Compare: lambda: e.operands, A.IfExp: lambda: (e.body, e.cond, e.orelse),
             A.Call: lambda: e.args}.get(type(e))
    return parts is not None and all(_known_when_unrolled(x, scope) for x in parts())


def _not_a_mask(info: PatternInfo, what: str, span: Span | None, because: str | None = None) -> None:
    """Note the first statement that keeps `info`'s pattern from standing for a mask (`because`:
    why a `use`d pattern cannot)."""
    if info.not_a_mask is None:
        info.not_a_mask = what + (f" at {span}" if span else "") + \
            (f", which has {because}" if because else "")


def _local_kind(name: str, scope: _Scope) -> str | None:
    """What `name` is in the pattern being checked (a name there hides a pattern), or None."""
    info = scope.info
    for kind, table in (("loop variable", scope.loop_vars), ("parameter", info.params),
                        ("tensor", info.tensors), ("let", info.lets), ("let", info.ambiguous)):
        if name in table:
            return kind
    return None


def _name_span(span: Span | None, name: str) -> Span | None:
    """The span of the declared `name` inside a declaration's span (the whole span if the name
    is not found on its first line)."""
    if span is None:
        return None
    found = re.compile(rf"\b{name}\b").search(span.source.line(span.line), span.col - 1)
    if found is None:
        return span
    return Span(span.source, span.line, found.start() + 1, span.line, found.end() + 1)


def _def_header(d: A.Def) -> str:
    return f"def {d.name}(" + ", ".join(p.name + (f": {p.type}" if p.type else "") for p in d.params) + ")"


def _assignable(value_type: str, declared: str) -> bool:
    return value_type == declared or (declared == T.FLOAT and value_type == T.INT)


def _default_hint(typ: str) -> str:
    return {"int": "an int default is a whole number, e.g. `= 2`",
            "float": "e.g. `= 1.5`", "bool": "`= true` or `= false`"}[typ]


def _dedup(diags):
    seen, out = set(), []
    for d in diags:
        key = (str(d.span), d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def check_library(lib: Library) -> dict[str, PatternInfo]:
    """Check every module of `lib`; return the root's patterns, or raise SpecError with all errors."""
    return Checker(lib).run()
