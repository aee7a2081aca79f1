"""A fresh virtual environment with the project's wheel installed, as a user (or the
container image) gets it: shared by test_packaging.py and test_container_layout.py through
the session fixture `wheel_env` (tests/conftest.py).

* The sdist is built from a copy of the package sources (so nothing is written into the
  checkout), then the wheel from the sdist, with ``python -m build``: both must build
  without a warning.
* The venv gets the wheel and nothing else of the project. The heavy dependencies (torch,
  transformers, onnxruntime, nvidia-pytriton's tritonserver) are reused from the project
  venv through a ``.pth`` line that names its site-packages as a plain path: a plain line
  does not run that directory's own ``.pth`` files, so the editable install's finder
  (which maps ``dart_triton`` onto the checkout) never loads; ``dart_triton`` can only
  come from the wheel.
* The bundled tritonserver's python-backend stub needs numpy<2 (see dart_triton.serving.binaries).
  For the project venv, scripts/install_triton_tools.sh makes ``.tools/triton-python``;
  this venv gets the same kind of overlay at the default place an installed package looks
  for it (``<venv>/dart-triton-tools``), with the same numpy 1.26 files, then this venv's
  packages, then the project venv's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
DIST = "dart-triton"
# Environment variables of the test process that must not reach the installed commands.
_SCRUB = ("PYTHONPATH", "VIRTUAL_ENV", "DART_TRITON_TOOLS", "PYTHONHOME", "PYTHONSTARTUP")


@dataclass
class WheelEnv:
    venv: Path
    wheel: Path
    sdist: Path
    build_log: str  # everything `python -m build` printed

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """The test's environment with this venv activated, and nothing of the project's."""
        own_bin = str(Path(sys.executable).parent)
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != own_bin]
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(PATH=os.pathsep.join([str(self.bin), *path]), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
        env.update(extra)
        return env

    def run(self, args: list[str], cwd: Path, timeout: float = 300,
            **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=cwd, env=self.env(**extra_env), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _purelib(python: Path | str) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                          "['purelib'])"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def copy_sources(dest: Path) -> Path:
    """pyproject.toml, README.md and the folders pyproject maps onto packages."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in sorted(folders):
        shutil.copytree(ROOT / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results"))
    return dest


def build_distributions(src: Path, out: Path) -> tuple[Path, Path, str]:
    """sdist, then the wheel from that sdist (what `python -m build` does by default)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    res = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                         env=env, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"python -m build failed:\n{log[-4000:]}")
    (wheel,) = out.glob("dart_triton-*.whl")
    (sdist,) = out.glob("dart_triton-*.tar.gz")
    return wheel, sdist, log


def _stub_overlay(venv: Path, project_purelib: Path) -> None:
    """``<venv>/dart-triton-tools/triton-python``: numpy 1.x first, then the venv's packages."""
    from dart_triton.serving.binaries import tools_dir

    numpy1 = tools_dir() / "triton-python"
    numpy1_site = next((numpy1 / "lib").glob("python3.*/site-packages"), None)
    if numpy1_site is None or not (numpy1_site / "numpy").is_dir():
        raise RuntimeError(f"no numpy<2 overlay at {numpy1}: run scripts/install_triton_tools.sh")
    numpy_version = next(numpy1_site.glob("numpy-*.dist-info")).name.split("-")[1]
    overlay = venv / "dart-triton-tools" / "triton-python"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(overlay)],
                   check=True)
    lines = [numpy1_site, _purelib(venv / "bin" / "python"), project_purelib]
    (_purelib(overlay / "bin" / "python3") / "zz_dart_triton_venv.pth").write_text(
        "".join(f"{p}\n" for p in lines))
    prefix = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    major, minor = sys.version_info[:2]
    (overlay / "FOR_PREFIX").write_text(f"{prefix} numpy=={numpy_version} py{major}.{minor}\n")


def make_wheel_env(tmp: Path) -> WheelEnv:
    wheel, sdist, log = build_distributions(copy_sources(tmp / "src"), tmp / "dist")
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # This pip installs into the new venv (--python): only the wheel, no dependencies.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True)
    project_purelib = Path(sysconfig.get_paths()["purelib"])
    (_purelib(venv / "bin" / "python") / "zz_project_dependencies.pth").write_text(
        f"{project_purelib}\n")
    _stub_overlay(venv, project_purelib)
    shutil.rmtree(tmp / "src")
    return WheelEnv(venv, wheel, sdist, log)


def sdist_members(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as tar:
        return [m.split("/", 1)[1] for m in tar.getnames() if "/" in m]
