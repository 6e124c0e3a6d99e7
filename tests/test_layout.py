"""The package's shape, read from its imports (docs/design.md §1): no import cycle, the command
lines on top, nn/ on torch alone, analysis/ without torch or p4bg, no private name imported
across modules, no module over ~450 lines, and nothing that points outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("p4bg", "analysis")
COMMANDS = {f"p4bg.{name}" for name in ("train", "sample", "analyze", "simulate", "remd", "demo",
                                        "umbrella", "systems.__main__")}  # fmt: skip
MAX_LINES = 460


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every run-time import of the module,
    resolved to modules of this repository (``from p4bg.training import loop`` is
    p4bg.training.loop); imports under ``if TYPE_CHECKING:`` are left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: no import at run time
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            found += [(f"{base}.{n}", [], node.lineno) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                found.append((base, rest, node.lineno))
    return [(m, n, line) for m, n, line in found if m.split(".")[0] in (*PACKAGES, "torch")]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_import_cycle():
    edges = {m: {t for t, _, _ in GRAPH[m] if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t) :], t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


def test_layers():
    problems = []
    for m, imports in GRAPH.items():
        for target, _, line in imports:
            where = f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
            if (
                m.startswith("p4bg.nn")
                and target.split(".")[0] == "p4bg"
                and not (target.startswith("p4bg.nn"))
            ):
                problems.append(f"{where} (nn/ depends on torch alone)")
            if m.startswith("analysis") and target.split(".")[0] in ("p4bg", "torch"):
                problems.append(f"{where} (analysis/ never imports torch or p4bg)")
            if target in COMMANDS and m != target:
                problems.append(f"{where} (a command line is the top layer)")
    assert not problems, "\n".join(problems)


def test_no_private_name_across_modules():
    problems = []
    for m, imports in GRAPH.items():
        for target, names, line in imports:
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if target in MODULES and target != m and private:
                problems.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {private} of {target}")
            if target.rpartition(".")[2].startswith("_") and target in MODULES:
                problems.append(f"{MODULES[m].relative_to(ROOT)}:{line}: private module {target}")
    assert not problems, "\n".join(problems)


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_package_says_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for m, p in MODULES.items()
               if p.name == "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]  # fmt: skip
    assert not missing, f"package without a docstring: {missing}"


def test_the_repository_stands_alone():
    """No path outside the repository, and no design document but docs/design.md."""
    pattern = re.compile(r"shared/|\.\./|DESIGN\.md")
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *MODULES.values(), ROOT / "Makefile", ROOT / "pyproject.toml"]  # fmt: skip
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line)]  # fmt: skip
    assert not hits, "\n".join(hits[:20])
