"""docker/install_tensorrt_python.sh reads the TensorRT version from the library's real
path, on the file layouts Debian/Ubuntu packages (and NVIDIA's tar files) install: fake
directory trees and a stub dpkg-query, `--print` (nothing is installed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "docker" / "install_tensorrt_python.sh"


def _library(root: Path, directory: str, release: str, *, link: bool = True,
             dev_link: bool = True) -> Path:
    """libnvinfer.so.X.Y.Z, its soname link libnvinfer.so.X (as the libnvinfer deb ships
    it) and the unversioned dev link (libnvinfer-dev)."""
    lib = root / directory.lstrip("/")
    lib.mkdir(parents=True, exist_ok=True)
    major = release.split(".")[0]
    real = lib / f"libnvinfer.so.{release}"
    if link:
        real.write_bytes(b"\x7fELF")
        (lib / f"libnvinfer.so.{major}").symlink_to(real.name)
    else:  # a soname that is a plain file: no release in any name
        (lib / f"libnvinfer.so.{major}").write_bytes(b"\x7fELF")
    if dev_link:
        (lib / "libnvinfer.so").symlink_to(f"libnvinfer.so.{major}")
    return lib


def _run(tmp_path: Path, lib_dirs: list[Path], owners: dict[Path, tuple[str, str]] | None = None,
         **env: str) -> subprocess.CompletedProcess:
    """The script with a dpkg-query that knows `owners`: file -> (package, version)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    search = "".join(f'    "{f}") echo "{pkg}: $2";;\n' for f, (pkg, _) in (owners or {}).items())
    versions = "".join(f'    "{pkg.split(":")[0]}") printf %s "{v}";;\n'
                       for pkg, v in (owners or {}).values())
    stub = bin_dir / "dpkg-query"
    stub.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == -S ]]; then
  case "$2" in
{search}    *) echo "dpkg-query: no path found matching pattern $2" >&2; exit 1;;
  esac
elif [[ "$1" == -W ]]; then
  case "${{@: -1}}" in
{versions}    *) exit 1;;
  esac
fi
""")
    stub.chmod(0o755)
    return subprocess.run(
        ["bash", str(SCRIPT), "--print"], capture_output=True, text=True, timeout=60,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin",
             "DART_TRT_LIB_DIRS": ":".join(str(d) for d in lib_dirs), **env})


def _printed(res: subprocess.CompletedProcess) -> dict[str, str]:
    assert res.returncode == 0, res.stderr + res.stdout
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line
                and not line.startswith("["))


@pytest.mark.parametrize(("directory", "package"), [
    ("/usr/lib/x86_64-linux-gnu", "libnvinfer10:amd64"),  # Debian/Ubuntu amd64 deb
    ("/usr/lib/aarch64-linux-gnu", "libnvinfer10:arm64"),  # Ubuntu arm64 (SBSA) deb
    ("/usr/lib/x86_64-linux-gnu", "libnvinfer10"),  # dpkg without an arch qualifier
])
def test_debian_packages_give_the_full_version(tmp_path, directory, package):
    lib = _library(tmp_path, directory, "10.9.0")
    owners = {lib / "libnvinfer.so.10.9.0": (package, "10.9.0.34-1+cuda12.8")}
    assert _printed(_run(tmp_path, [lib], owners)) == {
        "version": "10.9.0.34", "cuda": "12", "requirement": "tensorrt-cu12==10.9.0.34"}


def test_tensorrt_11_packages(tmp_path):
    lib = _library(tmp_path, "/usr/lib/x86_64-linux-gnu", "11.4.0")
    owners = {lib / "libnvinfer.so.11.4.0": ("libnvinfer11:amd64", "11.4.0.106-1+cuda13.0")}
    assert _printed(_run(tmp_path, [lib], owners))["requirement"] == "tensorrt-cu13==11.4.0.106"


def test_the_soname_alone_never_decides(tmp_path):
    """The old failure: `ldconfig -p` names libnvinfer.so.10, pip installs the newest 10.x.
    Without a package record the release still comes from the real file name."""
    lib = _library(tmp_path, "/usr/local/tensorrt/lib", "10.9.0")  # tar install, no dpkg
    printed = _printed(_run(tmp_path, [lib], CUDA_VERSION="12.8.1.012"))
    assert printed == {"version": "10.9.0", "cuda": "12",
                       "requirement": "tensorrt-cu12==10.9.0.*"}


def test_the_file_wins_over_a_disagreeing_package(tmp_path):
    lib = _library(tmp_path, "/usr/lib/x86_64-linux-gnu", "10.9.0")
    owners = {lib / "libnvinfer.so.10.9.0": ("libnvinfer10:amd64", "10.8.0.43-1+cuda12.8")}
    res = _run(tmp_path, [lib], owners)
    assert _printed(res)["requirement"] == "tensorrt-cu12==10.9.0.*"
    assert "package says 10.8.0.43-1+cuda12.8 but" in res.stdout
    assert "trusting the file" in res.stdout


def test_a_plain_soname_file_uses_the_package_or_stops(tmp_path):
    lib = _library(tmp_path, "/usr/lib/x86_64-linux-gnu", "10.9.0", link=False)
    owners = {lib / "libnvinfer.so.10": ("libnvinfer10:amd64", "10.9.0.34-1+cuda12.8")}
    assert _printed(_run(tmp_path, [lib], owners))["version"] == "10.9.0.34"
    res = _run(tmp_path, [lib])
    assert res.returncode == 1 and "cannot tell the TensorRT release" in res.stderr
    assert "requirement=" not in res.stdout


def test_several_majors_and_none(tmp_path):
    old = _library(tmp_path, "/usr/lib/x86_64-linux-gnu", "10.9.0")
    new = _library(tmp_path / "b", "/usr/lib/x86_64-linux-gnu", "11.4.0")
    res = _run(tmp_path, [old, new], CUDA_VERSION="13.0")
    assert _printed(res)["version"] == "11.4.0" and "several TensorRT libraries" in res.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run(tmp_path, [empty])
    assert res.returncode == 1 and "no libnvinfer.so.N found" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True,
                         env={**os.environ})
    assert res.returncode == 1 and "unknown argument --bogus" in res.stderr
