"""Layers run one way: no import circles anywhere in hatc (imports inside functions and
under TYPE_CHECKING count), the torch-free runtime imports nothing from the compiler,
and static models never import elastic ones."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hatc"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The hatc modules ``path`` imports anywhere in its source (not its own parent packages)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_circles(graph):
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import circle: {' -> '.join(e.args[1])}")


def test_the_walker_finds_a_circle():
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()


def test_the_runtime_imports_nothing_from_the_compiler_or_the_models(graph):
    for module in [m for m in graph if m == "hatc.runtime" or m.startswith("hatc.runtime.")]:
        bad = {
            m
            for m in reachable(graph, module)
            if m.startswith(("hatc.compile", "hatc.static", "hatc.elastic", "hatc.train", "hatc.decode"))
        }
        assert not bad, f"{module} reaches {sorted(bad)}"


def test_static_models_never_import_elastic_ones(graph):
    bad = {m for m in reachable(graph, "hatc.static") if m.startswith(("hatc.elastic", "hatc.train"))}
    assert not bad, sorted(bad)


BLOCKED = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch" or name == "hatc.compile" or name.startswith("hatc.compile."):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Blocked())
import hatc.runtime
from hatc.runtime import Translator, open_artifact
from hatc.runtime import artifact, backends, manifest, signing, translator  # every runtime module
import hatc.runtime.beam, hatc.runtime.runners, hatc.runtime.signature
print("ok")
"""


def test_the_runtime_imports_with_the_compiler_and_torch_blocked():
    result = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
