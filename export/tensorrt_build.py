"""ONNX graphs -> verified TensorRT plans in a Triton model repository (paper §3.3-3.4).

``dart-triton build-plans --onnx-dir DIR --output REPO`` builds ``REPO/backbone/1/model.plan``
and ``REPO/enc_dec/1/model.plan`` (FP16 by default), runs each on sample inputs against
FP32 ONNX Runtime (see ``plan_verify``), and only then moves them into the repository,
each with a ``model.plan.json`` sidecar (see ``plan_sidecar``). The repository builder
calls :func:`build_plans` for ``dart-triton build --backend tensorrt``.

The enc_dec plan gets optimisation profiles over the class count N: one profile
``1..max_classes`` tuned at ``--opt-classes``, or with ``--buckets 1,4,16`` one profile per
bucket (see ``dart_triton.buckets`` for why buckets are ranges tuned at their top).

TensorRT is imported lazily: everything up to the build itself (graph checks, profiles,
the equivalent ``trtexec`` line: ``--dry-run``) works on a machine without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dart_triton import specs
from dart_triton.buckets import ProfileRange, parse_buckets, profile_ranges

from .plan_profiles import (
    MODELS,
    GraphIO,
    check_graph_matches_spec,
    dynamic_inputs,
    graph_dims_from_onnx,
    model_profiles,
    profile_shapes,
    read_graphs_hint,
    read_onnx_io,
    trtexec_command,
)
from .plan_sidecar import (
    PlanCompatibilityError,
    check_repository_compatibility,
    current_device,
    onnx_sha256,
    plan_path,
    sha256_files,
    write_sidecar,
)
from .plan_verify import (
    Tolerances,
    VerificationError,
    backbone_cases,
    enc_dec_cases,
    load_sample,
    onnx_reference,
    verify_plan,
)

TRT_MISSING = (
    "TensorRT not installed: run inside the NGC tritonserver container "
    "(nvcr.io/nvidia/tritonserver:<yy.mm>-py3) or pip install tensorrt on a GPU machine"
)
SPEC_FOR = {specs.BACKBONE: specs.backbone_spec, specs.ENC_DEC: specs.enc_dec_spec}


class TensorRTMissingError(RuntimeError):
    """The ``tensorrt`` Python package is not importable here."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTMissingError(TRT_MISSING) from e
    return tensorrt


