"""Tiny ONNX graphs with the real tensor names, and a stand-in GPU description: what the
TensorRT path is exercised with on a CPU (with `tests.fakes.tensorrt`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dart_triton.contract import specs

FAKE_GPU = {"gpu_name": "Fake GPU", "compute_capability": "8.9"}

# Tiny graphs: the real I/O names, small sizes (imgsz 56 -> 4x4 features).
TINY = specs.GraphDims(imgsz=56, fpn_dim=8, text_len=6, text_dim=8, num_queries=5,
                       max_classes=16)


def tiny_backbone(path: Path, d: specs.GraphDims = TINY, mask_levels: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (d.fpn_dim, 3, specs.PATCH_SIZE, specs.PATCH_SIZE))
    nodes = [helper.make_node("Conv", [specs.PIXEL_VALUES, "w"], [specs.FPN_FEATURES],
                              strides=[specs.PATCH_SIZE] * 2)]
    h = d.feat_hw
    outputs = [helper.make_tensor_value_info(specs.FPN_FEATURES, TensorProto.FLOAT,
                                             [1, d.fpn_dim, h, h])]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    if mask_levels:
        for name, k in ((specs.FPN_FEATURES_4X, 4), (specs.FPN_FEATURES_2X, 2)):
            scales = numpy_helper.from_array(np.array([1, 1, k, k], np.float32), f"s{k}")
            inits.append(scales)
            nodes.append(helper.make_node("Resize", [specs.FPN_FEATURES, "", f"s{k}"], [name],
                                          mode="nearest"))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         [1, d.fpn_dim, k * h, k * h]))
    graph = helper.make_graph(
        nodes, "tiny_backbone",
        [helper.make_tensor_value_info(specs.PIXEL_VALUES, TensorProto.FLOAT,
                                       [1, 3, d.imgsz, d.imgsz])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_enc_dec(path: Path, d: specs.GraphDims = TINY, fixed_n: int | None = None,
                  symbolic_q: bool = False) -> Path:
    """Masked-mean text x pooled image -> boxes/logits/presence, N dynamic ("N").

    ``symbolic_q`` leaves the query dimension of the outputs symbolic, as torch's exporter
    does for the real graph."""
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
    nodes = [
        mk("ReduceMean", [specs.FPN_FEATURES], ["img4"], axes=[2, 3], keepdims=0),
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
        [vi(specs.FPN_FEATURES, TensorProto.FLOAT, [1, c, h, h]),
         vi(specs.TEXT_FEATURES, TensorProto.FLOAT, [n, d.text_len, td]),
         vi(specs.TEXT_MASK, TensorProto.INT32, [n, d.text_len])],
        [vi(specs.PRED_BOXES, TensorProto.FLOAT, [n, qd, 4]),
         vi(specs.PRED_LOGITS, TensorProto.FLOAT, [n, qd]),
         vi(specs.PRESENCE_LOGITS, TensorProto.FLOAT, [n, one])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
