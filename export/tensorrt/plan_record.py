"""What is decided about a plan before TensorRT is touched (`PlanJob`, made by
``build.plan_jobs``) and what its sidecar records about how it was shaped
(``sidecar.PLAN_FIELDS``): the fields the build writes, and the same fields as building
with some options would write them now (what ``check-repository`` compares with).

Plain Python: no TensorRT.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from dart_triton.contract import specs
from dart_triton.contract.passes import ProfileRange, profile_ranges
from dart_triton.export.tensorrt import fp16
from dart_triton.export.tensorrt.options import PlanBuildOptions, TensorRTPath
from dart_triton.export.tensorrt.profiles import (
    GraphIO,
    backbone_kind,
    frame_range,
    query_range,
)

# Plans with optimisation profiles over prompts (their PlanJob.ranges).
PROMPT_MODELS = (specs.ENC_DEC, specs.MASK_DECODER)


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
    queries: ProfileRange | None = None  # mask_decoder's kept queries per prompt (J)
    frames: ProfileRange | None = None  # a batched backbone's frames per call

    @property
    def fp16_graph(self) -> bool:
        return self.prepare is not None


def mask_ranges(opts: PlanBuildOptions, max_classes: int, num_queries: int
                ) -> tuple[ProfileRange, ProfileRange]:
    """mask_decoder's one profile: prompts P as enc_dec's single profile (one, not one per
    bucket: `dart` sends the kept prompts unpadded), kept queries J per prompt."""
    return profile_ranges(max_classes, (), opts.opt_classes)[0], query_range(num_queries)


def mask_profiles(opts: PlanBuildOptions, max_classes: int | None,
                  num_queries: int | None) -> list[dict] | None:
    """mask_decoder's one profile as its sidecar records it; None where the query count
    is not known."""
    if max_classes is None or num_queries is None:
        return None
    prompts, queries = mask_ranges(opts, max_classes, num_queries)
    return [{"index": 0, **{axis: {"min": r.min, "opt": r.opt, "max": r.max}
                            for axis, r in (("prompts", prompts), ("queries", queries))}}]


def frame_profile(opts: PlanBuildOptions) -> dict | None:
    """The backbone's profile over frames as its sidecar records it: None for one frame
    (as plans from before --max-batch record it, so they stay current at --max-batch 1)."""
    if opts.max_batch <= 1:
        return None
    r = frame_range(opts.max_batch)
    return {"min": r.min, "opt": r.opt, "max": r.max}


def plan_fields(model: str, opts: PlanBuildOptions, imgsz: int, max_classes: int | None,
                backbone: str, path: TensorRTPath | None,
                ranges: list[ProfileRange] | None = None, num_queries: int | None = None
                ) -> dict:
    """What shapes a plan, as its sidecar records it (``plan_sidecar.PLAN_FIELDS``).

    The build writes these; ``check-repository`` computes them from the build options
    and compares (``path`` None: no TensorRT here, its fields are not compared)."""
    enc = model == specs.ENC_DEC
    if ranges is None and enc:
        ranges = profile_ranges(max_classes, opts.buckets, opts.opt_classes)
    mask = (mask_profiles(opts, max_classes, num_queries) if model == specs.MASK_DECODER
            else None)
    fields = {
        "precision": opts.precision,
        "opt_level": opts.opt_level,
        "workspace_gb": opts.workspace_gb,
        "imgsz": imgsz,
        "backbone_kind": backbone_kind(backbone) if model == specs.BACKBONE else None,
        "frame_profile": frame_profile(opts) if model == specs.BACKBONE else None,
        "buckets": list(opts.buckets) if enc and opts.buckets else None,
        "max_classes": max_classes if enc else None,
        "profiles": [{"index": i, "min": r.min, "opt": r.opt, "max": r.max}
                     for i, r in enumerate(ranges or [])] if enc else [],
        "mask_profiles": mask,
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
                       path: TensorRTPath | None, num_queries: int | None = None) -> dict:
    """What building with ``opts`` would record now, every plan's fields in one mapping
    (``plan_sidecar.stale_reasons`` compares each plan with the fields that are its own;
    mask_decoder's profile only given ``num_queries``)."""
    fields = plan_fields(specs.ENC_DEC, opts, imgsz, max_classes, backbone, path)
    fields["backbone_kind"] = backbone_kind(backbone)
    fields["frame_profile"] = frame_profile(opts)
    fields["mask_profiles"] = mask_profiles(opts, max_classes, num_queries)
    if fields["mask_profiles"] is None:
        del fields["mask_profiles"]  # not known: not compared
    return fields


def sidecar_record(job: PlanJob, dims: specs.GraphDims, opts: PlanBuildOptions,
                   backbone: str, device: dict | None, onnx_digest: str, plan_digest: str,
                   size: int, verification: dict, fp16_report: dict | None) -> dict:
    """Everything the sidecar of `job`'s plan says."""
    ranged = job.model in PROMPT_MODELS
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
        "n_range": [job.ranges[0].min, job.ranges[-1].max] if ranged and job.ranges else None,
        "j_range": [job.queries.min, job.queries.max] if job.queries else None,
        "workspace_bytes": opts.workspace_bytes(),
        "fp16_report": fp16_report,
        "trtexec": ([job.prepare] if job.prepare else []) + [job.trtexec],
        "verification": verification,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **plan_fields(job.model, opts, dims.imgsz, dims.max_classes, backbone, job.path,
                      job.ranges, dims.num_queries),
    }
