"""The JSON sidecar written next to every TensorRT plan, and checks built on it.

A plan only runs on the TensorRT version that built it and is tuned for one GPU, and the
plans of a repository must agree on the image size (the backbone's output is the
enc_dec's input, and mask_decoder's with --masks). The sidecar (``model.plan.json``
beside ``model.plan``) records what a plan was built for, so that:

* :func:`check_repository_compatibility` refuses to mix plans built for different image
  sizes or TensorRT versions in one repository;
* :func:`stale_reasons` tells whether the plans must be rebuilt: for this GPU and this
  TensorRT, and for the build options. Everything that shapes a plan is recorded
  (:data:`PLAN_FIELDS`: precision, network typing and FP16 graph pass, builder
  optimisation level, workspace, image size, backbone kind and profile over frames
  (--max-batch), for enc_dec the buckets,
  max classes and profiles, for mask_decoder its profile over prompts and kept queries),
  and a difference in any field is a reason to rebuild.
  ``dart-triton check-repository`` (``export.manifest``, run by the container entrypoint)
  calls it with what the build options want, after comparing the repository's manifest;
  ``python -m dart_triton.export.tensorrt.sidecar check REPO [--precision ...]`` checks the
  plans alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from dart_triton.contract import specs

SIDECAR_SUFFIX = ".json"
PLAN_NAME = "model.plan"
PLAN_MODELS = specs.MASK_GRAPH_MODELS  # mask_decoder: in a repository built with --masks
# Fields two plans of one repository must share, with what to say when they do not.
SHARED_FIELDS = {"imgsz": "image size", "tensorrt_version": "TensorRT version"}
# Everything besides the GPU that shapes a plan, as recorded in its sidecar and named in a
# stale reason. A sidecar without a field (an older build) differs from any wanted value.
PLAN_FIELDS = {
    "precision": "precision",
    "typing": "network typing",
    "fp16_graph": "FP16 graph pass",
    "opt_level": "builder optimisation level",
    "workspace_gb": "workspace (GiB)",
    "tensorrt_version": "TensorRT",
    "imgsz": "imgsz",
    "backbone": "backbone",
    "backbone_kind": "backbone kind",
    "frame_profile": "frame profile",
    "buckets": "buckets",
    "max_classes": "max_classes",
    "profiles": "optimisation profiles",
    "mask_profiles": "mask optimisation profile",
}
# Fields that belong to one plan (enc_dec's class-count axis, the backbone's module,
# mask_decoder's prompts and kept queries); the other plans record them as None.
FIELD_MODEL = {"buckets": specs.ENC_DEC, "max_classes": specs.ENC_DEC,
               "profiles": specs.ENC_DEC, "backbone": specs.BACKBONE,
               "backbone_kind": specs.BACKBONE, "frame_profile": specs.BACKBONE,
               "mask_profiles": specs.MASK_DECODER}
GPU_FIELDS = ("gpu_name", "compute_capability")


class PlanCompatibilityError(RuntimeError):
    """Plans in one repository were built for different image sizes or TensorRT versions."""


def sidecar_path(plan_path: str | Path) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + SIDECAR_SUFFIX)


def plan_path(repo_dir: str | Path, model: str, version: int = 1) -> Path:
    return Path(repo_dir) / model / str(version) / PLAN_NAME


def sha256_files(paths: Iterable[str | Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def onnx_sha256(onnx_path: str | Path) -> str:
    """Hash of the graph file plus the external-data files it points to (the weights)."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    extra = set()
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                extra.add(entry.value)
    return sha256_files([onnx_path, *(onnx_path.parent / e for e in sorted(extra))])


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def current_device() -> dict[str, str] | None:
    """GPU 0's name and compute capability (torch, else nvidia-smi); None without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu_name": torch.cuda.get_device_name(0),
                    "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    name, _, cap = out.partition(",")
    return {"gpu_name": name.strip(), "compute_capability": cap.strip()} if name else None


def write_sidecar(plan: str | Path, info: Mapping) -> Path:
    """Write ``<plan>.json`` atomically (a crash never leaves half a sidecar)."""
    path = sidecar_path(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(info), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_sidecar(plan: str | Path) -> dict | None:
    path = sidecar_path(plan)
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def repository_sidecars(repo_dir: str | Path) -> dict[str, tuple[Path, dict]]:
    """``{model: (sidecar path, info)}`` for every ``<model>/<version>/model.plan.json``."""
    found = {}
    for path in sorted(Path(repo_dir).glob(f"*/*/{PLAN_NAME}{SIDECAR_SUFFIX}")):
        with open(path) as f:
            found[path.parent.parent.name] = (path, json.load(f))
    return found


def check_repository_compatibility(
    repo_dir: str | Path,
    incoming: Mapping | None = None,
    replacing: Iterable[str] = (),
) -> None:
    """Refuse plans that disagree on image size or TensorRT version.

    ``incoming`` is the sidecar of a plan about to be added; plans of the models in
    ``replacing`` are about to be overwritten and are left out of the comparison.
    Without ``incoming``, checks that the plans already there agree with each other.
    """
    replacing = set(replacing)
    existing = {m: v for m, v in repository_sidecars(repo_dir).items() if m not in replacing}
    rows = [(f"{p.relative_to(repo_dir)}", info) for p, info in existing.values()]
    if incoming is not None:
        rows.insert(0, (f"the new {incoming.get('model', 'plan')} plan", incoming))
    if len(rows) < 2:
        return
    base_name, base = rows[0]
    for name, info in rows[1:]:
        for field, what in SHARED_FIELDS.items():
            if info.get(field) != base.get(field):
                raise PlanCompatibilityError(
                    f"{base_name} is for {what} {base.get(field)} but {name} in {repo_dir} was "
                    f"built for {what} {info.get(field)}: the plans of a repository must "
                    "share image size and TensorRT version. Rebuild all plans together "
                    "(dart-triton build-plans builds them all) or use a fresh output directory."
                )


def _json(value):
    """A value as it reads back from a sidecar (tuples as lists)."""
    return json.loads(json.dumps(value))


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def repository_plan_models(repo_dir: str | Path) -> list[str]:
    """The plans a repository should hold: backbone and enc_dec, and mask_decoder where the
    repository has that model (built with --masks)."""
    return [m for m in PLAN_MODELS
            if m in specs.GRAPH_MODELS or (Path(repo_dir) / m).is_dir()]


def stale_reasons(
    repo_dir: str | Path,
    models: Iterable[str] | None = None,
    imgsz: int | None = None,
    max_classes: int | None = None,
    device: Mapping | None = None,
    trt_version: str | None = None,
    verify_hash: bool = True,
    want: Mapping[str, object] | None = None,
) -> list[str]:
    """Why the plans in ``repo_dir`` cannot be served here as they are (empty: they can).

    ``want`` maps :data:`PLAN_FIELDS` to the values the build would record now; only the
    fields given are compared (``imgsz``, ``max_classes`` and ``trt_version`` are
    shorthands for three of them), ``device`` is this GPU. ``models`` default:
    :func:`repository_plan_models`.
    """
    wanted = dict(want or {})
    for key, value in (("imgsz", imgsz), ("max_classes", max_classes),
                       ("tensorrt_version", trt_version)):
        if value is not None:
            wanted[key] = value
    unknown = set(wanted) - set(PLAN_FIELDS)
    if unknown:
        raise ValueError(f"unknown plan fields {sorted(unknown)}")
    reasons = []
    for model in repository_plan_models(repo_dir) if models is None else models:
        plan = plan_path(repo_dir, model)
        info = read_sidecar(plan)
        if not plan.is_file():
            reasons.append(f"{model}: no plan at {plan}")
            continue
        if info is None:
            reasons.append(f"{model}: plan has no sidecar {sidecar_path(plan).name}")
            continue
        if device:
            for key in GPU_FIELDS:
                if info.get(key) != device.get(key):
                    reasons.append(f"{model}: built for {key} {info.get(key)}, "
                                   f"this GPU has {device.get(key)}")
        for key, value in wanted.items():
            if FIELD_MODEL.get(key, model) != model:
                continue
            if _json(info.get(key)) != _json(value):
                reasons.append(f"{model}: built for {PLAN_FIELDS[key]} "
                               f"{_show(info.get(key))}, want {_show(_json(value))}")
        if verify_hash and info.get("plan_sha256") and sha256_files([plan]) != info[
                "plan_sha256"]:
            reasons.append(f"{model}: {plan} does not match its sidecar hash (partial write?)")
    try:
        check_repository_compatibility(repo_dir)
    except PlanCompatibilityError as e:
        reasons.append(str(e))
    return reasons


def main(argv: list[str] | None = None) -> int:
    """``check REPO``: exit 0 when the plans can be served on this machine, else 1."""
    ap = argparse.ArgumentParser(prog="python -m dart_triton.export.tensorrt.sidecar")
    sub = ap.add_subparsers(dest="cmd", required=True)
    chk = sub.add_parser("check", help="are REPO's plans current for this GPU/TensorRT "
                                       "(and the options given)?")
    chk.add_argument("repo")
    chk.add_argument("--imgsz", type=int)
    chk.add_argument("--max-classes", type=int)
    chk.add_argument("--precision", choices=("fp16", "fp32"))
    chk.add_argument("--opt-level", type=int)
    chk.add_argument("--workspace-gb", type=float)
    chk.add_argument("--buckets", help="e.g. 1,4,16")
    chk.add_argument("--backbone", help="e.g. vit")
    chk.add_argument("--no-hash", action="store_true", help="skip re-hashing the plans")
    args = ap.parse_args(argv)
    want: dict[str, object] = {k: getattr(args, k) for k in ("precision", "opt_level",
                                                           "workspace_gb", "backbone")
                               if getattr(args, k) is not None}
    if args.buckets is not None:
        from dart_triton.contract.passes import parse_buckets

        want["buckets"] = list(parse_buckets(args.buckets)) or None
    reasons = stale_reasons(
        args.repo, imgsz=args.imgsz, max_classes=args.max_classes, device=current_device(),
        trt_version=tensorrt_version(), verify_hash=not args.no_hash, want=want,
    )
    for r in reasons:
        print(f"stale: {r}")
    if not reasons:
        print(f"plans in {args.repo} are current")
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
