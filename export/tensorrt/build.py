"""ONNX graphs -> verified TensorRT plans in a Triton model repository (paper §3.3-3.4).

``dart-triton build-plans --onnx-dir DIR --output REPO`` builds ``REPO/backbone/1/model.plan``
and ``REPO/enc_dec/1/model.plan`` (FP16 by default), runs each on real inputs against an
FP32 reference (see ``plan_verify``), and only then moves them into the repository, each
with a ``model.plan.json`` sidecar recording everything that shaped it (see
``plan_sidecar``). The repository builder calls :func:`build_plans` for
``dart-triton build --backend tensorrt``.

TensorRT 10 and 11 build differently, and the path is chosen once, from the installed
module (:class:`TensorRTPath`):

* **weakly typed** where ``BuilderFlag.FP16`` exists (TensorRT 10): the FP32 graph, with
  the FP16 flag letting the builder pick FP16 kernels (it fuses the restructured
  attention, accumulating in FP32);
* **strongly typed** where it is gone (TensorRT 11): the graph decides every type, so the
  FP32 graph is first converted to FP16 by ``export.fp16`` (attention left in the form
  TensorRT fuses, normalisations and position encodings FP32) and the network is
  created with ``STRONGLY_TYPED``; no precision flag is set.

The printed ``trtexec`` lines match the path. Every TensorRT failure reaches the user as
one line (:class:`TensorRTError`), never a traceback.

The enc_dec plan gets optimisation profiles over the class count N: one profile
``1..max_classes`` tuned at ``--opt-classes``, or with ``--buckets 1,4,16`` one profile per
bucket (see ``dart_triton.contract.passes`` for why buckets are ranges tuned at their top).

TensorRT is imported lazily: everything up to the build itself (graph checks, profiles,
the equivalent ``trtexec`` line: ``--dry-run``) works on a machine without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dart_triton.contract import specs
from dart_triton.contract.passes import ProfileRange, parse_buckets, profile_ranges
from dart_triton.export.tensorrt import fp16
from dart_triton.export.tensorrt.profiles import (
    MODELS,
    GraphIO,
    backbone_from_description,
    backbone_kind,
    check_graph_matches_spec,
    dynamic_inputs,
    graph_dims_from_onnx,
    model_profiles,
    profile_shapes,
    read_graphs_json,
    read_onnx_io,
    trtexec_command,
)
from dart_triton.export.tensorrt.sidecar import (
    PlanCompatibilityError,
    check_repository_compatibility,
    current_device,
    onnx_sha256,
    plan_path,
    sha256_files,
    write_sidecar,
)
from dart_triton.export.tensorrt.verify import (
    Reference,
    TextSample,
    Tolerances,
    VerificationError,
    backbone_cases,
    enc_dec_cases,
    load_sample,
    pick_reference,
    real_text,
    sample_text,
    verify_plan,
)

TRT_MISSING = (
    "TensorRT not installed: run inside the NGC tritonserver container "
    "(nvcr.io/nvidia/tritonserver:<yy.mm>-py3) or pip install tensorrt on a GPU machine"
)
SPEC_FOR = {specs.BACKBONE: specs.backbone_spec, specs.ENC_DEC: specs.enc_dec_spec}
# What --dry-run prints for when no TensorRT is installed here.
DEFAULT_DRY_RUN_VERSION = "10"


class TensorRTMissingError(RuntimeError):
    """The ``tensorrt`` Python package is not importable here."""


class TensorRTError(RuntimeError):
    """A TensorRT call failed; the message is one line naming the step."""


def one_line(text: object) -> str:
    """TensorRT's messages (parser errors, binding exceptions) as a single line."""
    return " ".join(str(text).split())


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTMissingError(TRT_MISSING) from e
    return tensorrt


@dataclass(frozen=True)
class TensorRTPath:
    """How plans are built with this TensorRT, decided once from the module itself.

    Weak typing (the FP16 builder flag) where ``BuilderFlag.FP16`` exists; strong typing
    (FP16 decided in the ONNX graph) where it is gone, as in TensorRT 11. Deciding by the
    API rather than the version number keeps a 10.x build with the flag on the path that
    TensorRT release documents."""

    version: str
    strongly_typed: bool

    @property
    def major(self) -> int:
        head = self.version.split(".")[0]
        return int(head) if head.isdigit() else 0

    @property
    def typing(self) -> str:
        return "strong" if self.strongly_typed else "weak"

    @classmethod
    def detect(cls, trt) -> TensorRTPath:
        flags = getattr(trt, "BuilderFlag", None)
        return cls(str(getattr(trt, "__version__", "unknown")),
                   strongly_typed=not hasattr(flags, "FP16"))

    @classmethod
    def for_version(cls, version: str) -> TensorRTPath:
        """The path of a TensorRT that is not installed here (``--dry-run``)."""
        head = str(version).split(".")[0]
        if not head.isdigit():
            raise ValueError(f"TensorRT version must start with its major number, got "
                             f"{version!r}")
        return cls(str(version), strongly_typed=int(head) >= 11)

    def build_graph(self, precision: str) -> bool:
        """Whether the builder reads an FP16 graph made from the FP32 one."""
        return self.strongly_typed and precision == "fp16"


