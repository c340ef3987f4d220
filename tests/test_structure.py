"""The shape of the code: layers import downward only, no module reaches for another's private
names, no import cycles.

Layers, top to bottom: `attnc` (the facade and CLI) -> `runtime` -> `lowering` -> `dsl`
(`stdlib` holds only .attn files). A module may import its own layer and the layers below;
imports inside functions count too. Tests may use any public name, never an underscore one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> (package name, layer rank: higher may import lower)
LAYERS = {"attnc": ("attnc", 3), "runtime": ("attnc.runtime", 2), "lowering": ("attnc.lowering", 1),
          "dsl": ("attnc.dsl", 0)}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for folder, (package, _) in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path):
    """(imported module, imported names) for every import statement of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, ()
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            yield target, tuple(a.name for a in node.names)


def _layer(module: str) -> int | None:
    best = None
    for package, rank in LAYERS.values():
        if module == package or module.startswith(package + "."):
            if best is None or len(package) > len(best[0]):
                best = (package, rank)
    return None if best is None else best[1]


def _graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for target, names in _imports(name, path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    g.add_edge(name, candidate)
                    break
    return g


def test_layers_import_downward_only():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        own = _layer(name)
        for target, _ in _imports(name, path):
            layer = _layer(target)
            if layer is not None and layer > own:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_no_private_names_cross_modules():
    files = dict(_modules())
    files.update({f"tests.{p.stem}": p for p in sorted((ROOT / "tests").glob("*.py"))})
    files.update({f"bench.{p.stem}": p for p in sorted((ROOT / "bench").glob("*.py"))})
    wrong = []
    for name, path in files.items():
        for target, names in _imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and (target.startswith("attnc") or target in files):
                wrong.append(f"{name} imports {', '.join(private)} from {target}")
    assert not wrong, "imports of another module's underscore names:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_the_checks_see_the_package():
    """The rules above are not vacuous: they see every layer and the real import edges."""
    g = _graph()
    assert {"attnc.api", "attnc.runtime.pattern", "attnc.lowering.emit", "attnc.dsl.parser"} <= set(g)
    assert g.has_edge("attnc.runtime.dispatch", "attnc.runtime.launch")
    assert g.has_edge("attnc.lowering.emit", "attnc.lowering.signature")


def test_only_config_reads_the_environment():
    """Environment variables are read in one place, `dsl/config.py` (house style 8)."""
    wrong = []
    for name, path in _modules().items():
        if name == "attnc.dsl.config":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                wrong.append(f"{name}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
                    {a.name for a in node.names} & {"environ", "getenv", "environb"}:
                wrong.append(f"{name}:{node.lineno}")
    assert not wrong, "environment reads outside dsl/config.py:\n" + "\n".join(wrong)
