"""Can this tritonserver serve what `dart-triton build --backend X` would write?

Asked before building (scripts/demo.sh): a repository's pre/post-processing, text
encoder and `dart` models are python models; its graph models take the runtime line of
X's entry in the backend table. `serving.preflight` answers the same for a built
repository, before the server starts.

    python -m dart_triton.export.server_check onnxruntime [--tritonserver BIN]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dart_triton.export.backends import BACKENDS
from dart_triton.serving.preflight import (
    NGC_HINT,
    add_tritonserver_arg,
    available_backends,
    check_status,
    config_backend,
    describe_server,
)


def build_backends(build_backend: str) -> set[str] | None:
    """Triton backends a ``dart-triton build --backend X`` repository needs; None if no such X.

    Its pre/post-processing, text encoder and `dart` models are python models; the graph
    models use the runtime line of X's entry in the build's backend table.
    """
    entry = BACKENDS.get(build_backend)
    if entry is None:
        return None
    return {"python"} | {b for b in [config_backend(entry.runtime)] if b}


def build_backend_problem(build_backend: str, binary: str | Path | None = None) -> str | None:
    """Like `backend_problem`, for a repository ``dart-triton build --backend X`` would write."""
    needed = build_backends(build_backend)
    if needed is None:
        return f"unknown backend {build_backend!r}: choose one of {', '.join(BACKENDS)}"
    have = available_backends(binary)
    if have is None:
        return None
    missing = sorted(needed - have)
    if not missing:
        return None
    return (f"{describe_server(binary)} has no {', '.join(missing)} backend (only: "
            f"{', '.join(sorted(have)) or 'none'}); {NGC_HINT}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dart_triton.export.server_check",
        description="Exit 0 if tritonserver has every backend a `dart-triton build --backend X` "
                    "repository needs, else say which in one line and exit 2.")
    p.add_argument("backend", metavar="X", help="a `dart-triton build --backend` value")
    add_tritonserver_arg(p)
    args = p.parse_args(argv)
    return check_status(p.prog, lambda: build_backend_problem(args.backend, args.tritonserver))


if __name__ == "__main__":
    sys.exit(main())
