"""Graph sizes, optimisation-profile shapes and the equivalent ``trtexec`` line.

Everything here is plain Python (no TensorRT, no GPU) so it is unit-tested on CPU. The
sizes come from the ONNX graphs themselves, checked against ``dart_triton.contract.specs``: the
plans are built from whatever the exporter wrote, and a mismatch fails before the
(minutes-long) TensorRT build starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dart_triton.contract import specs
from dart_triton.contract.passes import ProfileRange

Shape = tuple[int, ...]
MODELS = specs.MASK_GRAPH_MODELS  # every graph a plan can be built for (mask_decoder: --masks)
# Kept queries per prompt the mask_decoder profile is tuned for: a prompt keeps a few
# detections in a typical image, never more than the decoder's queries (the profile's max).
MASK_OPT_QUERIES = 4


@dataclass(frozen=True)
class GraphIO:
    """Input and output shapes of one ONNX graph; -1 marks a dynamic dimension."""

    inputs: dict[str, Shape]
    outputs: dict[str, Shape]


def read_onnx_io(path: str | Path) -> GraphIO:
    """Shapes of the graph inputs/outputs without loading external weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}

    def shape(value_info) -> Shape:
        dims = value_info.type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)

    return GraphIO(
        inputs={v.name: shape(v) for v in model.graph.input if v.name not in init_names},
        outputs={v.name: shape(v) for v in model.graph.output},
    )


def _need(io: dict[str, Shape], name: str, rank: int, where: str) -> Shape:
    if name not in io:
        raise ValueError(f"{where}: tensor {name!r} missing (has {sorted(io)})")
    if len(io[name]) != rank:
        raise ValueError(f"{where}: {name} has rank {len(io[name])}, expected {rank}")
    return io[name]


# Written by `dart-triton export` beside the graphs (onnx_export.GRAPHS_JSON; not imported
# here because that module pulls in torch).
GRAPHS_JSON = "dart_graphs.json"
# Sizes TensorRT needs static: they shape the plan's inputs.
INPUT_DIMS = ("imgsz", "fpn_dim", "text_len", "text_dim")


def read_graphs_json(onnx_dir: str | Path) -> dict:
    """Everything the exporter recorded beside the graphs (``{}`` without the file)."""
    path = Path(onnx_dir) / GRAPHS_JSON
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()))


def backbone_from_description(described: str | None) -> str:
    """The ``--backbone`` value behind the exporter's description of it: ``vit``,
    ``pruned:/abs/plan.json:K (unit)`` -> ``pruned:/abs/plan.json:K``; None -> ``vit``
    (exports from before backbone choices)."""
    text = (described or "vit").strip()
    if text.endswith(")") and " (" in text:
        text = text[:text.rindex(" (")]
    return text


def backbone_kind(spec: str | None) -> str:
    """``vit``, ``pruned`` or ``student`` of a ``--backbone`` value (or its description)."""
    return backbone_from_description(spec).partition(":")[0]


def _imgsz_for_features(h: int, scales: specs.GraphDims, backbone: tuple[int, int]) -> int:
    """The input size enc_dec's h x h features imply: the backbone's (imgsz, side) when its
    features have that side, else the size whose detection level under `scales` is h."""
    if h <= 0:
        return -1  # symbolic in this graph
    if backbone[1] == h:
        return backbone[0]
    return math.ceil(h / scales.detection_scale) * specs.PATCH_SIZE


