"""The manifest of a built repository (``dart_repository.json``) and the checks made with it.

`dart-triton build` deletes the manifest first and writes it last, so an interrupted
build leaves none. It records the package version and everything that shaped the
repository: the build options (backend, sizes, instances, buckets, GPU, plan options),
the resolved graph dims, the vocabulary (name and hash), the checkpoint (path, hash of
its config.json, size and mtime of its files: cheap, no multi-GB hashing) and the files
the build wrote.

* ``dart-triton serve`` refuses, in one line, a repository built by another version:
  the generated ``model.py`` entry points import this package's modules and its configs
  follow this version's specs (`contract.manifest.version_refusal`).
* ``dart-triton check-repository REPO --checkpoint DIR -- BUILD ARGS`` (`export.check`)
  exits 0 when REPO
  is what ``dart-triton build --checkpoint DIR --output REPO BUILD ARGS`` would write
  now, else prints why and exits 1; the container entrypoint rebuilds on 1. It covers
  every backend; TensorRT plans are also checked against this GPU and TensorRT through
  their sidecars (``export.plan_sidecar``).

This module imports nothing heavy at load time: `serve` calls it before starting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dart_triton import __version__
from dart_triton.backbones.choice import BackboneChoice
from dart_triton.contract import specs
from dart_triton.contract.manifest import MANIFEST, ManifestError, read_manifest
from dart_triton.export.options import BuildOptions

FORMAT = 1
# Plan options that do not change what is written (logging), or that the build takes from
# the repository's own options (BuildOptions.plan_options) and are compared there.
_PLAN_NOT_COMPARED = {"verbose", "imgsz", "max_classes", "buckets"}
# A graph model Triton serves from a TensorRT plan (GPU- and TensorRT-version-specific).
_PLAN_PLATFORM = re.compile(r'^\s*platform:\s*"tensorrt_plan"', re.M)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Paths as strings, tuples as lists: what the value reads back as from JSON."""
    return json.loads(json.dumps(value, default=str))


# What shaped a repository ---------------------------------------------------------------


def _file_stats(root: Path, recursive: bool = False) -> dict[str, list[int]]:
    """name -> [size, mtime_ns] of the files under ``root`` (a file: itself): cheap, and
    any rewrite of a file changes it."""
    if root.is_file():
        return {root.name: [root.stat().st_size, root.stat().st_mtime_ns]}
    found = root.rglob("*") if recursive else root.iterdir()
    return {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(found) if p.is_file() and not p.name.startswith(".")}


def checkpoint_record(checkpoint: str | Path) -> dict[str, Any]:
    """Where the checkpoint is and a cheap fingerprint of it (config hash, file stats)."""
    root = Path(checkpoint).resolve()
    config = root / "config.json"
    return {"path": str(root), "config_sha256": _sha256(config) if config.is_file() else None,
            "files": _file_stats(root)}


def backbone_source(build: BuildOptions) -> Path | None:
    """The pruning plan or student directory a ``--backbone`` choice reads (None: the ViT)."""
    return BackboneChoice.parse(build.backbone).path


def backbone_record(source: Path) -> dict[str, Any]:
    """A cheap fingerprint of a pruning plan or student directory (file stats): retraining
    a student in place changes it, while its ``--backbone`` text stays the same."""
    return {"path": str(source.resolve()), "files": _file_stats(source, recursive=True)}


