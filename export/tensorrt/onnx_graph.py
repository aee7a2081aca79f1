"""ONNX graph bookkeeping for the FP16 pass: producers, consumers, scalar constants, and
the attention pattern (``MatMul -> Mul|Div(scalar) -> [Add mask] -> Softmax -> MatMul``)
with the rewrite that puts its scale before the first matmul, as TensorRT fuses it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
# Scale ops folded onto Q (a scalar Mul or Div between Q·Kᵀ and the softmax).
SCALE_OPS = ("Mul", "Div")

# Graph bookkeeping ------------------------------------------------------------------------


def consumers_of(nodes: Iterable[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        for name in n.input:
            if name:
                found[name].append(n)
    return found


def producers_of(nodes: Iterable[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    return {o: n for n in nodes for o in n.output if o}


def scalar_constant(name: str, inits: Mapping[str, TensorProto],
                     producers: Mapping[str, onnx.NodeProto]) -> float | None:
    """The value of a one-element float constant (initializer or Constant node), else None."""
    tensor = inits.get(name)
    node = producers.get(name)
    if tensor is None and node is not None and node.op_type == "Constant":
        attr = next((a for a in node.attribute if a.name == "value"), None)
        tensor = attr.t if attr is not None else None
    if tensor is None or tensor.data_type != FLOAT:
        return None
    value = numpy_helper.to_array(tensor)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def unique_name(taken: set[str], base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


# Attention ---------------------------------------------------------------------------------


@dataclass
class Attention:
    softmax: onnx.NodeProto
    qk: onnx.NodeProto | None  # Q·Kᵀ MatMul
    scale: onnx.NodeProto | None  # Mul / Div by a scalar between Q·Kᵀ and the softmax
    mask: onnx.NodeProto | None  # Add of a mask between the scale and the softmax
    pv: list[onnx.NodeProto]  # the MatMul(s) reading the probabilities


def attention_blocks(graph: onnx.GraphProto) -> list[Attention]:
    producers, consumers = producers_of(graph.node), consumers_of(graph.node)
    inits = {t.name: t for t in graph.initializer}
    blocks = []
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        def scores(name: str) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
            """(Q·Kᵀ MatMul, scale) when `name` is the (scaled) scores, else (None, None)."""
            node = producers.get(name)
            if node is not None and node.op_type == "MatMul":
                return node, None
            if (node is not None and node.op_type in SCALE_OPS
                    and scalar_constant(node.input[1], inits, producers) is not None):
                qk = producers.get(node.input[0])
                if qk is not None and qk.op_type == "MatMul":
                    return qk, node
            return None, None

        mask = None
        qk, scale = scores(sm.input[0])
        add = producers.get(sm.input[0])
        if qk is None and add is not None and add.op_type == "Add":
            for name in add.input:
                qk, scale = scores(name)
                if qk is not None:
                    mask = add
                    break
        pv = [c for c in consumers.get(sm.output[0], []) if c.op_type == "MatMul"]
        blocks.append(Attention(sm, qk, scale, mask, pv))
    return blocks


def fold_attention_scales(graph: onnx.GraphProto) -> int:
    """``(Q·Kᵀ)·s`` -> ``(Q·s)·Kᵀ`` wherever the scale is a scalar constant that only the
    scores read; returns how many were folded. Same function, and the order TensorRT's
    fused attention requires (an FP16 Q·Kᵀ before the scale can also overflow)."""
    consumers, producers = consumers_of(graph.node), producers_of(graph.node)
    inits = {t.name: t for t in graph.initializer}
    taken = {o for n in graph.node for o in n.output} | set(inits) | {
        v.name for v in graph.input}
    folded, removed, inserted = 0, set(), {}
    for block in attention_blocks(graph):
        mm, sc = block.qk, block.scale
        if mm is None or sc is None or len(consumers[mm.output[0]]) != 1:
            continue
        value = scalar_constant(sc.input[1], inits, producers)
        factor = value if sc.op_type == "Mul" else 1.0 / value
        const = unique_name(taken, f"{mm.name or mm.output[0]}/prescale")
        graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), const))
        scaled = unique_name(taken, f"{mm.input[0]}/prescaled")
        inserted[id(mm)] = helper.make_node("Mul", [mm.input[0], const], [scaled],
                                            name=unique_name(taken, f"{mm.name}/prescale_mul"))
        mm.input[0] = scaled
        mm.output[0] = sc.output[0]
        removed.add(id(sc))
        folded += 1
    nodes = []
    for n in graph.node:
        if id(n) in removed:
            continue
        if id(n) in inserted:
            nodes.append(inserted[id(n)])
        nodes.append(n)
    # The scale constants nothing reads any more go too.
    read = {i for n in nodes for i in n.input} | {v.name for v in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in read]
    unused = [t for t in graph.initializer if t.name not in read]
    for t in unused:
        graph.initializer.remove(t)
    del graph.node[:]
    graph.node.extend(nodes)
    return folded




def constant_outputs(graph: onnx.GraphProto) -> set[str]:
    """The tensors computed from weights alone (no graph input reaches them), other than
    Constant nodes' own: what TensorRT folds into constants when it builds."""
    varying = {i.name for i in graph.input}
    constant: set[str] = set()
    for node in graph.node:  # topologically sorted, as ONNX requires
        if node.op_type == "Shape" or any(i in varying for i in node.input if i):
            varying.update(node.output)
        elif node.op_type != "Constant":
            constant.update(node.output)
    return constant
