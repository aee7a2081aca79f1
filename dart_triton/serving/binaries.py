"""Which tritonserver runs, and the environment its python-backend stubs need.

Two binaries are supported. A ``tritonserver`` on PATH wins (the NGC container).
Otherwise the one bundled in the ``nvidia-pytriton`` wheel (tritonserver 2.51, python
backend only, runs on CPU) is used; it needs some help to run outside pytriton:

* the python backend expects ``triton_python_backend_stub`` next to
  ``libtriton_python.so``, but the wheel keeps one stub per Python version elsewhere,
  so a backend directory of symlinks is laid out in a scratch directory;
* the stub is an embedded interpreter isolated from PYTHONPATH: it finds its
  environment through ``python3`` on PATH, so that bin dir goes first. The stub is
  built against numpy 1.x and corrupts BYTES tensors under numpy 2, so it runs as
  ``.tools/triton-python`` where scripts/install_triton_tools.sh made one for this
  venv (numpy<2 over this same venv); without it, numpy>=2 here is refused;
* the stub links ``libpython3.X.so.1.0``: it must be this interpreter's build (a
  distro libpython of the same minor version can miss symbols, e.g. ``_PyModule_Add``),
  so sysconfig's LIBDIR goes first on LD_LIBRARY_PATH, then ``nvidia_pytriton.libs``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

INSTALL_HINT = "run scripts/install_triton_tools.sh (or pip install 'dart-triton[serve]')"


class TritonServerError(RuntimeError):
    """tritonserver could not be started or did not become ready; the text quotes its log."""


# Locating the binary ------------------------------------------------------------------


def _pytriton_dir() -> Path | None:
    # find_spec does not import pytriton (its import pulls numpy<2-era deps we never use).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def bundled_tritonserver_dir() -> Path | None:
    """``pytriton/tritonserver`` of the installed nvidia-pytriton wheel, if any."""
    root = _pytriton_dir()
    path = root / "tritonserver" if root else None
    return path if path and (path / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> Path:
    """A ``tritonserver`` on PATH (NGC container), else the nvidia-pytriton bundled one."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    bundled = bundled_tritonserver_dir()
    if bundled is None:
        raise FileNotFoundError(f"no tritonserver on PATH nor in nvidia-pytriton: {INSTALL_HINT}")
    return bundled / "bin" / "tritonserver"


def is_bundled(binary: Path) -> bool:
    bundled = bundled_tritonserver_dir()
    return bundled is not None and binary.resolve().is_relative_to(bundled.resolve())


def prepare_backend_dir(dest: Path, python_version: str | None = None) -> Path:
    """Lay out ``dest/python/`` with the bundled python backend and the stub for this Python.

    Symlinks, not copies: the stub resolves its RPATH from its real location.
    """
    bundled = bundled_tritonserver_dir()
    if bundled is None:
        raise FileNotFoundError(f"nvidia-pytriton is not installed: {INSTALL_HINT}")
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundled / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no python backend stub for Python {version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [*(bundled / "backends" / "python").iterdir(), stub]:
        link = python_dir / src.name
        if src.name != "__pycache__" and not link.exists():
            link.symlink_to(src)
    return dest


def tools_dir() -> Path:
    """Where scripts/install_triton_tools.sh puts its tools: ``$DART_TRITON_TOOLS``, else
    ``.tools`` of the source checkout this runs from, else ``dart-triton-tools`` in this
    environment (an installed wheel: the tools belong to the environment they serve)."""
    env = os.environ.get("DART_TRITON_TOOLS")
    checkout = Path(__file__).resolve().parents[2]
    if env or (checkout / "pyproject.toml").is_file():
        return Path(env) if env else checkout / ".tools"
    return Path(sys.prefix) / "dart-triton-tools"


def stub_python_bin(binary: Path | None = None) -> Path:
    """The bin dir whose ``python3`` the python-backend stubs will run as.

    This interpreter's own (not resolved: a venv's bin, not the base install's), except
    for the bundled stub, which needs numpy<2: then the overlay env made for this venv.
    """
    own = Path(sys.executable).parent
    if binary is not None and not is_bundled(binary):
        return own
    overlay = tools_dir() / "triton-python"
    marker = overlay / "FOR_PREFIX"  # "<venv prefix> numpy==X py3.Y", by the install script
    fields = marker.read_text().split() if marker.is_file() else []
    if fields[:1] == [sys.prefix] and f"py{sys.version_info[0]}.{sys.version_info[1]}" in fields:
        return overlay / "bin"
    numpy_version = importlib.metadata.version("numpy")
    if int(numpy_version.split(".")[0]) >= 2:
        raise TritonServerError(
            f"this environment has numpy {numpy_version}, but the python backend stub "
            "bundled in nvidia-pytriton is built against numpy 1.x and corrupts BYTES "
            f"tensors with numpy 2. Run scripts/install_triton_tools.sh (it prepares "
            f"{overlay}: numpy<2 over this venv) or install numpy<2."
        )
    return own


def server_env(
    binary: Path | None = None,
    base: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for tritonserver so that python-backend stubs run in this environment."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(stub_python_bin(binary)), *_split(env.get("PATH"))])
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    bundled = bundled_tritonserver_dir()
    if bundled is not None and (binary is None or is_bundled(binary)):
        libs.append(str(bundled.parent.parent / "nvidia_pytriton.libs"))
    libs += _split(env.get("LD_LIBRARY_PATH"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    # The stubs' OpenMP threads (PyTorch on the CPU) sleep between runs instead of
    # spinning: spinning threads of one model take the cores from the others.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(overrides or {})
    return env


def _split(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p]