def checkpoint_image_size(checkpoint: str | Path) -> int | None:
    """The input size the checkpoint's config.json states (what ``--imgsz`` defaults to)."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("detector_config") or config  # sam3_video nests the detector
    size = config.get("vision_config", {}).get("backbone_config", {}).get("image_size")
    if isinstance(size, list):
        size = size[0] if size else None
    return int(size) if size else None


def options_record(build: BuildOptions, vocabulary: Path) -> dict[str, Any]:
    """The build options that shape a repository, as JSON. ``imgsz`` is compared through
    the resolved dims (None means the checkpoint's), so it is left out here."""
    record = asdict(build)
    record.pop("imgsz")
    record["plan"] = {k: v for k, v in record["plan"].items() if k not in _PLAN_NOT_COMPARED}
    record["vocabulary"] = {"name": vocabulary.name, "sha256": _sha256(vocabulary)}
    return _jsonable(record)


def write_manifest(repo: str | Path, build: BuildOptions, checkpoint: str | Path,
                   vocabulary: Path, dims: specs.GraphDims) -> Path:
    """Write the manifest of a finished build, atomically, listing the files written."""
    repo = Path(repo)
    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")
                   if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts)
    manifest = {
        "format": FORMAT,
        "dart_triton_version": __version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": build.backend,
        "requested_imgsz": build.imgsz,
        "dims": _jsonable(asdict(dims)),
        "options": options_record(build, vocabulary),
        "checkpoint": checkpoint_record(checkpoint),
        "backbone_source": (backbone_record(src) if (src := backbone_source(build)) else None),
        "files": files,
    }
    fd, tmp = tempfile.mkstemp(dir=repo, prefix=f".{MANIFEST}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, repo / MANIFEST)
    return repo / MANIFEST


def invalidate(repo: str | Path) -> None:
    """Called when a build starts: until it finishes, the repository has no manifest."""
    with contextlib.suppress(FileNotFoundError):
        (Path(repo) / MANIFEST).unlink()


# Checks ---------------------------------------------------------------------------------


def _differences(prefix: str, built: Any, wanted: Any) -> list[str]:
    """Leaf-by-leaf differences of two JSON values, named by their path."""
    if isinstance(built, Mapping) and isinstance(wanted, Mapping):
        out = []
        for key in sorted(set(built) | set(wanted)):
            out += _differences(f"{prefix}.{key}" if prefix else key, built.get(key),
                                wanted.get(key))
        return out
    return [] if built == wanted else [f"{prefix}: built with {built!r}, now {wanted!r}"]


def plan_models(repo: Path) -> list[str]:
    """Graph models of ``repo`` that Triton serves from TensorRT plans."""
    return [m for m in specs.MASK_GRAPH_MODELS
            if (repo / m / "config.pbtxt").is_file()
            and _PLAN_PLATFORM.search((repo / m / "config.pbtxt").read_text())]


def stale_reasons(repo: str | Path, checkpoint: str | Path, build: BuildOptions,
                  vocabulary: Path, *, check_plans: bool = True) -> list[str]:
    """Why ``repo`` is not what building ``checkpoint`` with ``build`` would write now
    (empty: it is current). Without the checkpoint directory its fingerprint is not
    compared: a built repository is self-contained and may be served as it is."""
    repo = Path(repo)
    try:
        manifest = read_manifest(repo)
    except ManifestError as exc:
        return [str(exc)]
    if manifest is None:
        return [f"no {MANIFEST} in {repo} (never built, or the build was interrupted)"]
    reasons = []
    if (built := manifest.get("dart_triton_version")) != __version__:
        by = f"dart-triton {built}" if built else "an earlier dart-triton"
        reasons.append(f"built by {by}, this is {__version__}")
    if manifest.get("format") != FORMAT:
        return [*reasons, f"manifest format {manifest.get('format')}, expected {FORMAT}"]
    dims = manifest.get("dims", {})
    want_imgsz = build.imgsz or checkpoint_image_size(checkpoint)
    if want_imgsz is None and manifest.get("requested_imgsz") is not None:
        reasons.append(f"imgsz: built with {manifest['requested_imgsz']}, now the checkpoint's")
    elif want_imgsz is not None and dims.get("imgsz") != want_imgsz:
        reasons.append(f"imgsz: built with {dims.get('imgsz')}, now {want_imgsz}")
    reasons += _differences("", manifest.get("options"), options_record(build, vocabulary))
    if Path(checkpoint).is_dir():
        reasons += _differences("checkpoint", manifest.get("checkpoint"),
                                checkpoint_record(checkpoint))
    if (source := backbone_source(build)) is not None and source.exists():  # as the checkpoint
        reasons += _differences("backbone_source", manifest.get("backbone_source"),
                                backbone_record(source))
    missing = [f for f in manifest.get("files", []) if not (repo / f).is_file()]
    if missing:
        reasons.append(f"{len(missing)} file(s) of the build are missing, e.g. {missing[0]}")
    elif build.backend == "torch":
        reasons += compiled_stale_reasons(repo, manifest)
    elif check_plans and (models := plan_models(repo)):
        from dart_triton.export.tensorrt.build import installed_path
        from dart_triton.export.tensorrt.plan_record import wanted_plan_fields
        from dart_triton.export.tensorrt.sidecar import current_device
        from dart_triton.export.tensorrt.sidecar import stale_reasons as plan_stale

        # Everything that shapes a plan, as this build would record it (this TensorRT's
        # version and typing when it is installed here).
        want = wanted_plan_fields(build.plan_options(dims.get("max_classes")),
                                  dims.get("imgsz"), dims.get("max_classes"), build.backbone,
                                  installed_path(), dims.get("num_queries"))
        reasons += plan_stale(repo, models, device=current_device(), want=want)
    return reasons


def compiled_stale_reasons(repo: Path, manifest: dict[str, Any]) -> list[str]:
    """Why the ahead-of-time compiled graph modules of a torch repository cannot run on
    this machine (`graphs.aot`: another torch, GPU or CPU instruction set)."""
    from dart_triton.graphs import aot
    from dart_triton.graphs.torch_graphs import weights_dir

    options = manifest.get("options", {})
    gpu = bool(options.get("gpu") or options.get("gpus"))
    reasons = []
    for name in specs.GRAPH_MODELS:
        key = aot.read_key(weights_dir(repo, name), name)
        if key is None:
            continue
        if gpu:
            import torch

            if not torch.cuda.is_available():
                reasons.append(f"{name}: compiled for {key.get('gpu', 'a GPU')}, but this "
                               "machine has none to check it against")
                continue
        if why := aot.mismatch(key, "cuda" if gpu else "cpu"):
            reasons.append(f"{name}: compiled for another machine ({why})")
    return reasons
