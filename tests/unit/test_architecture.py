"""The package's shape: no import cycle, no private name imported across modules, no
module over 500 lines. (The rooms' layering is `scripts/lint_imports.py`, run by the test
command: import-linter's contracts in pyproject.toml.)"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
SOURCES = ("dart_triton", "export", "client", "benchmarks")
MAX_LINES = 500

sys.path.insert(0, str(ROOT / "scripts"))
from lint_imports import lay_out  # noqa: E402

_GRAPH = """
import json, grimp
graph = grimp.build_graph("dart_triton")
print(json.dumps({m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}))
"""


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


@pytest.fixture(scope="module")
def import_graph() -> dict[str, list[str]]:
    """Every module of the installed layout -> the project modules it imports (anywhere in
    the file: top level, functions, TYPE_CHECKING blocks), from grimp."""
    with tempfile.TemporaryDirectory() as tmp:
        lay_out(Path(tmp))
        out = subprocess.run([sys.executable, "-c", _GRAPH], capture_output=True, text=True,
                             cwd=tmp, env={"PYTHONPATH": tmp, "PATH": "/usr/bin:/bin"},
                             check=True, timeout=120)
    return json.loads(out.stdout)


def test_no_import_cycle(import_graph):
    import networkx as nx

    graph = nx.DiGraph([(a, b) for a, bs in import_graph.items() for b in bs])
    # A package's __init__ importing its own submodules is how a package exports names;
    # none of ours does, so every strongly connected component must be one module.
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, cycles
    assert len(import_graph) > 80  # the whole package was read


def test_no_private_name_imported_across_modules():
    found = []
    for path in _python_files(*SOURCES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    "dart_triton")):
                private = [a.name for a in node.names
                           if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {private}")
    assert not found, found


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _python_files("dart_triton", "export", "client")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
