"""Hide, from the numpy<2 Python that runs the bundled python-backend stub, packages that
cannot import under numpy 1.x.

The stub bundled in nvidia-pytriton is built against numpy 1.x, so it runs a Python that
puts numpy<2 in front of the project's environment (scripts/install_triton_tools.sh).
A package of that environment whose wheel needs numpy>=2 (scipy 1.18 on Python 3.12,
say) then fails to import there, and transformers, which imports such optional packages
when a model module loads (scipy for its detection losses), fails with it: "Could not
import module 'Sam3Model'". This runs what the python models import, in that Python;
each package that breaks it is hidden (``sys.modules[name] = None`` from a ``.pth`` file:
``import`` fails and ``find_spec`` says absent, as if it were not installed), and the
import is tried again.

    <stub python> -m dart_triton.serving.stub_env <its site-packages>
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HIDDEN_PTH = "zz_dart_triton_hidden.pth"
# What the python models import when they load (transformers' classes load lazily).
PROBE = (
    "import dart_triton.graphs.torch_graphs, dart_triton.model.text_encoder, "
    "dart_triton.pipeline.orchestration, dart_triton.model.postprocess, "
    "dart_triton.model.preprocess\n"
    "from transformers import Sam3Model, CLIPTextModelWithProjection\n"
)
# Never hidden: what the stub itself needs; a failure inside them is not a package to drop.
KEEP = frozenset({"numpy", "torch", "transformers", "dart_triton"})
MAX_HIDDEN = 8

# Runs in a fresh interpreter each time (a failed import leaves half-imported modules).
# Prints the top-level package in whose code the innermost cause was raised.
_CHILD = r"""
import sys, traceback
try:
    exec(sys.argv[1])
except Exception as exc:
    cause = exc
    while (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    keep = set(sys.argv[2].split(","))
    for frame in reversed(traceback.extract_tb(cause.__traceback__)):
        parts = frame.filename.replace("\\", "/").split("/")
        for marker in ("site-packages", "dist-packages"):
            if marker in parts[:-1]:
                top = parts[parts.index(marker) + 1].split(".")[0]
                if top not in keep:
                    print("CULPRIT", top, type(cause).__name__, str(cause).splitlines()[0][:200])
                    sys.exit(3)
    traceback.print_exception(exc)
    sys.exit(4)
"""


def write_hidden(site: Path, names: list[str]) -> None:
    path = site / HIDDEN_PTH
    if names:
        path.write_text(f"import sys; sys.modules.update(dict.fromkeys({sorted(names)!r}))\n")
    else:
        path.unlink(missing_ok=True)


def hide_unimportable(site: Path, python: str = sys.executable, probe: str = PROBE) -> list[str]:
    """Hide packages until `probe` runs in `python`; returns the hidden names.

    Raises RuntimeError with the import error when the failure is not in a package that
    can be hidden (numpy, torch, transformers or this project themselves)."""
    hidden: list[str] = []
    write_hidden(site, hidden)
    while True:
        # cwd: a checkout in the caller's directory must not stand in for the installed code
        res = subprocess.run([python, "-c", _CHILD, probe, ",".join(sorted(KEEP))],
                             capture_output=True, text=True, cwd=site)
        if res.returncode == 0:
            return hidden
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("CULPRIT ")), "")
        if res.returncode != 3 or not line or len(hidden) >= MAX_HIDDEN:
            raise RuntimeError("the stub python cannot import what the python models need:\n"
                               + (res.stdout + res.stderr)[-3000:])
        _, name, kind, message = line.split(" ", 3)
        if name in hidden:
            raise RuntimeError(f"{name} still fails after it was hidden: {kind}: {message}")
        hidden.append(name)
        write_hidden(site, hidden)
        print(f"hid {name} from the stub python: it does not import with numpy "
              f"{_numpy_version(python)} ({kind}: {message})", flush=True)


def _numpy_version(python: str) -> str:
    res = subprocess.run([python, "-c", "import numpy; print(numpy.__version__)"],
                         capture_output=True, text=True)
    return res.stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dart_triton.serving.stub_env STUB_SITE_PACKAGES", file=sys.stderr)
        return 2
    try:
        hidden = hide_unimportable(Path(args[0]))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"stub python: imports what the python models need"
          f"{' (hidden: ' + ', '.join(hidden) + ')' if hidden else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
