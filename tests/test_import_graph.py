"""The import graph of `dsc` (with `passes/` as `dsc.passes`) has no cycles and no private reach.

Every `import` counts, function-level ones included: a cycle hidden inside a function still
ties two modules into one unit that cannot be understood, tested or moved apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"dsc": REPO / "dsc", "dsc.passes": REPO / "passes", "dsc.profiles": REPO / "profiles"}


def modules() -> dict[str, Path]:
    """{dotted module name: file} for every module of the installed package layout."""
    mods: dict[str, Path] = {}
    for pkg, root in ROOTS.items():
        for f in sorted(root.rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join((pkg, *parts))] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name or None


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, str]]]:
    """{module: {(imported module, imported name or "")}}, function-level imports included."""
    out: dict[str, set[tuple[str, str]]] = {m: set() for m in mods}
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (t := _resolve(a.name, mods)) and t != name:
                        out[name].add((t, ""))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        if full != name:
                            out[name].add((full, ""))
                    elif (t := _resolve(base, mods)) and t != name:
                        out[name].add((t, a.name))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_no_import_cycles():
    mods = modules()
    graph = {m: {t for t, _ in edges} for m, edges in imports(mods).items()}
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_passes_do_not_import_validation():
    mods = modules()
    bad = sorted(
        (m, t)
        for m, edges in imports(mods).items()
        if m.startswith("dsc.passes")
        for t, _ in edges
        if t == "dsc.validate" or t.startswith("dsc.validate.")
    )
    assert bad == []


def _package(module: str, mods: dict[str, Path]) -> str:
    return module if mods[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def private_reach(mods: dict[str, Path]) -> list[str]:
    """Imports of a private name (`_x`) from outside the module's own package, and of a
    private module (`pkg._mod`) from outside `pkg`."""
    bad = []
    for m, edges in imports(mods).items():
        home = _package(m, mods)
        for t, name in edges:
            private_module = next(
                (
                    i
                    for i, part in enumerate(t.split("."))
                    if part.startswith("_") and not part.startswith("__")
                ),
                None,
            )
            if private_module is not None:
                owner = ".".join(t.split(".")[:private_module])
                if not (home == owner or home.startswith(owner + ".")):
                    bad.append(f"{m} imports private module {t}")
            if name.startswith("_") and not name.startswith("__") and home != _package(t, mods):
                bad.append(f"{m} imports {t}.{name}")
    return sorted(set(bad))


def test_no_private_names_across_modules():
    """`from x import _name` only within x's package; `pkg._mod` only from inside `pkg`."""
    assert private_reach(modules()) == []


# What the CLI may import from dsc besides `dsc.api` (the work), `dsc.errors` and its own
# package: the version, signal handling for `main`, the precision names of a click.Choice, and
# output formatting.
CLI_MAY_IMPORT = {
    ("dsc", "__version__"),
    ("dsc.signals", ""),
    ("dsc.precision", "TARGET_PRECISIONS"),
    ("dsc.manifest", "format_inspect"),
    ("dsc.plan", "format_plan"),
    ("dsc.plan", "format_table"),
    ("dsc.passes.coverage", "format_coverage"),
    ("dsc.matrix.run", "format_summary"),
    ("dsc.matrix.run", "to_json"),
}


def test_cli_calls_only_the_api():
    """`dsc.cli` maps flags onto `dsc.api`: it reaches no library module for the work."""
    mods = modules()
    bad = sorted(
        f"{m} imports {t}{'.' + name if name else ''}"
        for m, edges in imports(mods).items()
        if m == "dsc.cli" or m.startswith("dsc.cli.")
        for t, name in edges
        if t not in ("dsc.api", "dsc.errors")
        and not t.startswith("dsc.cli")
        and (t, name) not in CLI_MAY_IMPORT
    )
    assert bad == []
