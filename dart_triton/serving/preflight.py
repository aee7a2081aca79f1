"""Can this tritonserver load this model repository? Checked before the server starts.

The tritonserver bundled in nvidia-pytriton (2.51) has only the python backend. Given a
repository built with ``--backend onnxruntime`` or ``tensorrt`` it logs ``unable to find
backend library for backend 'onnxruntime'`` and may then crash (signal 11), after
loading the other models. Each model's ``config.pbtxt`` names its backend (``backend:``)
or a platform that implies one (``platform: "onnxruntime_onnx"``); a tritonserver has
the backends found in its backend directory (``/opt/tritonserver/backends`` in NVIDIA's
container). Comparing the two answers in one line, before any model loads.

    python -m dart_triton.serving.preflight REPO [--tritonserver BIN]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# Platforms (the older way to name a backend) -> backend. Ensembles need none.
PLATFORM_BACKENDS: dict[str, str | None] = {
    "ensemble": None,
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "pytorch_libtorch": "pytorch",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
}
# Models without a config.pbtxt: Triton picks the backend from the model file.
_MODEL_FILES = {"model.py": "python", "model.onnx": "onnxruntime", "model.plan": "tensorrt",
                "model.pt": "pytorch"}
NGC_HINT = ("the onnxruntime and tensorrt backends come with NVIDIA's Triton container "
            "(docker compose -f docker/compose.yaml up, see docker/README.md); "
            "without it, build with --backend python or torch (DART_BACKEND=python for "
            "scripts/demo.sh)")


def config_backend(text: str) -> str | None:
    """The backend a ``config.pbtxt`` (or a fragment of one) names; None for an ensemble.

    Raises ValueError when the text is not a model configuration.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(str(e)) from None
    if cfg.backend:
        return cfg.backend
    return PLATFORM_BACKENDS.get(cfg.platform, cfg.platform or None)


def model_backend(model_dir: Path) -> str | None:
    """The Triton backend ``model_dir`` needs; None for an ensemble or when unknown."""
    config = model_dir / "config.pbtxt"
    if config.is_file():
        try:
            return config_backend(config.read_text())
        except (ValueError, UnicodeDecodeError):
            return None  # tritonserver itself will say what is wrong with it
    for name, backend in _MODEL_FILES.items():
        if any(model_dir.glob(f"*/{name}")):
            return backend
    return None


def gpu_ids(repositories: Iterable[str | Path]) -> set[int]:
    """The GPUs the repositories' KIND_GPU instance groups use (GPU 0 where a group lists
    none: Triton then uses every visible GPU, and 0 is always one of them)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    ids: set[int] = set()
    for config in (c for r in repositories for c in Path(r).glob("*/config.pbtxt")):
        try:
            cfg = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        except (text_format.ParseError, UnicodeDecodeError):
            continue  # tritonserver itself will say what is wrong with it
        for group in cfg.instance_group:
            if group.kind == gpu:
                ids |= set(group.gpus) or {0}
    return ids


def required_backends(
    repositories: Iterable[str | Path], models: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """Backend -> the models (``repo/model``) that need it; only ``models`` if given."""
    wanted = None if models is None else set(models)
    needs: dict[str, list[str]] = {}
    for repo in map(Path, repositories):
        for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
            if wanted is not None and model_dir.name not in wanted:
                continue
            backend = model_backend(model_dir)
            if backend:
                needs.setdefault(backend, []).append(model_dir.name)
    return needs


def available_backends(
    binary: str | Path | None = None, backend_directory: str | Path | None = None
) -> set[str] | None:
    """Backends ``binary`` can load (default: the one `dart-triton serve` runs); None if unknown.

    The bundled binary runs with the python backend only (dart_triton.serving.binaries lays out
    its backend directory). Another binary's default directory is ``../backends``
    next to its ``bin/``, as in NVIDIA's container, unless ``backend_directory`` says.
    """
    from dart_triton.serving import binaries as server

    binary = Path(binary) if binary else server.find_tritonserver()
    if backend_directory is None:
        bundled = server.bundled_tritonserver_dir()
        if server.is_bundled(binary) and bundled is not None:
            backend_directory = bundled / "backends"
        else:
            backend_directory = binary.resolve().parent.parent / "backends"
    directory = Path(backend_directory)
    if not directory.is_dir():
        return None
    return {p.name for p in directory.iterdir() if p.is_dir() and any(p.iterdir())}


def describe_server(binary: str | Path | None = None) -> str:
    from dart_triton.serving import binaries as server

    binary = Path(binary) if binary else server.find_tritonserver()
    return ("the tritonserver bundled in nvidia-pytriton" if server.is_bundled(binary)
            else f"tritonserver {binary}")


def _flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Values of ``--flag=V`` and ``--flag V`` in tritonserver-style arguments."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def loaded_models(extra_args: Sequence[str]) -> list[str] | None:
    """The models tritonserver will load given its flags; None means all of them."""
    mode = _flag_values(extra_args, "--model-control-mode")
    if not mode or mode[-1] != "explicit":
        return None
    names = _flag_values(extra_args, "--load-model")
    return None if "*" in names else names


def backend_problem(
    repositories: Iterable[str | Path],
    binary: str | Path | None = None,
    extra_args: Sequence[str] = (),
) -> str | None:
    """One line saying which models need a backend ``binary`` lacks, or None when all is well.

    ``extra_args`` are the tritonserver flags `dart-triton serve` passes on: they may
    name ``--backend-directory`` or, in explicit mode, the models to load.
    """
    directory = (_flag_values(extra_args, "--backend-directory") or [None])[-1]
    have = available_backends(binary, directory)
    if have is None:
        return None
    needs = required_backends(repositories, loaded_models(extra_args))
    missing = {b: models for b, models in needs.items() if b not in have}
    if not missing:
        return None
    what = "; ".join(f"{', '.join(models)} need{'s' * (len(models) == 1)} the {b} backend"
                     for b, models in sorted(missing.items()))
    return (f"{what}, but {describe_server(binary)} has only: {', '.join(sorted(have)) or 'none'}"
            f"{f' in {directory}' if directory else ''}; {NGC_HINT}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dart_triton.serving.preflight",
        description="Exit 0 if tritonserver has every backend the repository needs, else say "
                    "which model needs which backend in one line and exit 2.",
    )
    p.add_argument("repositories", nargs="+", metavar="REPO", help="model repository")
    add_tritonserver_arg(p)
    args, extra = p.parse_known_args(argv)
    missing = [r for r in args.repositories if not Path(r).is_dir()]
    if missing:
        print(f"{p.prog}: no such model repository: {', '.join(missing)}", file=sys.stderr)
        return 2
    return check_status(p.prog, lambda: backend_problem(args.repositories, args.tritonserver,
                                                        extra))


def add_tritonserver_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tritonserver", metavar="BIN",
                   help="binary to check (default: the one `dart-triton serve` runs)")


def check_status(prog: str, problem: Callable[[], str | None]) -> int:
    """A check command's exit status: 0 when `problem()` finds none, else 2 with its one
    line (or the missing tritonserver's) on stderr."""
    try:
        found = problem()
    except FileNotFoundError as e:  # no tritonserver at all
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if found:
        print(found, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
