"""The package's four wings, read from its imports (ast): model/ and data/ know nothing of each other
or of train/; train/ knows nothing of analysis/; only the top files and analysis/ reach across; no
module imports a command file or runs in a circle (README, "The code")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alexnet2gpu"
WINGS = ("model", "data", "train", "analysis")
BASE = {"config", "files", "devices", "progress"}  # the top files every wing may read
# what each part may import from the package, besides itself
ALLOWED = {
    "config": set(),
    "files": set(),
    "devices": set(),
    "progress": set(),
    "model": {"config"},
    "data": {"config", "files", "progress"},
    "train": BASE | {"model", "data"},
    "analysis": BASE | {"model", "data", "train"},
    "caffe": BASE | {"model", "data", "train"},
    "bench": BASE | {"model", "data", "train"},
    "__init__": BASE | {"model"},
    "cli": BASE | {*WINGS, "caffe", "bench"},
    "__main__": {"cli"},
}


def part_of(module: str) -> str:
    """`alexnet2gpu.train.loop` -> "train"; `alexnet2gpu.cli` -> "cli"; the package itself -> "__init__"."""
    parts = module.split(".")[1:]
    return parts[0] if parts else "__init__"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def targets(node: ast.AST, root: Path) -> list[str]:
    """The package modules an import statement reads; `from alexnet2gpu.data import staged` reads
    `alexnet2gpu.data.staged` (a name imported from a package may be a module)."""
    package = root.name
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == package]
    if not isinstance(node, ast.ImportFrom) or node.level or not node.module or node.module.split(".")[0] != package:
        return []
    folder = root.parent.joinpath(*node.module.split("."))
    if folder.is_dir():
        return [f"{node.module}.{a.name}" for a in node.names]
    return [node.module]


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the package in a file, at any depth (lazy imports too)."""
    return [(node.lineno, t) for node in ast.walk(ast.parse(path.read_text())) for t in targets(node, root)]


def graph(root: Path) -> dict[str, list[tuple[int, str]]]:
    return {module_name(p, root): imports(p, root) for p in sorted(root.rglob("*.py"))}


def violations(root: Path) -> list[str]:
    """Every import that runs against the rule, as "file:line: a -> b"."""
    found = []
    modules = graph(root)
    for module, targets in modules.items():
        me = part_of(module)
        allowed = ALLOWED.get(me)
        if allowed is None:
            found.append(f"{module}: a top-level part the rule does not know ({me}); add it to ALLOWED")
            continue
        for line, target in targets:
            them = part_of(target)
            if them != me and them not in allowed:
                found.append(f"{module}:{line}: {me} -> {target}")
    return found


def cycles(root: Path) -> list[list[str]]:
    """Circles among the modules' top-level imports (a lazy import inside a function is no circle)."""
    edges: dict[str, set[str]] = {}
    edges_all = {module_name(p, root) for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        tree = ast.parse(path.read_text())
        out = {t for node in tree.body for t in targets(node, root)}
        out = {t if t in edges_all else t.rsplit(".", 1)[0] for t in out}  # a name, not a module: its module
        edges[name] = out
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    return found


def test_every_import_points_down_the_wings():
    assert violations(PACKAGE) == []


def test_no_module_imports_in_a_circle():
    assert cycles(PACKAGE) == []


def test_the_tree_has_the_four_wings_and_nothing_flat_beside_them():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "bench", "caffe", "cli", "config", "devices", "files", "progress"]
    for wing in WINGS:
        assert (PACKAGE / wing / "__init__.py").is_file(), wing
    assert {p.parent.name for p in PACKAGE.rglob("*.py")} <= {"alexnet2gpu", *WINGS}


def test_no_private_name_is_imported_across_modules():
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE.name):
                private += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("model/bad.py", "from alexnet2gpu.data.datasets import batches\n", "model -> alexnet2gpu.data.datasets"),
        ("data/bad.py", "def f():\n    from alexnet2gpu.model import alexnet\n", "data -> alexnet2gpu.model.alexnet"),
        ("train/bad.py", "from alexnet2gpu.analysis import figures\n", "train -> alexnet2gpu.analysis.figures"),
        ("model/bad.py", "import alexnet2gpu.cli\n", "model -> alexnet2gpu.cli"),
        ("analysis/bad.py", "from alexnet2gpu import cli\n", "analysis -> alexnet2gpu.cli"),
    ],
)
def test_the_checker_catches_an_import_against_the_rule(tmp_path, path, source, expected):
    root = tmp_path / "alexnet2gpu"
    for wing in WINGS:
        (root / wing).mkdir(parents=True)
        (root / wing / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "config.py").write_text("")
    (root / path).write_text(source)
    assert [v.split(": ", 1)[1] for v in violations(root)] == [expected]


def test_the_checker_catches_a_circle(tmp_path):
    root = tmp_path / "alexnet2gpu"
    (root / "data").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "data" / "__init__.py").write_text("")
    (root / "data" / "a.py").write_text("from alexnet2gpu.data.b import x\n")
    (root / "data" / "b.py").write_text("from alexnet2gpu.data import a\nx = 1\n")
    assert cycles(root) != []
