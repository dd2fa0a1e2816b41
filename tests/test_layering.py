"""The house's layering, read from the imports of every module (top-level and inside functions alike).

    net (networks, losses, PSAM maths)  <-  data (datasets, lists, toy generator)  <-  sp_cam  <-  tools

``dataset_root`` sits beside ``net`` on the ground floor. A stage never imports another stage (only the pipeline
driver runs them), tools import no stage, and no group of modules imports itself in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("net", "data", "sp_cam", "tools")
ALLOWED = {
    "dataset_root": set(),
    "net": {"net"},
    "data": {"net", "data", "dataset_root"},
    "sp_cam": {"net", "data", "dataset_root", "sp_cam"},
    "tools": {"net", "data", "dataset_root", "sp_cam", "tools"},
}
STAGES = {
    "sp_cam.train_cls",
    "sp_cam.train_fcn",
    "sp_cam.export_cams",
    "sp_cam.make_pseudo",
    "sp_cam.ablation",
    "sp_cam.train_seg",
    "sp_cam.eval_seg",
}
DRIVER = "sp_cam.pipeline"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [ROOT / "dataset_root.py"] + [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``name`` imports (``from pkg import mod`` resolves to ``pkg.mod`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_down(name):
    layer = name.split(".")[0]
    wrong = sorted(t for t in GRAPH[name] if t.split(".")[0] not in ALLOWED[layer])
    assert not wrong, f"{name} ({layer}) imports a higher layer: {wrong}"


def test_no_stage_imports_another_stage_and_tools_import_no_stage():
    offenders = []
    for name, targets in GRAPH.items():
        if name == DRIVER:
            continue
        offenders += [f"{name} -> {t}" for t in sorted(targets & STAGES)]
    assert not offenders, offenders
    assert STAGES <= set(GRAPH)  # the list above names real modules


def test_no_circles():
    """Depth-first search for a back edge; reports one circle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state:
            circle = visit(start)
            assert circle is None, " -> ".join(circle)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser resolves absolute, ``from pkg import module`` and relative imports, so a violation is caught."""
    fake = tmp_path / "net" / "bad.py"
    fake.parent.mkdir()
    fake.write_text(
        "from sp_cam import engine\nimport data.toy\nfrom . import psam\n\ndef f():\n    import tools.report\n"
    )
    known = {"net.bad", "net.psam", "sp_cam", "sp_cam.engine", "data", "data.toy", "tools.report"}
    assert _imports("net.bad", fake, known) == {"sp_cam.engine", "data.toy", "net.psam", "tools.report"}