def graph_dims_from_onnx(
    backbone: GraphIO | None,
    enc_dec: GraphIO | None,
    max_classes: int = specs.DEFAULT_MAX_CLASSES,
    hint: Mapping | None = None,
) -> specs.GraphDims:
    """GraphDims read off the exported graphs (at least one must be given).

    Static graph dimensions are facts; ``hint`` (the exporter's dart_graphs.json) fills
    the ones the exporter left symbolic (e.g. the query count of the outputs) and must
    agree with the rest. The graphs cannot tell which FPN scales the checkpoint has: those
    come from the hint, SAM3's default (detection at imgsz / 14) when it has none.
    """
    if backbone is None and enc_dec is None:
        raise ValueError("need backbone.onnx or enc_dec.onnx to read the graph sizes")
    hint = dict(hint or {})
    scales = specs.GraphDims(scale_factors=hint.get("scale_factors", specs.SAM3_SCALE_FACTORS))
    found: list[tuple[str, int | bool, str]] = []  # (key, value, where)
    features: list[tuple[int, str]] = []  # detection-level side per graph
    backbone_sizes = (-1, -1)  # (imgsz, detection-level side)
    if backbone is not None:
        pix = _need(backbone.inputs, specs.PIXEL_VALUES, 4, "backbone.onnx")
        fpn = _need(backbone.outputs, specs.FPN_FEATURES, 4, "backbone.onnx")
        backbone_sizes = (pix[2], fpn[2])
        features.append((fpn[2], "backbone.onnx"))
        found += [("imgsz", pix[2], "backbone.onnx"), ("fpn_dim", fpn[1], "backbone.onnx")]
        if len(backbone.outputs) > 1:  # mask levels; a single output says nothing: a
            found.append(("masks", True, "backbone.onnx"))  # checkpoint may have none
    if enc_dec is not None:
        fpn = _need(enc_dec.inputs, specs.FPN_FEATURES, 4, "enc_dec.onnx")
        text = _need(enc_dec.inputs, specs.TEXT_FEATURES, 3, "enc_dec.onnx")
        _need(enc_dec.inputs, specs.TEXT_MASK, 2, "enc_dec.onnx")
        boxes = _need(enc_dec.outputs, specs.PRED_BOXES, 3, "enc_dec.onnx")
        for name in (specs.PRED_LOGITS, specs.PRESENCE_LOGITS):
            _need(enc_dec.outputs, name, 2, "enc_dec.onnx")
        features.append((fpn[2], "enc_dec.onnx"))
        h = _imgsz_for_features(fpn[2], scales, backbone_sizes)
        found += [("imgsz", h, "enc_dec.onnx"), ("fpn_dim", fpn[1], "enc_dec.onnx"),
                  ("text_len", text[1], "enc_dec.onnx"), ("text_dim", text[2], "enc_dec.onnx"),
                  ("num_queries", boxes[1], "enc_dec.onnx"),
                  ("masks", specs.ENCODER_MEMORY in enc_dec.outputs, "enc_dec.onnx")]
    kw: dict = {}
    where: dict[str, str] = {}
    for key, value, src in found:
        if type(value) is int and value <= 0:
            continue  # symbolic in this graph
        if key in kw and kw[key] != value:
            raise ValueError(f"{where[key]} and {src} disagree on {key}: {kw[key]} vs {value} "
                             "(export both graphs from one `dart-triton export` run)")
        kw[key], where[key] = value, src
    known = {f.name for f in dataclasses.fields(specs.GraphDims)} - {"max_classes"}
    for key, value in hint.items():
        if key not in known:
            continue
        if key in kw and kw[key] != value:
            raise ValueError(f"{GRAPHS_JSON} says {key}={value} but {where[key]} has "
                             f"{kw[key]}: the folder mixes graphs from different exports")
        kw.setdefault(key, value)
    missing = [k for k in INPUT_DIMS if k not in kw]
    if missing:
        raise ValueError(f"graph sizes {missing} are dynamic in the ONNX export and not in "
                         f"{GRAPHS_JSON}: TensorRT needs them static")
    dims = specs.GraphDims(max_classes=max_classes, **kw)
    if dims.imgsz % specs.PATCH_SIZE:
        raise ValueError(f"imgsz {dims.imgsz} is not a multiple of the patch size 14")
    for h, src in features:
        if h > 0 and h != dims.feat_hw:
            raise ValueError(
                f"{src}: {specs.FPN_FEATURES} is {h}x{h}, but {dims.imgsz} px with scale "
                f"factors {list(dims.scale_factors)} detects on {dims.feat_hw}x{dims.feat_hw} "
                f"(stride {dims.detection_stride:g}): the {GRAPHS_JSON} beside the graphs is "
                "missing or from another export")
    return dims


def check_graph_matches_spec(io: GraphIO, spec: specs.ModelSpec, where: str) -> None:
    """Every static dimension the spec fixes must match the graph (dynamic ones are free)."""
    for kind, have, want in (("input", io.inputs, spec.inputs), ("output", io.outputs,
                                                                  spec.outputs)):
        for t in want:
            if t.name not in have:
                raise ValueError(f"{where}: {kind} {t.name!r} missing (has {sorted(have)})")
            got = have[t.name]
            ok = len(got) == len(t.dims) and all(
                w == -1 or g in (-1, w) for g, w in zip(got, t.dims, strict=True)
            )
            if not ok:
                raise ValueError(f"{where}: {kind} {t.name} is {list(got)}, spec says "
                                 f"{list(t.dims)} (-1 = dynamic)")


