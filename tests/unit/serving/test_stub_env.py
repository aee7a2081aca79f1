"""dart_triton.serving.stub_env: a package that cannot import in the stub's Python is hidden, so
an optional import of it (transformers' pattern) takes the not-installed path."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dart_triton.serving import stub_env

# transformers' pattern: import an optional package only when find_spec finds it.
OPTIONAL_USER = """import importlib.util
if importlib.util.find_spec("needs_numpy2") is not None:
    import needs_numpy2
"""


@pytest.fixture
def venv(tmp_path) -> tuple[str, Path]:
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(tmp_path / "v")],
                   check=True)
    python = str(tmp_path / "v" / "bin" / "python3")
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", purelib], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert "site-packages" in site and site != sysconfig.get_paths()["purelib"]
    return python, Path(site)


def test_a_package_that_fails_to_import_is_hidden(venv, capsys):
    python, site = venv
    (site / "needs_numpy2").mkdir()
    (site / "needs_numpy2" / "__init__.py").write_text(
        "raise ImportError('numpy>=2.0.0 is required')\n")
    (site / "optional_user.py").write_text(OPTIONAL_USER)
    probe = "import optional_user\n"
    assert subprocess.run([python, "-c", probe]).returncode != 0  # broken before

    assert stub_env.hide_unimportable(site, python, probe) == ["needs_numpy2"]
    assert "hid needs_numpy2" in capsys.readouterr().out
    assert subprocess.run([python, "-c", probe]).returncode == 0
    res = subprocess.run([python, "-c", "import needs_numpy2"], capture_output=True, text=True)
    assert res.returncode != 0 and "halted; None in sys.modules" in res.stderr

    # a second run starts afresh and finds the same package
    assert stub_env.hide_unimportable(site, python, probe) == ["needs_numpy2"]


def test_a_failure_in_a_kept_package_is_reported_not_hidden(venv):
    python, site = venv
    (site / "dart_triton").mkdir()
    (site / "dart_triton" / "__init__.py").write_text("raise ImportError('broken install')\n")
    with pytest.raises(RuntimeError, match="broken install"):
        stub_env.hide_unimportable(site, python, "import dart_triton\n")
    assert not (site / stub_env.HIDDEN_PTH).exists()