def installed_path() -> TensorRTPath | None:
    try:
        return TensorRTPath.detect(import_tensorrt())
    except TensorRTMissingError:
        return None


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

    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * (1 << 30))


@dataclass
class PlanJob:
    """Everything decided about one plan before TensorRT is touched."""

    model: str
    onnx: Path  # the exported FP32 graph
    plan: Path
    io: GraphIO
    spec: specs.ModelSpec
    ranges: list[ProfileRange]
    profiles: list[dict]
    dynamic: list[str]
    trtexec: str
    path: TensorRTPath
    # The strongly typed FP16 path builds from a converted graph: the command that makes
    # it by hand (before the trtexec line), else None.
    prepare: str | None = None

    @property
    def fp16_graph(self) -> bool:
        return self.prepare is not None


def plan_jobs(
    onnx_dir: str | Path, repo_dir: str | Path, opts: PlanBuildOptions,
    path: TensorRTPath | None = None,
) -> tuple[specs.GraphDims, list[PlanJob]]:
    """Read the graphs, check them against the specs, and work out every profile.

    ``path``: the TensorRT the plans are for (default: the installed one, else 10)."""
    opts.validate()
    path = path or installed_path() or TensorRTPath.for_version(DEFAULT_DRY_RUN_VERSION)
    onnx_dir = Path(onnx_dir)
    paths = {m: onnx_dir / f"{m}.onnx" for m in MODELS}
    for m in opts.models:
        if not paths[m].is_file():
            raise FileNotFoundError(f"{paths[m]} not found (run `dart-triton export` first)")
    ios = {m: read_onnx_io(p) for m, p in paths.items() if p.is_file()}
    hint = read_graphs_json(onnx_dir).get("dims", {})
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
        build_from, prepare = paths[model], None
        if path.build_graph(opts.precision):
            build_from = fp16.fp16_path(paths[model])
            prepare = f"python -m dart_triton.export.tensorrt.fp16 {paths[model]} {build_from}"
        line = trtexec_command(build_from, plan, profiles, opts.precision, opts.workspace_gb,
                               opts.opt_level, only_inputs=dyn,
                               strongly_typed=path.strongly_typed)
        jobs.append(PlanJob(model, paths[model], plan, io, spec,
                            ranges if profiles and model == specs.ENC_DEC else [], profiles, dyn,
                            line, path, prepare))
    return dims, jobs


@contextlib.contextmanager
def tensorrt_step(what: str, path: TensorRTPath) -> Iterator[None]:
    """Any exception a TensorRT call raises (the bindings raise TypeError, AttributeError,
    RuntimeError, ...) becomes one TensorRTError line naming the step and the version."""
    try:
        yield
    except (TensorRTError, TensorRTMissingError, VerificationError):
        raise
    except Exception as e:
        raise TensorRTError(f"TensorRT {path.version} ({path.typing}ly typed): {what}: "
                            f"{type(e).__name__}: {one_line(e)}") from e


def build_engine(trt, job: PlanJob, opts: PlanBuildOptions, logger,
                 graph: Path | None = None) -> bytes:
    """Parse the ONNX file (external weights load from its folder) and build a plan.

    ``graph``: the file the builder reads (the FP16 graph on the strongly typed FP16
    path), default the job's FP32 export."""
    path, graph = job.path, graph or job.onnx
    builder = trt.Builder(logger)
    flags = 0
    if path.strongly_typed:
        # TensorRT 10 needs the flag; 11 accepts it and is strongly typed anyway.
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strong is not None:
            flags |= 1 << int(strong)
    network = builder.create_network(flags)  # explicit batch is the only mode since 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(one_line(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT {path.version} could not parse {graph}: "
                            f"{errors or 'no parser error recorded'}")
    config = builder.create_builder_config()
    if opts.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_bytes())
    if opts.opt_level is not None:
        config.builder_optimization_level = opts.opt_level
    if opts.precision == "fp16" and not path.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if opts.precision == "fp32":
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:
            config.clear_flag(tf32)  # fp32 means IEEE FP32: a true reference
    net_dynamic = [network.get_input(i).name for i in range(network.num_inputs)
                   if -1 in tuple(network.get_input(i).shape)]
    if net_dynamic and not job.profiles:
        raise TensorRTError(f"{job.model}: TensorRT sees dynamic inputs {net_dynamic} "
                            "that the spec does not make dynamic")
    for prof in job.profiles:
        profile = builder.create_optimization_profile()
        for name in net_dynamic:
            lo, opt, hi = prof[name]
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise TensorRTError(f"TensorRT {path.version} failed to build {job.model} "
                            "(see its log above)")
    return bytes(blob)


