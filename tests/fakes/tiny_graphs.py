"""Tiny ONNX graphs with the real tensor names, and a stand-in GPU description: what the
TensorRT path is exercised with on a CPU (with `tests.fakes.tensorrt`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from dart_triton.contract import specs

FAKE_GPU = {"gpu_name": "Fake GPU", "compute_capability": "8.9"}

# Tiny graphs: the real I/O names, small sizes (imgsz 56 -> 4x4 features).
TINY = specs.GraphDims(imgsz=56, fpn_dim=8, text_len=6, text_dim=8, num_queries=5,
                       max_classes=16)


def tiny_backbone(path: Path, d: specs.GraphDims = TINY, mask_levels: bool = False,
                  frames: int | str = 1) -> Path:
    """A patchify Conv (frames independent, as the real backbone's); ``frames`` "frames":
    any number per call, as `export --max-batch` exports it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (d.fpn_dim, 3, specs.PATCH_SIZE, specs.PATCH_SIZE))
    nodes = [helper.make_node("Conv", [specs.PIXEL_VALUES, "w"], [specs.FPN_FEATURES],
                              strides=[specs.PATCH_SIZE] * 2)]
    h = d.feat_hw
    outputs = [helper.make_tensor_value_info(specs.FPN_FEATURES, TensorProto.FLOAT,
                                             [frames, d.fpn_dim, h, h])]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    if mask_levels:
        for name, k in ((specs.FPN_FEATURES_4X, 4), (specs.FPN_FEATURES_2X, 2)):
            scales = numpy_helper.from_array(np.array([1, 1, k, k], np.float32), f"s{k}")
            inits.append(scales)
            nodes.append(helper.make_node("Resize", [specs.FPN_FEATURES, "", f"s{k}"], [name],
                                          mode="nearest"))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         [frames, d.fpn_dim, k * h, k * h]))
    graph = helper.make_graph(
        nodes, "tiny_backbone",
        [helper.make_tensor_value_info(specs.PIXEL_VALUES, TensorProto.FLOAT,
                                       [frames, 3, d.imgsz, d.imgsz])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_enc_dec(path: Path, d: specs.GraphDims = TINY, fixed_n: int | None = None,
                  symbolic_q: bool = False, masks: bool = False, frames: bool = False) -> Path:
    """Masked-mean text x pooled image -> boxes/logits/presence, N dynamic ("N").

    ``symbolic_q`` leaves the query dimension of the outputs symbolic, as torch's exporter
    does for the real graph. ``masks``: also the encoder memory (image tokens plus a text
    term) and decoder queries the mask head reads, as `--masks` exports it. ``frames``:
    the graph of shared passes: F frames, each row pooled from its FRAME_INDEX frame."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    q, c, td = d.num_queries, d.fpn_dim, d.text_dim
    w = {
        "wq": rng.normal(0, 0.5, (td, q)), "wi": rng.normal(0, 0.5, (c, q)),
        "wb": rng.normal(0, 0.5, (td, 4 * q)), "wbi": rng.normal(0, 0.5, (c, 4 * q)),
        "wp": rng.normal(0, 0.5, (td, 1)), "wpi": rng.normal(0, 0.5, (c, 1)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "ax1"),
              numpy_helper.from_array(np.array([2], np.int64), "ax2"),
              numpy_helper.from_array(np.array([1.0], np.float32), "one"),
              numpy_helper.from_array(np.array([-1, q, 4], np.int64), "bshape")]
    mk = helper.make_node
    pooled = [mk("ReduceMean", [specs.FPN_FEATURES], ["imgF"], axes=[2, 3], keepdims=0),
              mk("Gather", ["imgF", specs.FRAME_INDEX], ["img4"], axis=0)] if frames else [
        mk("ReduceMean", [specs.FPN_FEATURES], ["img4"], axes=[2, 3], keepdims=0)]
    nodes = [
        *pooled,
        mk("Cast", [specs.TEXT_MASK], ["m"], to=TensorProto.FLOAT),
        mk("Unsqueeze", ["m", "ax2"], ["m3"]),
        mk("Mul", [specs.TEXT_FEATURES, "m3"], ["tm"]),
        mk("ReduceSum", ["tm", "ax1"], ["ts"], keepdims=0),
        mk("ReduceSum", ["m", "ax1"], ["cnt"], keepdims=1),
        mk("Max", ["cnt", "one"], ["cnt1"]),
        mk("Div", ["ts", "cnt1"], ["t"]),
        mk("MatMul", ["t", "wq"], ["lq"]), mk("MatMul", ["img4", "wi"], ["li"]),
        mk("Add", ["lq", "li"], [specs.PRED_LOGITS]),
        mk("MatMul", ["t", "wb"], ["bq"]), mk("MatMul", ["img4", "wbi"], ["bi"]),
        mk("Add", ["bq", "bi"], ["bsum"]), mk("Sigmoid", ["bsum"], ["bsig"]),
        mk("Reshape", ["bsig", "bshape"], [specs.PRED_BOXES]),
        mk("MatMul", ["t", "wp"], ["pq"]), mk("MatMul", ["img4", "wpi"], ["pi"]),
        mk("Add", ["pq", "pi"], [specs.PRESENCE_LOGITS]),
    ]
    n = "N" if fixed_n is None else fixed_n
    qd, one = ("Q", "P") if symbolic_q else (q, 1)
    h = d.feat_hw
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "tiny_enc_dec",
        [vi(specs.FPN_FEATURES, TensorProto.FLOAT, ["F" if frames else 1, c, h, h]),
         vi(specs.TEXT_FEATURES, TensorProto.FLOAT, [n, d.text_len, td]),
         vi(specs.TEXT_MASK, TensorProto.INT32, [n, d.text_len]),
         *([vi(specs.FRAME_INDEX, TensorProto.INT64, [n])] if frames else [])],
        [vi(specs.PRED_BOXES, TensorProto.FLOAT, [n, qd, 4]),
         vi(specs.PRED_LOGITS, TensorProto.FLOAT, [n, qd]),
         vi(specs.PRESENCE_LOGITS, TensorProto.FLOAT, [n, one])],
        inits)
    if masks:
        _add_mask_outputs(graph, d, n, qd)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _add_mask_outputs(graph, d: specs.GraphDims, n: int | str, q: int | str) -> None:
    """enc_dec's `--masks` outputs: the image tokens plus a text term per prompt (encoder
    memory [N, h*w, C]), and text-projected queries plus the pooled image ([N, Q, C])."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    c, h = d.fpn_dim, d.feat_hw
    graph.initializer.extend([
        numpy_helper.from_array(rng.normal(0, 0.5, (d.text_dim, c)).astype(np.float32), "wm"),
        numpy_helper.from_array(rng.normal(0, 0.5, (d.text_dim, d.num_queries * c))
                                .astype(np.float32), "wdq"),
        numpy_helper.from_array(np.array([1, c, h * h], np.int64), "tokens_shape"),
        numpy_helper.from_array(np.array([-1, d.num_queries, c], np.int64), "dq_shape"),
    ])
    mk = helper.make_node
    graph.node.extend([
        mk("Reshape", [specs.FPN_FEATURES, "tokens_shape"], ["tokens_ct"]),
        mk("Transpose", ["tokens_ct"], ["tokens"], perm=[0, 2, 1]),
        mk("MatMul", ["t", "wm"], ["tmem"]), mk("Unsqueeze", ["tmem", "ax1"], ["tmem3"]),
        mk("Add", ["tokens", "tmem3"], [specs.ENCODER_MEMORY]),
        mk("MatMul", ["t", "wdq"], ["dq"]), mk("Reshape", ["dq", "dq_shape"], ["dq3"]),
        mk("Unsqueeze", ["img4", "ax1"], ["img3"]),
        mk("Add", ["dq3", "img3"], [specs.DECODER_QUERIES]),
    ])
    vi = helper.make_tensor_value_info
    graph.output.extend([vi(specs.ENCODER_MEMORY, TensorProto.FLOAT, [n, h * h, c]),
                         vi(specs.DECODER_QUERIES, TensorProto.FLOAT, [n, q, c])])


def tiny_mask_decoder(path: Path, d: specs.GraphDims = TINY, fixed_j: int | None = None) -> Path:
    """The mask head's I/O (`specs.mask_decoder_spec`): the finer levels brought to the
    mask side and summed, plus a per-prompt term (mean encoder memory and projected
    masked-mean text) -> a pixel embedding per prompt, dotted with each kept query.
    P and J dynamic ("P", "J"; ``fixed_j`` fixes J, as a wrong export would)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = specs.mask_decoder_spec(replace(d, masks=True))
    c, m = d.fpn_dim, replace(d, masks=True).mask_hw
    levels = spec.inputs[:-4]
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (d.text_dim, c)).astype(np.float32),
                                     "wt"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "ax23"),
             numpy_helper.from_array(np.array([1.0], np.float32), "one"),
             numpy_helper.from_array(np.array([0, c, m * m], np.int64), "pix_shape"),
             numpy_helper.from_array(np.array([0, 0, m, m], np.int64), "mask_shape")]
    mk = helper.make_node
    nodes, summed = [], []
    for t in levels:
        k = m / t.dims[-1]
        inits.append(numpy_helper.from_array(np.array([1, 1, k, k], np.float32), f"s_{t.name}"))
        nodes.append(mk("Resize", [t.name, "", f"s_{t.name}"], [f"up_{t.name}"], mode="nearest"))
        summed.append(f"up_{t.name}")
    nodes += [
        mk("Sum", summed, ["pix0"]),
        mk("ReduceMean", [specs.ENCODER_MEMORY], ["mem"], axes=[1], keepdims=0),
        mk("Cast", [specs.TEXT_MASK], ["m"], to=TensorProto.FLOAT),
        mk("Unsqueeze", ["m", "ax2"], ["m3"]),
        mk("Mul", [specs.TEXT_FEATURES, "m3"], ["tm"]),
        mk("ReduceSum", ["tm", "ax1"], ["ts"], keepdims=0),
        mk("ReduceSum", ["m", "ax1"], ["cnt"], keepdims=1),
        mk("Max", ["cnt", "one"], ["cnt1"]), mk("Div", ["ts", "cnt1"], ["t"]),
        mk("MatMul", ["t", "wt"], ["tp"]), mk("Add", ["mem", "tp"], ["prompt"]),
        mk("Unsqueeze", ["prompt", "ax23"], ["prompt4"]),
        mk("Add", ["pix0", "prompt4"], ["pix"]),
        mk("Reshape", ["pix", "pix_shape"], ["pix3"]),
        mk("MatMul", [specs.KEPT_QUERIES, "pix3"], ["dots"]),
        mk("Reshape", ["dots", "mask_shape"], [specs.MASK_LOGITS]),
    ]
    vi = helper.make_tensor_value_info
    types = {"TYPE_FP32": TensorProto.FLOAT, "TYPE_INT32": TensorProto.INT32}
    j = "J" if fixed_j is None else fixed_j

    def shape(dims: tuple[int, ...]) -> list[int | str]:  # the spec's -1s: P, then J
        return [("P" if i == 0 else j) if x == -1 else x for i, x in enumerate(dims)]

    graph = helper.make_graph(
        nodes, "tiny_mask_decoder",
        [vi(t.name, types[t.dtype], shape(t.dims)) for t in spec.inputs],
        [vi(specs.MASK_LOGITS, TensorProto.FLOAT, shape(spec.outputs[0].dims))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_mask_graphs(folder: Path, d: specs.GraphDims = TINY) -> Path:
    """backbone.onnx (with the mask levels), enc_dec.onnx (with the mask outputs) and
    mask_decoder.onnx in `folder`: what `dart-triton export --masks` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_backbone(folder / "backbone.onnx", d, mask_levels=True)
    tiny_enc_dec(folder / "enc_dec.onnx", d, masks=True)
    tiny_mask_decoder(folder / "mask_decoder.onnx", d)
    return folder
