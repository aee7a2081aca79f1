"""Checkpoint -> backbone.onnx + enc_dec.onnx (+ mask_decoder.onnx with --masks), each
checked against PyTorch in ONNX Runtime.

`dart-triton export --checkpoint DIR --output DIR [--imgsz N] [--max-classes M] [--masks]
 [--max-batch B]`
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from dart_triton.contract import specs
from dart_triton.graphs.runtime import OrtGraph
from dart_triton.model.checkpoint import CheckpointError
from dart_triton.model.parts import Sam3Parts, load_parts

OPSET = 18
MIN_COSINE = 0.99999
# A protobuf cannot exceed 2 GiB: graphs with more weight bytes keep them beside the file.
EXTERNAL_DATA_BYTES = 1 << 30
# Ops that would hide attention inside one fused node (TensorRT then cannot keep FP32
# accumulation); the restructured backbone must not contain any of them.
FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "ScaledDotProductAttention",
                       "GroupQueryAttention", "FlashAttention"}
GRAPHS_JSON = "dart_graphs.json"
# backbone.onnx's frame count as dart_graphs.json records it: fixed at 1, or dynamic
# (--max-batch > 1: Triton batches the frames of several requests into one call).
DYNAMIC_FRAMES = "dynamic"
# Frames the export check runs through a dynamic backbone at once (distinct frames, so a
# graph that mixed frames up or specialised to one frame would disagree with PyTorch).
CHECK_FRAMES = 3


@dataclass
class Agreement:
    tensor: str
    cosine: float
    max_abs: float

    @property
    def ok(self) -> bool:
        return self.cosine >= MIN_COSINE


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))


def _save(model_path: Path, tmp_path: Path) -> None:
    """Re-save as one file, or with external weights when too large for protobuf."""
    model = onnx.load(str(tmp_path), load_external_data=True)
    data_name = model_path.name + ".data"
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    (model_path.parent / data_name).unlink(missing_ok=True)
    onnx.save_model(model, str(model_path), save_as_external_data=large,
                    all_tensors_to_one_file=True, location=data_name)


def export_module(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
            output_names: list[str], dynamic_axes: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(tmp), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    _save(path, tmp)
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    onnx.checker.check_model(str(path))


def sample_inputs(parts: Sam3Parts, n: int, seed: int = 0,
                  frames: int = 1) -> dict[str, np.ndarray]:
    """Pixels in the normalised range (`frames` different frames) and text features of
    real prompts."""
    from dart_triton.model.text_encoder import TextEncoder

    d = parts.dims
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (frames, 3, d.imgsz, d.imgsz)).astype(np.float32)
    names = ["person", "a red car", "traffic light", "dog", "bicycle", "umbrella", "cup",
             "chair"] * (n // 8 + 1)
    text_features, text_mask = TextEncoder.from_sam3(parts.model, parts.tokenizer).encode(
        names[:n])
    return {specs.PIXEL_VALUES: pixels, specs.TEXT_FEATURES: text_features,
            specs.TEXT_MASK: text_mask}


def export_backbone(parts: Sam3Parts, out_dir: Path, dynamic_frames: bool = False) -> Path:
    """One frame, fixed (the spec's leading 1); `dynamic_frames`: dim 0 of the input and
    of every output is "frames" (traced at 2 frames so the exporter cannot specialise
    the window partition's and attention's reshapes to one)."""
    spec = specs.backbone_spec(parts.dims)
    path = out_dir / "backbone.onnx"
    shape = spec.inputs[0].dims
    pixels = torch.zeros((2, *shape[1:]) if dynamic_frames else shape)
    axes = ({t.name: {0: "frames"} for t in (*spec.inputs, *spec.outputs)} if dynamic_frames
            else None)
    export_module(parts.backbone, (pixels,), path, [t.name for t in spec.inputs],
            [t.name for t in spec.outputs], axes)
    return path


def backbone_frames(onnx_dir: str | Path, graph: str = "backbone") -> int | str:
    """backbone.onnx's (or enc_dec.onnx's) frame count as recorded: 1, or DYNAMIC_FRAMES
    (1 for exports from before the record: they were all one frame)."""
    meta = json.loads((Path(onnx_dir) / GRAPHS_JSON).read_text())
    return meta.get(f"{graph}_frames", 1)


def export_enc_dec(parts: Sam3Parts, out_dir: Path, frames: bool = False) -> Path:
    """N prompts, dynamic; `frames`: the graph of shared passes, F frames (dynamic too)
    and a frame index per row (traced at F = 2 so the gather is not specialised away)."""
    spec = specs.enc_dec_spec(parts.dims, frames)
    d = parts.dims
    path = out_dir / "enc_dec.onnx"
    n = max(2, min(3, d.max_classes))  # N >= 2 so the exporter cannot specialise N to 1
    example = (torch.zeros((2, *spec.inputs[0].dims[1:]) if frames else spec.inputs[0].dims),
               torch.zeros(n, d.text_len, d.text_dim),
               torch.ones(n, d.text_len, dtype=torch.int32),
               *((torch.arange(n) % 2,) if frames else ()))
    dynamic = {t.name: {0: "N"} for t in (*spec.inputs[1:], *spec.outputs)}
    if frames:
        dynamic[specs.FPN_FEATURES] = {0: "frames"}
    export_module(parts.head, example, path, [t.name for t in spec.inputs],
            [t.name for t in spec.outputs], dynamic)
    return path


def mask_decoder_example(parts: Sam3Parts, prompts: int = 2, queries: int = 3,
                         inputs: dict | None = None) -> tuple[torch.Tensor, ...]:
    """mask_decoder's inputs in spec order: zeros, or the given `inputs` by name."""
    spec = specs.mask_decoder_spec(parts.dims)
    out = []
    for t in spec.inputs:
        if inputs is not None:
            out.append(torch.as_tensor(inputs[t.name]))
            continue
        shape = [prompts if i == 0 else queries for i, d in enumerate(t.dims) if d == -1]
        shape += [d for d in t.dims if d != -1]
        dtype = getattr(torch, t.numpy_dtype)
        out.append(torch.ones(shape, dtype=dtype) if dtype == torch.int32
                   else torch.zeros(shape, dtype=dtype))
    return tuple(out)