# Verification -------------------------------------------------------------------------


class _Verifier:
    """The reference, the real inputs and the FPN features enc_dec is checked on, each
    made once per build."""

    def __init__(self, onnx_dir: Path, repo_dir: Path, dims: specs.GraphDims,
                 opts: PlanBuildOptions, meta: Mapping, log: Callable[[str], None]) -> None:
        self.onnx_dir, self.repo_dir, self.dims, self.opts = onnx_dir, repo_dir, dims, opts
        self.checkpoint = meta.get("checkpoint")
        self.backbone = backbone_from_description(meta.get("backbone"))
        self.sample = load_sample(opts.sample)
        self.log = log
        self._reference: Reference | None = None
        self._fpn: tuple[np.ndarray, str] | None = None
        self._text: TextSample | None = None

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            graphs = {m: self.onnx_dir / f"{m}.onnx" for m in MODELS}
            self._reference = pick_reference(graphs, self.dims, self.checkpoint,
                                             self.backbone, log=self.log)
        return self._reference

    def fpn(self) -> tuple[np.ndarray, str]:
        """FPN features of the photo from the reference backbone (for enc_dec's check)."""
        if self._fpn is None:
            ref = self.reference
            if hasattr(ref, "parts") or (self.onnx_dir / "backbone.onnx").is_file():
                case = backbone_cases(self.dims, self.sample)[0]
                self._fpn = (ref.run(specs.BACKBONE, case.inputs)[specs.FPN_FEATURES],
                             f"reference features of the {case.label}")
            else:  # only enc_dec.onnx given and no checkpoint: features of the right size
                rng = np.random.default_rng(self.opts.seed + 2)
                h = self.dims.feat_hw
                self._fpn = (rng.standard_normal((1, self.dims.fpn_dim, h, h)).astype(
                    np.float32), "random FPN features (no backbone graph or checkpoint)")
        return self._fpn

    def text(self, rows: int) -> TextSample:
        if self._text is None:
            self._text = sample_text(self.sample, rows)
        if self._text is None:
            parts = getattr(self.reference, "parts", None)
            encoder = None
            if parts is not None and not (self.repo_dir / specs.TEXT_ENCODER).is_dir():
                from dart_triton.model.text_encoder import TextEncoder

                encoder = TextEncoder.from_sam3(parts.model, parts.tokenizer)
            self._text = real_text(self.dims, rows, self.repo_dir, self.checkpoint,
                                   encoder=encoder, source=f"the checkpoint {self.checkpoint}",
                                   seed=self.opts.seed)
            if self._text.label.startswith("random"):
                self.log(f"[build-plans] warning: {self._text.label}")
        return self._text

    def verify(self, job: PlanJob, run_plan) -> dict:
        ref = self.reference
        if job.model == specs.BACKBONE:
            cases = backbone_cases(self.dims, self.sample)
            inputs = {"pixels": cases[0].label}
        else:
            fpn, fpn_label = self.fpn()
            text = self.text(max(r.max for r in job.ranges))
            cases = enc_dec_cases(job.ranges, fpn, text)
            inputs = {"fpn_features": fpn_label, "text": text.label}
        result = verify_plan(job.model, cases, ref.runner(job.model), run_plan,
                             self.opts.tolerances, reference_name=ref.name)
        return {**result, "inputs": inputs}


def _verify(trt, job: PlanJob, blob: bytes, verifier: _Verifier, logger) -> dict:
    from dart_triton.export.tensorrt.executor import PlanExecutor

    with tensorrt_step(f"loading the {job.model} plan for verification", job.path):
        runner = PlanExecutor(blob, trt, logger)

    def run_plan(inputs, profile: int = 0) -> dict:
        with tensorrt_step(f"running the {job.model} plan (profile {profile})", job.path):
            return runner(inputs, profile)

    try:
        return verifier.verify(job, run_plan)
    finally:
        runner.close()