def profile_shapes(
    spec: specs.ModelSpec, n: ProfileRange | None, j: ProfileRange | None = None
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``{input: (min, opt, max)}`` for one profile: the first -1 of an input's spec dims
    is N (classes, or mask_decoder's prompts P), a second one is ``j`` (its kept queries J)."""
    out = {}
    for t in spec.inputs:
        axes = [n, j][:t.dims.count(-1)]
        if None in axes or t.dims.count(-1) > 2:
            raise ValueError(f"{spec.name}.{t.name} {list(t.dims)} is dynamic but no "
                             f"{'N' if axes and axes[0] is None else 'J'} range was given")
        shapes = []
        for k in ("min", "opt", "max"):
            values = iter(getattr(r, k) for r in axes)
            shapes.append(tuple(next(values) if d == -1 else d for d in t.dims))
        out[t.name] = (shapes[0], shapes[1], shapes[2])
    return out


def model_profiles(
    spec: specs.ModelSpec, ranges: Sequence[ProfileRange], j: ProfileRange | None = None
) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """Profiles for a model: none for a fully static spec (TensorRT adds its own)."""
    if not any(-1 in t.dims for t in spec.inputs):
        return []
    return [profile_shapes(spec, r, j) for r in ranges]


def frame_range(max_batch: int) -> ProfileRange:
    """A batched backbone's frames per call: 1..max_batch, tuned at max_batch (batches
    fill up under load, when throughput matters; a light load leaves the GPU time to
    spare on the smaller batches)."""
    return ProfileRange(1, max_batch, max_batch)


def frame_profile_shapes(spec: specs.ModelSpec, frames: ProfileRange
                         ) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``{input: (min, opt, max)}`` of the backbone's one profile: the spec's leading 1
    (one frame) ranges over ``frames``."""
    return {t.name: tuple((k, *t.dims[1:]) for k in (frames.min, frames.opt, frames.max))
            for t in spec.inputs}


def query_range(num_queries: int) -> ProfileRange:
    """mask_decoder's J: 1 up to every decoder query, tuned at `MASK_OPT_QUERIES`."""
    return ProfileRange(1, min(MASK_OPT_QUERIES, num_queries), num_queries)


def dynamic_inputs(io: GraphIO) -> list[str]:
    """Inputs the ONNX graph leaves dynamic: the only ones a profile has to set."""
    return [name for name, shape in io.inputs.items() if -1 in shape]


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(
    onnx_path: str | Path,
    plan_path: str | Path,
    profiles: Sequence[dict[str, tuple[Shape, Shape, Shape]]],
    precision: str = "fp16",
    workspace_gb: float | None = None,
    opt_level: int | None = None,
    only_inputs: Sequence[str] | None = None,
    strongly_typed: bool = False,
) -> str:
    """The ``trtexec`` line that builds the same plan (for reproducing a build by hand).

    Weakly typed (TensorRT 10): ``--fp16`` lets the builder pick FP16 kernels. Strongly
    typed (TensorRT 11, which has no ``--fp16``): the precision is the graph's, so
    ``onnx_path`` is the FP16 graph (``export.fp16``) and ``--stronglyTyped`` is given (a
    no-op on 11, where strong typing is always on; required on 10). ``--noTF32`` makes an
    fp32 plan IEEE FP32 either way. With several profiles each min/opt/max group follows
    its own ``--profile=i``: that is how trtexec builds multiple optimisation profiles.
    """
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}"]
    if strongly_typed:
        args.append("--stronglyTyped")
    elif precision == "fp16":
        args.append("--fp16")
    if precision == "fp32":
        args.append("--noTF32")
    if workspace_gb is not None:
        args.append(f"--memPoolSize=workspace:{round(workspace_gb * 1024)}")  # MiB
    if opt_level is not None:
        args.append(f"--builderOptimizationLevel={opt_level}")
    for i, prof in enumerate(profiles):
        names = [n for n in prof if only_inputs is None or n in only_inputs]
        if not names:
            continue
        if len(profiles) > 1:
            args.append(f"--profile={i}")
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(f"{n}:{_dims(prof[n][k])}" for n in names))
    args.append("--skipInference")
    return shlex.join(args)