def export_mask_decoder(parts: Sam3Parts, out_dir: Path) -> Path:
    """P prompts and J kept queries per prompt, both dynamic (P, J >= 2 at export so the
    exporter cannot specialise them to 1)."""
    spec = specs.mask_decoder_spec(parts.dims)
    path = out_dir / f"{specs.MASK_DECODER}.onnx"
    axes = {specs.ENCODER_MEMORY: {0: "P"}, specs.TEXT_FEATURES: {0: "P"},
            specs.TEXT_MASK: {0: "P"}, specs.KEPT_QUERIES: {0: "P", 1: "J"},
            specs.MASK_LOGITS: {0: "P", 1: "J"}}
    export_module(parts.mask_head, mask_decoder_example(parts), path,
                  [t.name for t in spec.inputs], [t.name for t in spec.outputs], axes)
    return path


def fused_attention_nodes(path: Path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [f"{n.op_type}:{n.name}" for n in graph.node if n.op_type in FUSED_ATTENTION_OPS]


@torch.no_grad()
def check_graphs(parts: Sam3Parts, out_dir: Path, n: int,
                 dynamic_frames: bool = False) -> list[Agreement]:
    """Run both graphs in ONNX Runtime and in PyTorch on the same sample (a dynamic
    backbone also on CHECK_FRAMES different frames at once)."""
    x = sample_inputs(parts, n)
    feats_ref = parts.backbone(torch.from_numpy(x[specs.PIXEL_VALUES]))
    backbone = OrtGraph(out_dir / "backbone.onnx")
    feats_ort = backbone(**{specs.PIXEL_VALUES: x[specs.PIXEL_VALUES]})
    spec = specs.backbone_spec(parts.dims)
    results = [Agreement(t.name, cosine(o, r.numpy()), float(np.abs(o - r.numpy()).max()))
               for t, o, r in zip(spec.outputs, feats_ort, feats_ref, strict=True)]
    if dynamic_frames:
        pixels = sample_inputs(parts, 1, seed=1, frames=CHECK_FRAMES)[specs.PIXEL_VALUES]
        batch_ref = parts.backbone(torch.from_numpy(pixels))
        batch_ort = backbone(**{specs.PIXEL_VALUES: pixels})
        for t, o, r in zip(spec.outputs, batch_ort, batch_ref, strict=True):
            if o.shape != tuple(r.shape):
                raise RuntimeError(f"backbone.onnx gives {t.name} {list(o.shape)} for "
                                   f"{CHECK_FRAMES} frames, PyTorch {list(r.shape)}")
            results.append(Agreement(f"{t.name}[{CHECK_FRAMES} frames]", cosine(o, r.numpy()),
                                     float(np.abs(o - r.numpy()).max())))

    feats = feats_ref[0].numpy()
    head_ref = parts.head(torch.from_numpy(feats), torch.from_numpy(x[specs.TEXT_FEATURES]),
                          torch.from_numpy(x[specs.TEXT_MASK]))
    enc_dec = OrtGraph(out_dir / "enc_dec.onnx")
    frames = specs.FRAME_INDEX in [i.name for i in enc_dec.session.get_inputs()]
    one_frame = {specs.FRAME_INDEX: np.zeros(n, np.int64)} if frames else {}
    head_ort = enc_dec(**{
        specs.FPN_FEATURES: feats, specs.TEXT_FEATURES: x[specs.TEXT_FEATURES],
        specs.TEXT_MASK: x[specs.TEXT_MASK], **one_frame})
    for t, o, r in zip(specs.enc_dec_spec(parts.dims).outputs, head_ort, head_ref, strict=True):
        results.append(Agreement(t.name, cosine(o, r.numpy()), float(np.abs(o - r.numpy()).max())))
    if frames:
        results += _check_shared_pass(parts, enc_dec, feats, x)
    if parts.dims.masks:  # the mask head on this sample's own memory and queries
        named = {t.name: r for t, r in zip(spec.outputs[1:], feats_ref[1:], strict=True)}
        named.update({specs.ENCODER_MEMORY: head_ref[3], specs.TEXT_FEATURES:
                      x[specs.TEXT_FEATURES], specs.TEXT_MASK: x[specs.TEXT_MASK],
                      specs.KEPT_QUERIES: head_ref[4][:, :3]})
        inputs = mask_decoder_example(parts, inputs=named)
        ref = parts.mask_head(*inputs).numpy()
        mask_spec = specs.mask_decoder_spec(parts.dims)
        (got,) = OrtGraph(out_dir / f"{specs.MASK_DECODER}.onnx")(**{
            t.name: v.numpy() for t, v in zip(mask_spec.inputs, inputs, strict=True)})
        results.append(Agreement(specs.MASK_LOGITS, cosine(got, ref),
                                 float(np.abs(got - ref).max())))
    return results


def _check_shared_pass(parts: Sam3Parts, enc_dec: OrtGraph, feats: np.ndarray,
                       x: dict[str, np.ndarray]) -> list[Agreement]:
    """A shared pass in ONNX Runtime (two frames, rows alternating between them) against
    PyTorch decoding each frame's rows alone."""
    other = parts.backbone(torch.from_numpy(
        sample_inputs(parts, 1, seed=2)[specs.PIXEL_VALUES]))[0].numpy()
    text, mask = x[specs.TEXT_FEATURES], x[specs.TEXT_MASK]
    index = np.arange(len(text), dtype=np.int64) % 2
    got = enc_dec(**{specs.FPN_FEATURES: np.concatenate([feats, other]),
                     specs.TEXT_FEATURES: text, specs.TEXT_MASK: mask,
                     specs.FRAME_INDEX: index})
    results = []
    for k, frame in enumerate((feats, other)):
        rows = index == k
        if not rows.any():  # one prompt: nothing of the second frame to compare
            continue
        ref = parts.head(torch.from_numpy(frame), torch.from_numpy(text[rows]),
                         torch.from_numpy(mask[rows]))
        for t, o, r in zip(specs.enc_dec_spec(parts.dims).outputs, got, ref, strict=True):
            results.append(Agreement(f"{t.name}[shared, frame {k}]", cosine(o[rows], r.numpy()),
                                     float(np.abs(o[rows] - r.numpy()).max())))
    return results


def export_graphs(checkpoint: str | Path, output: str | Path, imgsz: int | None = None,
                  max_classes: int = specs.DEFAULT_MAX_CLASSES, masks: bool = False,
                  check: bool = True, log=print,
                  backbone: str = "vit", max_batch: int = 1,
                  shared_passes: bool = False) -> tuple[dict, list[Agreement]]:
    """Export both graphs and write `dart_graphs.json` (the dims every later step reads).

    `backbone` picks the module behind the backbone graph (`dart_triton.backbones.choice`);
    `max_batch` > 1 exports it with a dynamic frame count (one frame, fixed, otherwise);
    `shared_passes` exports enc_dec for passes over several frames (`specs.FRAME_INDEX`)."""
    from dart_triton.backbones.choice import BackboneChoice, with_backbone
    from dart_triton.export.conv_gelu import separate_conv_gelu

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    choice = BackboneChoice.parse(backbone)
    parts = with_backbone(load_parts(checkpoint, imgsz, max_classes, masks), choice)
    dynamic = max_batch > 1
    log(f"exporting backbone {choice} ({parts.dims.imgsz}px, "
        f"{'1..N frames' if dynamic else 'one frame'}) ...")
    bb = export_backbone(parts, out, dynamic)
    if choice.kind == "student":
        separate_conv_gelu(bb)  # TensorRT 10 has no FP16 Conv+GELU kernel (export.conv_gelu)
    fused = fused_attention_nodes(bb)
    if fused:
        raise RuntimeError(f"backbone graph contains fused attention nodes: {fused[:3]}")
    log(f"exporting enc_dec (N = 1..{max_classes}) ...")
    export_enc_dec(parts, out, shared_passes)
    if masks:
        log("exporting mask_decoder (P prompts x J kept queries) ...")
        export_mask_decoder(parts, out)
    d = parts.dims
    meta = {"dims": asdict(d),  # read back by read_graphs_meta
            # derived from dims.scale_factors; recorded for people reading the file
            "detection_level": {"index": d.detection_level, "scale": d.detection_scale,
                                "stride": d.detection_stride, "feat_hw": d.feat_hw},
            "checkpoint": str(Path(checkpoint).resolve()), "opset": OPSET,
            "backbone": choice.describe(),
            "backbone_frames": DYNAMIC_FRAMES if dynamic else 1,
            "enc_dec_frames": DYNAMIC_FRAMES if shared_passes else 1,
            "torch": torch.__version__}
    agreements = check_graphs(parts, out, min(3, max_classes), dynamic) if check else []
    meta["check"] = [asdict(a) for a in agreements]
    (out / GRAPHS_JSON).write_text(json.dumps(meta, indent=2))
    return meta, agreements


def read_graphs_meta(onnx_dir: str | Path) -> specs.GraphDims:
    meta = json.loads((Path(onnx_dir) / GRAPHS_JSON).read_text())
    return specs.GraphDims.from_dict(meta["dims"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dart-triton export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="local facebook/sam3-layout directory")
    p.add_argument("--output", required=True, help="directory for backbone.onnx, enc_dec.onnx")
    p.add_argument("--imgsz", type=int, default=None,
                   help="input resolution, a multiple of 14 (default: the checkpoint's, 1008)")
    p.add_argument("--max-classes", type=int, default=specs.DEFAULT_MAX_CLASSES,
                   help="largest prompt count N decoded in one enc_dec pass")
    p.add_argument("--masks", action="store_true",
                   help="also export mask_decoder.onnx (masks on demand); backbone then also "
                        "returns the finer FPN levels and enc_dec what the mask head reads")
    p.add_argument("--skip-check", action="store_true", help="do not compare with PyTorch")
    p.add_argument("--backbone", default="vit", metavar="{vit|pruned:PLAN.json:K|student:DIR}",
                   help="the module behind backbone.onnx (default: SAM3's ViT)")
    p.add_argument("--max-batch", type=int, default=1, metavar="B",
                   help="B > 1: backbone.onnx takes any number of frames (for `build "
                        "--max-batch`); default 1: one frame, fixed")
    args = p.parse_args(argv)
    try:
        _, agreements = export_graphs(args.checkpoint, args.output, args.imgsz, args.max_classes,
                                      args.masks, check=not args.skip_check,
                                      backbone=args.backbone, max_batch=args.max_batch)
    except (CheckpointError, ValueError) as exc:
        print(f"dart-triton export: error: {exc}", file=sys.stderr)
        return 2
    for a in agreements:
        flag = "ok" if a.ok else f"FAIL (cosine < {MIN_COSINE})"
        print(f"  {a.tensor:<18} cosine {a.cosine:.7f}  max-abs {a.max_abs:.2e}  {flag}")
    if not all(a.ok for a in agreements):
        print("dart-triton export: ONNX Runtime disagrees with PyTorch", file=sys.stderr)
        return 1
    print(f"wrote {args.output}/backbone.onnx and enc_dec.onnx"
          + (" and mask_decoder.onnx" if args.masks else ""))
    return 0
