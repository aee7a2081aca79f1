"""ONNX graphs -> verified TensorRT plans in a Triton model repository (paper §3.3-3.4).

``dart-triton build-plans --onnx-dir DIR --output REPO`` builds ``REPO/backbone/1/model.plan``
and ``REPO/enc_dec/1/model.plan``, and ``REPO/mask_decoder/1/model.plan`` when the graphs
were exported with ``--masks`` (FP16 by default), runs each on real inputs against an
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
The mask_decoder plan has one profile over its prompts P (``1..max_classes``, tuned like
enc_dec's single profile: ``dart`` sends the kept prompts in chunks, unpadded) and kept
queries per prompt J (``1..num_queries``, tuned at ``MASK_OPT_QUERIES``). With
``--max-batch B`` the backbone plan has one profile over its frames per call, ``1..B``
tuned at B (the graph must be exported with a dynamic frame count), and is verified on
one frame and on B different ones.

TensorRT is imported lazily: everything up to the build itself (graph checks, profiles,
the equivalent ``trtexec`` line: ``--dry-run``) works on a machine without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from dart_triton.contract import specs
from dart_triton.contract.passes import ProfileRange, profile_ranges
from dart_triton.export.tensorrt import fp16
from dart_triton.export.tensorrt.options import (
    DEFAULT_DRY_RUN_VERSION,
    PlanBuildOptions,
    TensorRTError,
    TensorRTMissingError,
    TensorRTPath,
    add_plan_arguments,
    import_tensorrt,
    installed_path,
    one_line,
    tensorrt_step,
)
from dart_triton.export.tensorrt.plan_check import PlanChecker, check_plan
from dart_triton.export.tensorrt.plan_record import (
    PROMPT_MODELS,
    PlanJob,
    mask_ranges,
    sidecar_record,
)
from dart_triton.export.tensorrt.profiles import (
    MODELS,
    GraphIO,
    check_graph_matches_spec,
    dynamic_inputs,
    frame_profile_shapes,
    frame_range,
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
from dart_triton.export.tensorrt.verify import VerificationError

SPEC_FOR = {specs.BACKBONE: specs.backbone_spec, specs.ENC_DEC: specs.enc_dec_spec,
            specs.MASK_DECODER: specs.mask_decoder_spec}


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
    for m in opts.models or specs.GRAPH_MODELS:  # asked for, or what every export has
        if not paths[m].is_file():
            how = " --masks" if m == specs.MASK_DECODER else ""
            raise FileNotFoundError(f"{paths[m]} not found (run `dart-triton export{how}` first)")
    ios = {m: read_onnx_io(p) for m, p in paths.items() if p.is_file()}
    hint = read_graphs_json(onnx_dir).get("dims", {})
    max_classes = opts.resolved_max_classes(hint.get("max_classes"))
    dims = graph_dims_from_onnx(ios.get(specs.BACKBONE), ios.get(specs.ENC_DEC), max_classes, hint)
    if opts.imgsz is not None and opts.imgsz != dims.imgsz:
        raise ValueError(f"--imgsz {opts.imgsz} but the ONNX graphs in {onnx_dir} are for "
                         f"imgsz {dims.imgsz}: re-export or drop --imgsz")
    models = opts.models or specs.graph_models(dims)
    if specs.MASK_DECODER in models:
        if not dims.masks:
            raise ValueError(f"mask_decoder: the graphs in {onnx_dir} were exported without "
                             "--masks (no mask inputs from backbone and enc_dec)")
        if not paths[specs.MASK_DECODER].is_file():
            raise FileNotFoundError(f"{paths[specs.MASK_DECODER]} not found (the graphs say "
                                    "--masks: re-run `dart-triton export --masks`)")
    ranges = profile_ranges(max_classes, opts.buckets, opts.opt_classes)
    jobs = []
    for model in models:
        io, spec = ios[model], SPEC_FOR[model](dims)
        check_graph_matches_spec(io, spec, f"{model}.onnx")
        if model == specs.ENC_DEC and io.inputs[specs.TEXT_FEATURES][0] != -1:
            raise ValueError(f"enc_dec.onnx has a fixed class count N="
                             f"{io.inputs[specs.TEXT_FEATURES][0]}: export it with a dynamic "
                             "N axis so one plan serves 1..max_classes")
        model_ranges, queries = ranges, None
        if model == specs.MASK_DECODER:
            if io.inputs[specs.KEPT_QUERIES][:2] != (-1, -1):
                raise ValueError(f"mask_decoder.onnx has fixed {specs.KEPT_QUERIES} "
                                 f"{list(io.inputs[specs.KEPT_QUERIES])}: export it with "
                                 "dynamic P and J axes")
            prompts, queries = mask_ranges(opts, max_classes, dims.num_queries)
            model_ranges = [prompts]
        dyn = dynamic_inputs(io)
        profiles = model_profiles(spec, model_ranges, queries)
        frames = backbone_frames(io, opts.max_batch) if model == specs.BACKBONE else None
        if frames is not None:
            profiles = [frame_profile_shapes(spec, frames)]
        elif not profiles and dyn:  # graph left a fixed dim dynamic: pin it to the spec
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
                            model_ranges if profiles and model in PROMPT_MODELS else [],
                            profiles, dyn, line, path, prepare, queries, frames))
    return dims, jobs


def backbone_frames(io: GraphIO, max_batch: int) -> ProfileRange | None:
    """The backbone plan's frames per call with --max-batch B > 1 (None: one frame, as
    exported or pinned to the spec's 1); the graph must take any number of frames."""
    if max_batch <= 1:
        return None
    have = io.inputs[specs.PIXEL_VALUES][0]
    if have != -1:
        raise ValueError(f"--max-batch {max_batch}: backbone.onnx takes {have} frame(s) per "
                         f"call; export it with `--max-batch {max_batch}` (a dynamic frame "
                         f"count) so one plan serves 1..{max_batch} frames")
    return frame_range(max_batch)


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
    checker = PlanChecker(onnx_dir, repo_dir, dims, opts, meta, print)
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
                verification = check_plan(trt, job.model, job.ranges, job.path, blob, checker,
                                          logger, job.queries)
                print(f"[build-plans] {job.model}: verified against {verification['reference']}"
                      f" on {'; '.join(verification['inputs'].values())}: "
                      f"{_worst_line(verification)}", flush=True)
            results[job.model] = sidecar_record(job, dims, opts, backbone, device,
                                                onnx_sha256(job.onnx),
                                                sha256_files([staged[job.model]]),
                                                len(blob), verification, report)
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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dart-triton build-plans",
        description="Build verified TensorRT plans (backbone, enc_dec; mask_decoder from an "
                    "export with --masks) from the ONNX graphs.")
    ap.add_argument("--onnx-dir", required=True, type=Path,
                    help="folder with backbone.onnx and enc_dec.onnx (and mask_decoder.onnx)")
    ap.add_argument("--output", required=True, type=Path, help="Triton model repository")
    ap.add_argument("--max-classes", type=int,
                    help=f"largest N per pass (default {specs.DEFAULT_MAX_CLASSES}, "
                         "or the largest bucket)")
    ap.add_argument("--opt-classes", type=int, help="N the single profile is tuned for")
    ap.add_argument("--buckets", help="e.g. 1,4,16: one profile per bucket (callers pad N)")
    ap.add_argument("--imgsz", type=int, help="expected image size (checked against ONNX)")
    ap.add_argument("--max-batch", type=int, default=1, metavar="B",
                    help="backbone frames per call, as the repository's `build --max-batch` "
                         "(a profile over 1..B frames; needs an export with --max-batch)")
    ap.add_argument("--models", help=f"subset of {','.join(MODELS)}, e.g. enc_dec "
                                     "(default: every graph exported)")
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