# Sidecar --------------------------------------------------------------------------------


def plan_fields(model: str, opts: PlanBuildOptions, imgsz: int, max_classes: int | None,
                backbone: str, path: TensorRTPath | None,
                ranges: list[ProfileRange] | None = None) -> dict:
    """What shapes a plan, as its sidecar records it (``plan_sidecar.PLAN_FIELDS``).

    The build writes these; ``check-repository`` computes them from the build options
    and compares (``path`` None: no TensorRT here, its fields are not compared)."""
    enc = model == specs.ENC_DEC
    if ranges is None and enc:
        ranges = profile_ranges(max_classes, opts.buckets, opts.opt_classes)
    fields = {
        "precision": opts.precision,
        "opt_level": opts.opt_level,
        "workspace_gb": opts.workspace_gb,
        "imgsz": imgsz,
        "backbone_kind": backbone_kind(backbone) if model == specs.BACKBONE else None,
        "buckets": list(opts.buckets) if enc and opts.buckets else None,
        "max_classes": max_classes if enc else None,
        "profiles": [{"index": i, "min": r.min, "opt": r.opt, "max": r.max}
                     for i, r in enumerate(ranges or [])] if enc else [],
    }
    if path is not None:
        fields.update({
            "tensorrt_version": path.version,
            "typing": path.typing,
            "fp16_graph": (fp16.Fp16Policy().record() if path.build_graph(opts.precision)
                           else None),
        })
    return fields


def wanted_plan_fields(opts: PlanBuildOptions, imgsz: int, max_classes: int, backbone: str,
                       path: TensorRTPath | None) -> dict:
    """What building with ``opts`` would record now, both plans' fields in one mapping
    (``plan_sidecar.stale_reasons`` compares each plan with the fields that are its own)."""
    fields = plan_fields(specs.ENC_DEC, opts, imgsz, max_classes, backbone, path)
    fields["backbone_kind"] = backbone_kind(backbone)
    return fields


def _sidecar(job: PlanJob, dims: specs.GraphDims, opts: PlanBuildOptions, backbone: str,
             device: dict | None, onnx_digest: str, plan_digest: str, size: int,
             verification: dict, fp16_report: dict | None) -> dict:
    enc = job.model == specs.ENC_DEC
    dims_dict = {k: v for k, v in dataclasses.asdict(dims).items() if k != "extra"}
    return {
        "model": job.model,
        "plan": job.plan.name,
        "plan_sha256": plan_digest,
        "plan_bytes": size,
        "onnx": str(job.onnx),
        "onnx_sha256": onnx_digest,
        "gpu_name": (device or {}).get("gpu_name"),
        "compute_capability": (device or {}).get("compute_capability"),
        "graph_dims": dims_dict,
        "backbone": backbone if job.model == specs.BACKBONE else None,
        "n_range": [job.ranges[0].min, job.ranges[-1].max] if enc and job.ranges else None,
        "workspace_bytes": opts.workspace_bytes(),
        "fp16_report": fp16_report,
        "trtexec": ([job.prepare] if job.prepare else []) + [job.trtexec],
        "verification": verification,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **plan_fields(job.model, opts, dims.imgsz, dims.max_classes, backbone, job.path,
                      job.ranges),
    }


def _prefixed(model: str) -> Callable[[str], None]:
    return lambda message: print(f"[build-plans] {model}: {message}", flush=True)


def _worst_line(verification: dict) -> str:
    return ", ".join(f"{k} cos {v['cosine']:.5f} max|d| {v['max_abs']:.3g}"
                     for k, v in verification["worst"].items())


