"""Keep TensorRT from fusing a Conv with the GELU after it (student backbones).

TensorRT 10 fuses Conv + GELU into one kernel, and has no FP16 implementation of that
fusion: an FP16 build of a graph with the pattern (RepViT's and TinyViT's conv MLPs, for
instance) fails. The authors' fix, used here: an Identity node between the Conv and its
consumers, which TensorRT does not fuse across. ONNX Runtime and the other backends
drop the Identity, so the graph computes the same.

GELU is matched as the ``Gelu`` op (opset 20) or, as the opset-18 exporter writes it, an
``Erf`` fed by ``x / sqrt(2)`` (``Div``) or ``x * (1 / sqrt(2))`` (``Mul``).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper


def feeds_gelu(tensor: str, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    for node in consumers.get(tensor, []):
        if node.op_type == "Gelu":
            return True
        if node.op_type in ("Div", "Mul") and any(
                nxt.op_type == "Erf" for out in node.output for nxt in consumers.get(out, [])):
            return True
    return False


def separate_conv_gelu(path: str | Path) -> int:
    """Insert an Identity after every Conv whose output feeds a GELU; returns how many.

    The graph is rewritten in place (its weights stay where they are)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes, count = [], 0
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Conv" or not feeds_gelu(node.output[0], consumers):
            continue
        conv_out = node.output[0]
        separated = f"{conv_out}_before_gelu"
        nodes.append(helper.make_node("Identity", [conv_out], [separated],
                                      name=f"{node.name or conv_out}_no_gelu_fusion"))
        for user in consumers[conv_out]:
            for i, name in enumerate(user.input):
                if name == conv_out:
                    user.input[i] = separated
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))
    return count
