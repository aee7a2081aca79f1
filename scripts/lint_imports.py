"""Check the package's import contracts (`[tool.importlinter]` in pyproject.toml).

import-linter reads the package from the file system, under the package's folder. In
this checkout `dart_triton.export`, `.client` and `.benchmarks` live in top-level folders
(`[tool.setuptools.package-dir]`), so the package is first laid out as the wheel lays it
out (a temporary copy of the .py files), and `lint-imports` runs over that copy.

    python scripts/lint_imports.py      # exit status of lint-imports
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lay_out(dest: Path) -> Path:
    """Copy the package's .py files into ``dest`` in the installed layout."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        parent = next((p for p in sorted(mapping, key=len, reverse=True)
                       if package == p or package.startswith(p + ".")), None)
        source = (ROOT / mapping[parent] / package[len(parent) + 1:].replace(".", "/")
                  if parent else ROOT / package.replace(".", "/"))
        target = dest / package.replace(".", "/")
        target.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*.py"):
            shutil.copy2(file, target / file.name)
    return dest


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dart-lint-imports-") as tmp:
        lay_out(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.call([str(lint), str(ROOT / "pyproject.toml"),
                                "--no-cache"], cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
