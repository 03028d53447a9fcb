"""The layout's rules, checked over the source (ast): no import circle, no private name
crossing a module border unless a ``# private: <why>`` comment on that line says why,
and no Python file over 850 lines (docs/design.md, "Layout").

Every import counts, at module level or inside a function (a deferred import that closes
a circle is still a circle). ``kernels/`` is checked as ``optden.kernels``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 850


def _modules() -> dict[str, Path]:
    """Module name -> file for optden/ and kernels/ (as optden.kernels)."""
    out = {}
    for base, pkg in ((ROOT / "optden", "optden"), (ROOT / "kernels", "optden.kernels")):
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()


def _package(name: str) -> str:
    """The package a module's relative imports start from."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package(mod)
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _is_extension(name: str) -> bool:
    """A compiled extension module of a package (optden._C), whichever platform suffix it has."""
    pkg, _, leaf = name.rpartition(".")
    if pkg not in MODULES or MODULES[pkg].name != "__init__.py":
        return False
    return any(MODULES[pkg].parent.glob(f"{leaf}.*.so")) or any(MODULES[pkg].parent.glob(f"{leaf}.*.pyd"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _excused(lines: list[str], node: ast.AST) -> bool:
    return any("# private:" in lines[i - 1] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1))


def _scan(mod: str, text: str | None = None):
    """(imported optden modules, [private-name crossings as 'file:line: what']) of module
    ``mod`` (its file, or the source ``text``)."""
    path = MODULES[mod]
    text = path.read_text() if text is None else text
    lines = text.splitlines()
    tree = ast.parse(text)
    deps, bad, aliases = set(), [], {}
    where = f"{path.relative_to(ROOT)}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    deps.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(mod, node)
            if src not in MODULES:
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if _is_extension(sub):  # the compiled optden._C: a module, not a name
                    continue
                if sub in MODULES:  # a module: private modules (_ext, _args) are their package's
                    deps.add(sub)
                    aliases[a.asname or a.name] = sub
                    continue
                deps.add(src)
                if _private(a.name) and not _excused(lines, node):
                    bad.append(f"{where}:{node.lineno}: imports {a.name} from {src}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target is not None and _private(node.attr) and f"{target}.{node.attr}" not in MODULES \
                    and not _excused(lines, node):
                bad.append(f"{where}:{node.lineno}: reads {target}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value) and not _excused(lines, node):
            bad.append(f"{where}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    deps.discard(mod)
    return deps, bad


SCANS = {m: _scan(m) for m in MODULES}


def _cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    graph = {m: {d for d in deps if d in MODULES} for m, (deps, _) in SCANS.items()}
    assert _cycles(graph) == []


def test_no_private_name_crosses_a_module_border():
    bad = [b for _, found in SCANS.values() for b in found]
    assert bad == [], "\n".join(bad)


def test_no_python_file_over_850_lines():
    files = [f for d in ("optden", "kernels", "tests", "bench") for f in (ROOT / d).rglob("*.py")]
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_scan_sees_what_it_checks():
    """The checks are not vacuous: the wings are found, their imports resolved, and a
    private import or a circle planted in a copy of the graph is caught."""
    assert {"optden.engine.partial", "optden.data.dataset", "optden.prune.pruner", "optden.calling",
            "optden.kernels.dense"} <= set(MODULES)
    assert "optden.engine.partial" in SCANS["optden.engine.precision"][0]
    assert "optden.data.storage" in SCANS["optden.engine.rows"][0]
    graph = {m: set(deps) for m, (deps, _) in SCANS.items()}
    graph["optden.engine.partial"].add("optden.engine.precision")
    assert ["optden.engine.partial", "optden.engine.precision"] in _cycles(graph)
    probe = "from .sampling import _generator\nfrom .calling import DenoiserCall  # private: no\n" \
            "import optden.sampling as S\nS._generator\nS.sample\ngetattr(S, '_x')\n"
    _, bad = _scan("optden.memorization", probe)
    assert [b.split(": ", 1)[1] for b in bad] == [
        "imports _generator from optden.sampling", "reads optden.sampling._generator", "getattr(..., '_x')"]


def test_design_references_resolve():
    """Every reference to a section of docs/design.md in the code (the file name, a comma
    and the section's title in double quotes) names one of its headings, and no
    reference points to a design file outside the repository."""
    import re

    headings = {re.sub(r"^\d+\.\s*", "", ln[3:]).strip()
                for ln in (ROOT / "docs" / "design.md").read_text().splitlines() if ln.startswith("## ")}
    refs, stale = set(), []
    for d in ("optden", "kernels", "tests", "bench"):
        for f in (ROOT / d).rglob("*.py"):
            text = f.read_text()
            refs |= set(re.findall(r'docs/design\.md,\s*"([^"]+)"', text))
            stale += [str(f.relative_to(ROOT))] if re.search(r"(?<!docs/)DESIGN\.md", text) else []
    assert refs and refs <= headings, refs - headings
    assert stale == []