@dataclass
class PlanBuildOptions:
    precision: str = "fp16"  # "fp16" (FP16 + FP32 kernels) or "fp32" (TF32 off)
    workspace_gb: float | None = None  # None: TensorRT's default (all device memory)
    opt_level: int | None = None  # builder optimisation level 0..5; None: TensorRT's 3
    max_classes: int | None = None  # None: largest bucket, else the export's, else 16
    opt_classes: int | None = None  # single-profile opt N; None: min(4, max_classes)
    buckets: tuple[int, ...] = ()  # e.g. (1, 4, 16): one profile per bucket
    imgsz: int | None = None  # expected image size; checked against the ONNX graphs
    models: tuple[str, ...] = MODELS
    skip_verify: bool = False
    sample: Path | None = None  # .npz with real pixel_values / text_features / text_mask
    seed: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    version: int = 1  # model version directory in the repository
    verbose: bool = False

    def __post_init__(self) -> None:
        # Normalise what callers (CLI, repository builder, dicts) may pass loosely.
        self.buckets = parse_buckets(self.buckets)
        if isinstance(self.models, str):
            self.models = tuple(m.strip() for m in self.models.split(",") if m.strip())
        self.models = tuple(self.models)
        if isinstance(self.tolerances, Mapping):
            self.tolerances = Tolerances(**self.tolerances)
        if self.sample is not None:
            self.sample = Path(self.sample)

    @classmethod
    def coerce(cls, options: PlanBuildOptions | Mapping | object | None) -> PlanBuildOptions:
        """Accept options, a dict, or an argparse Namespace (unknown keys are ignored)."""
        if isinstance(options, cls):
            return options
        if options is None:
            values = {}
        elif isinstance(options, Mapping):
            values = dict(options)
        else:
            values = vars(options)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PlanBuildOptions:
        """The options `add_plan_arguments` put on the command line (and any
        `build-plans`-only ones present in `args`)."""
        return cls.coerce({
            **vars(args),
            "tolerances": Tolerances(min_cosine=args.min_cosine, max_abs_boxes=args.max_box_diff),
        })

    def resolved_max_classes(self, exported: int | None = None) -> int:
        """--max-classes, else the largest bucket, else the export's, else the default."""
        if self.max_classes is not None:
            return self.max_classes
        if self.buckets:
            return max(self.buckets)
        return exported or specs.DEFAULT_MAX_CLASSES

    def validate(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {self.precision!r}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise ValueError(f"opt level must be in 0..5, got {self.opt_level}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ValueError(f"workspace must be > 0 GB, got {self.workspace_gb}")
        unknown = set(self.models) - set(MODELS)
        if unknown or not self.models:
            raise ValueError(f"models must be among {MODELS}, got {self.models}")


@dataclass
class PlanJob:
    """Everything decided about one plan before TensorRT is touched."""

    model: str
    onnx: Path
    plan: Path
    io: GraphIO
    spec: specs.ModelSpec
    ranges: list[ProfileRange]
    profiles: list[dict]
    dynamic: list[str]
    trtexec: str


def plan_jobs(
    onnx_dir: str | Path, repo_dir: str | Path, opts: PlanBuildOptions
) -> tuple[specs.GraphDims, list[PlanJob]]:
    """Read the graphs, check them against the specs, and work out every profile."""
    opts.validate()
    onnx_dir = Path(onnx_dir)
    paths = {m: onnx_dir / f"{m}.onnx" for m in MODELS}
    for m in opts.models:
        if not paths[m].is_file():
            raise FileNotFoundError(f"{paths[m]} not found (run `dart-triton export` first)")
    ios = {m: read_onnx_io(p) for m, p in paths.items() if p.is_file()}
    hint = read_graphs_hint(onnx_dir)
    max_classes = opts.resolved_max_classes(hint.get("max_classes"))
    dims = graph_dims_from_onnx(ios.get(specs.BACKBONE), ios.get(specs.ENC_DEC), max_classes, hint)
    if opts.imgsz is not None and opts.imgsz != dims.imgsz:
        raise ValueError(f"--imgsz {opts.imgsz} but the ONNX graphs in {onnx_dir} are for "
                         f"imgsz {dims.imgsz}: re-export or drop --imgsz")
    ranges = profile_ranges(max_classes, opts.buckets, opts.opt_classes)
    jobs = []
    for model in opts.models:
        io, spec = ios[model], SPEC_FOR[model](dims)
        check_graph_matches_spec(io, spec, f"{model}.onnx")
        if model == specs.ENC_DEC and io.inputs[specs.TEXT_FEATURES][0] != -1:
            raise ValueError(f"enc_dec.onnx has a fixed class count N="
                             f"{io.inputs[specs.TEXT_FEATURES][0]}: export it with a dynamic "
                             "N axis so one plan serves 1..max_classes")
        dyn = dynamic_inputs(io)
        profiles = model_profiles(spec, ranges)
        if not profiles and dyn:  # graph left a fixed dim dynamic: pin it to the spec
            profiles = [profile_shapes(spec, None)]
        plan = plan_path(repo_dir, model, opts.version)
        line = trtexec_command(paths[model], plan, profiles, opts.precision, opts.workspace_gb,
                               opts.opt_level, only_inputs=dyn)
        jobs.append(PlanJob(model, paths[model], plan, io, spec,
                            ranges if profiles and model == specs.ENC_DEC else [], profiles, dyn,
                            line))
    return dims, jobs


def build_engine(trt, job: PlanJob, opts: PlanBuildOptions, logger) -> bytes:
    """Parse the ONNX file (external weights load from its folder) and build a plan."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {job.onnx}: {errors}")
    config = builder.create_builder_config()
    if opts.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                     int(opts.workspace_gb * (1 << 30)))
    if opts.opt_level is not None:
        config.builder_optimization_level = opts.opt_level
    if opts.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means IEEE FP32: a true reference
    net_dynamic = [network.get_input(i).name for i in range(network.num_inputs)
                   if -1 in tuple(network.get_input(i).shape)]
    if net_dynamic and not job.profiles:
        raise RuntimeError(f"{job.model}: TensorRT sees dynamic inputs {net_dynamic} "
                           "that the spec does not make dynamic")
    for prof in job.profiles:
        profile = builder.create_optimization_profile()
        for name in net_dynamic:
            lo, opt, hi = prof[name]
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build {job.model} (see its log above)")
    return bytes(blob)


def _fpn_reference(onnx_dir: Path, dims: specs.GraphDims, sample: dict, seed: int,
                   cache: dict) -> np.ndarray:
    """Real FPN features (FP32 ORT backbone on the sample pixels) for the enc_dec check."""
    if "fpn" not in cache:
        bb = onnx_dir / "backbone.onnx"
        if bb.is_file():
            case = backbone_cases(dims, sample, seed)[0]
            cache["backbone_out"] = onnx_reference(bb)(case.inputs, 0)
            cache["fpn"] = cache["backbone_out"][specs.FPN_FEATURES]
        else:  # only enc_dec.onnx given: features of the right shape and scale
            rng = np.random.default_rng(seed + 2)
            h = dims.feat_hw
            cache["fpn"] = rng.standard_normal((1, dims.fpn_dim, h, h)).astype(np.float32)
    return cache["fpn"]


def _verify(trt, job: PlanJob, blob: bytes, dims, opts, onnx_dir: Path, sample: dict,
            cache: dict, logger) -> dict:
    from .plan_runner import PlanRunner

    if job.model == specs.BACKBONE:
        cases = backbone_cases(dims, sample, opts.seed)
        _fpn_reference(onnx_dir, dims, sample, opts.seed, cache)  # fills backbone_out

        def reference(inputs, profile):
            return cache["backbone_out"]
    else:
        fpn = _fpn_reference(onnx_dir, dims, sample, opts.seed, cache)
        cases = enc_dec_cases(dims, job.ranges, fpn, sample, opts.seed)
        reference = onnx_reference(job.onnx)
    runner = PlanRunner(blob, trt, logger)
    try:
        return verify_plan(job.model, cases, reference, runner, opts.tolerances)
    finally:
        runner.close()


def _sidecar(job: PlanJob, dims: specs.GraphDims, opts: PlanBuildOptions, trt_version: str,
             device: dict | None, onnx_digest: str, plan_digest: str, size: int,
             verification: dict) -> dict:
    enc = job.model == specs.ENC_DEC
    dims_dict = {k: v for k, v in dataclasses.asdict(dims).items() if k != "extra"}
    return {
        "model": job.model,
        "plan": job.plan.name,
        "plan_sha256": plan_digest,
        "plan_bytes": size,
        "onnx": str(job.onnx),
        "onnx_sha256": onnx_digest,
        "tensorrt_version": trt_version,
        "gpu_name": (device or {}).get("gpu_name"),
        "compute_capability": (device or {}).get("compute_capability"),
        "precision": opts.precision,
        "imgsz": dims.imgsz,
        "graph_dims": dims_dict,
        "max_classes": dims.max_classes if enc else None,
        "n_range": [job.ranges[0].min, job.ranges[-1].max] if enc and job.ranges else None,
        "buckets": list(opts.buckets) if enc and opts.buckets else None,
        "profiles": [{"index": i, "min": r.min, "opt": r.opt, "max": r.max}
                     for i, r in enumerate(job.ranges)],
        "workspace_gb": opts.workspace_gb,
        "opt_level": opts.opt_level,
        "trtexec": job.trtexec,
        "verification": verification,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def build_plans(
    onnx_dir: str | Path,
    repo_dir: str | Path,
    options: PlanBuildOptions | Mapping | object | None = None,
) -> dict[str, dict]:
    """Build, verify and install the plans; returns ``{model: sidecar dict}``.

    Plans are staged beside their final place and moved to ``<model>/<version>/model.plan``
    only after every requested plan has passed verification, so a failed build never
    leaves a half-updated repository. Raises TensorRTMissingError, VerificationError,
    PlanCompatibilityError, FileNotFoundError or ValueError with a message to show as is.
    """
    opts = PlanBuildOptions.coerce(options)
    onnx_dir, repo_dir = Path(onnx_dir), Path(repo_dir)
    dims, jobs = plan_jobs(onnx_dir, repo_dir, opts)
    trt = import_tensorrt()
    trt_version = str(trt.__version__)
    device = current_device()
    check_repository_compatibility(
        repo_dir, {"model": jobs[0].model, "imgsz": dims.imgsz, "tensorrt_version": trt_version},
        replacing=opts.models)
    logger = trt.Logger(trt.Logger.INFO if opts.verbose else trt.Logger.WARNING)
    sample = load_sample(opts.sample)
    cache: dict = {}
    staged: dict[str, Path] = {}
    results: dict[str, dict] = {}
    try:
        for job in jobs:
            print(f"[build-plans] {job.model}: building ({opts.precision}); equivalent:\n"
                  f"  {job.trtexec}", flush=True)
            blob = build_engine(trt, job, opts, logger)
            # Staged in a hidden folder of the model's own directory: same filesystem as the
            # final path (atomic rename), and not a version directory Triton would load.
            model_dir = job.plan.parent.parent
            model_dir.mkdir(parents=True, exist_ok=True)
            stage_dir = Path(tempfile.mkdtemp(prefix=".plan-staging-", dir=model_dir))
            staged[job.model] = stage_dir / job.plan.name
            staged[job.model].write_bytes(blob)
            if opts.skip_verify:
                verification = {"skipped": True}
            else:
                verification = _verify(trt, job, blob, dims, opts, onnx_dir, sample, cache,
                                       logger)
                worst = ", ".join(f"{k} cos {v['cosine']:.5f} max|d| {v['max_abs']:.3g}"
                                  for k, v in verification["worst"].items())
                print(f"[build-plans] {job.model}: verified ({worst})", flush=True)
            results[job.model] = _sidecar(job, dims, opts, trt_version, device,
                                          onnx_sha256(job.onnx),
                                          sha256_files([staged[job.model]]), len(blob),
                                          verification)
            del blob
        for job in jobs:  # every plan passed: install them all
            job.plan.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged[job.model], job.plan)
            write_sidecar(job.plan, results[job.model])
            results[job.model]["plan_path"] = str(job.plan)
            print(f"[build-plans] {job.model}: wrote {job.plan}", flush=True)
    finally:
        for path in staged.values():
            shutil.rmtree(path.parent, ignore_errors=True)
    return results


def add_plan_arguments(ap: argparse.ArgumentParser, build_command: bool = False) -> None:
    """Plan options shared by `dart-triton build` and `dart-triton build-plans`."""
    what = "tensorrt: " if build_command else ""
    ap.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                    help=f"{what}plan precision (default %(default)s)")
    ap.add_argument("--workspace-gb", type=float, help=f"{what}builder workspace limit (GiB)")
    ap.add_argument("--opt-level", type=int,
                    help=f"{what}builder optimisation level 0..5 (TensorRT's default: 3)")
    ap.add_argument("--sample", type=Path,
                    help=f"{what}.npz of real pixel_values/text_features/text_mask to verify with")
    ap.add_argument("--skip-verify", action="store_true",
                    help=f"{what}do not compare the plans with FP32 ONNX Runtime")
    ap.add_argument("--min-cosine", type=float, default=Tolerances.min_cosine,
                    help=f"{what}verification bar for FPN features and logits "
                         "(default %(default)s)")
    ap.add_argument("--max-box-diff", type=float, default=Tolerances.max_abs_boxes,
                    help=f"{what}verification bar for pred_boxes, normalised units "
                         "(default %(default)s)")
    ap.add_argument("--verbose", action="store_true", help=f"{what}TensorRT INFO logging")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dart-triton build-plans",
        description="Build verified TensorRT plans (backbone, enc_dec) from the ONNX graphs.")
    ap.add_argument("--onnx-dir", required=True, type=Path,
                    help="folder with backbone.onnx and enc_dec.onnx")
    ap.add_argument("--output", required=True, type=Path, help="Triton model repository")
    ap.add_argument("--max-classes", type=int,
                    help=f"largest N per pass (default {specs.DEFAULT_MAX_CLASSES}, "
                         "or the largest bucket)")
    ap.add_argument("--opt-classes", type=int, help="N the single profile is tuned for")
    ap.add_argument("--buckets", help="e.g. 1,4,16: one profile per bucket (callers pad N)")
    ap.add_argument("--imgsz", type=int, help="expected image size (checked against ONNX)")
    ap.add_argument("--models", default=",".join(MODELS), help="subset, e.g. enc_dec")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true",
                    help="check the graphs and print the trtexec lines; build nothing")
    add_plan_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    opts = PlanBuildOptions.from_args(args)
    try:
        if args.dry_run:
            _, jobs = plan_jobs(args.onnx_dir, args.output, opts)
            for job in jobs:
                print(job.trtexec)
            return 0
        results = build_plans(args.onnx_dir, args.output, opts)
    except (TensorRTMissingError, VerificationError, PlanCompatibilityError, FileNotFoundError,
            ValueError, RuntimeError) as e:
        print(f"dart-triton build-plans: error: {e}", file=sys.stderr)
        return 1
    for model, info in results.items():
        print(f"{model}: {info['plan_path']} (TensorRT {info['tensorrt_version']}, "
              f"{info['precision']}, {info['gpu_name']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