def build_plans(
    onnx_dir: str | Path,
    repo_dir: str | Path,
    options: PlanBuildOptions | Mapping | object | None = None,
) -> dict[str, dict]:
    """Build, verify and install the plans; returns ``{model: sidecar dict}``.

    Plans are staged beside their final place and moved to ``<model>/<version>/model.plan``
    only after every requested plan has passed verification, so a failed build never
    leaves a half-updated repository. Raises TensorRTMissingError, TensorRTError,
    VerificationError, PlanCompatibilityError, FileNotFoundError or ValueError with a
    one-line message to show as is.
    """
    opts = PlanBuildOptions.coerce(options)
    onnx_dir, repo_dir = Path(onnx_dir), Path(repo_dir)
    dims, jobs = plan_jobs(onnx_dir, repo_dir, opts)
    trt = import_tensorrt()
    path = jobs[0].path
    if path != TensorRTPath.detect(trt):  # the module changed under us: decide again
        dims, jobs = plan_jobs(onnx_dir, repo_dir, opts, TensorRTPath.detect(trt))
        path = jobs[0].path
    device = current_device()
    check_repository_compatibility(
        repo_dir, {"model": jobs[0].model, "imgsz": dims.imgsz, "tensorrt_version": path.version},
        replacing=opts.models)
    with tensorrt_step("creating the logger", path):
        logger = trt.Logger(trt.Logger.INFO if opts.verbose else trt.Logger.WARNING)
    meta = read_graphs_json(onnx_dir)
    backbone = meta.get("backbone") or "vit"  # the exporter's description of the module
    verifier = _Verifier(onnx_dir, repo_dir, dims, opts, meta, print)
    how = ", FP16 decided in the graph" if path.build_graph(opts.precision) else ""
    print(f"[build-plans] TensorRT {path.version}: {path.typing}ly typed ({opts.precision}{how})",
          flush=True)
    staged: dict[str, Path] = {}
    results: dict[str, dict] = {}
    try:
        for job in jobs:
            lines = ([job.prepare] if job.prepare else []) + [job.trtexec]
            print(f"[build-plans] {job.model}: building ({opts.precision}); equivalent:\n  "
                  + "\n  ".join(lines), flush=True)
            # Staged in a hidden folder of the model's own directory: same filesystem as the
            # final path (atomic rename), and not a version directory Triton would load.
            model_dir = job.plan.parent.parent
            model_dir.mkdir(parents=True, exist_ok=True)
            stage_dir = Path(tempfile.mkdtemp(prefix=".plan-staging-", dir=model_dir))
            staged[job.model] = stage_dir / job.plan.name
            graph, report = job.onnx, None
            if job.fp16_graph:
                graph = stage_dir / fp16.fp16_path(job.onnx).name
                report = fp16.convert_file(job.onnx, graph, log=_prefixed(job.model)).as_dict()
            with tensorrt_step(f"building the {job.model} plan", path):
                blob = build_engine(trt, job, opts, logger, graph)
            if graph != job.onnx:  # the FP16 graph is as large as the plan: drop it now
                for f in stage_dir.glob(graph.name + "*"):
                    f.unlink()
            staged[job.model].write_bytes(blob)
            if opts.skip_verify:
                verification = {"skipped": True}
            else:
                verification = _verify(trt, job, blob, verifier, logger)
                print(f"[build-plans] {job.model}: verified against {verification['reference']}"
                      f" on {'; '.join(verification['inputs'].values())}: "
                      f"{_worst_line(verification)}", flush=True)
            results[job.model] = _sidecar(job, dims, opts, backbone, device,
                                          onnx_sha256(job.onnx),
                                          sha256_files([staged[job.model]]), len(blob),
                                          verification, report)
            del blob
        for job in jobs:  # every plan passed: install them all
            job.plan.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged[job.model], job.plan)
            write_sidecar(job.plan, results[job.model])
            results[job.model]["plan_path"] = str(job.plan)
            print(f"[build-plans] {job.model}: wrote {job.plan}", flush=True)
    finally:
        for staged_plan in staged.values():
            shutil.rmtree(staged_plan.parent, ignore_errors=True)
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
                    help=f"{what}.npz of pixel_values/text_features/text_mask to verify with "
                         "(default: the packaged photograph and COCO class names)")
    ap.add_argument("--skip-verify", action="store_true",
                    help=f"{what}do not compare the plans with the FP32 reference")
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
    ap.add_argument("--tensorrt-version", metavar="VERSION",
                    help="--dry-run without TensorRT here: print the lines for this version "
                         f"(e.g. 11.4; default {DEFAULT_DRY_RUN_VERSION})")
    add_plan_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        opts = PlanBuildOptions.from_args(args)
        if args.dry_run:
            path = (TensorRTPath.for_version(args.tensorrt_version) if args.tensorrt_version
                    else None)
            _, jobs = plan_jobs(args.onnx_dir, args.output, opts, path)
            for job in jobs:
                if job.prepare:
                    print(job.prepare)
                print(job.trtexec)
            return 0
        results = build_plans(args.onnx_dir, args.output, opts)
    except (TensorRTMissingError, TensorRTError, VerificationError, PlanCompatibilityError,
            FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"dart-triton build-plans: error: {one_line(e)}", file=sys.stderr)
        return 1
    for model, info in results.items():
        print(f"{model}: {info['plan_path']} (TensorRT {info['tensorrt_version']}, "
              f"{info['typing']}ly typed, {info['precision']}, {info['gpu_name']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
