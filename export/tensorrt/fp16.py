"""FP32 ONNX graph -> the FP16 graph a strongly typed TensorRT network is built from.

TensorRT 11 has no weak typing (``BuilderFlag.FP16`` is gone): a network computes in the
types its ONNX graph states, so "FP16" has to be decided in the graph. NVIDIA's tool for
this is ModelOpt AutoCast; this pass does the same job for the two DART graphs with a
rule set written for them, and its result is checked on a CPU (:func:`compare_with_fp32`:
ONNX Runtime, and ONNX's reference evaluator for FP16 arithmetic as written).

What the pass does:

* **Attention in the form TensorRT fuses.** For every ``MatMul -> Mul|Div(scalar) ->
  [Add mask] -> Softmax`` the scale is moved onto Q before the first matmul (TensorRT's
  fused-attention rules: the scale must come before the first batched matmul). The core
  then stays FP16 ``MatMul -> Softmax -> MatMul`` with no casts inside: the pattern
  TensorRT replaces by one attention kernel that accumulates internally in FP32 (paper
  §3.3). Casting around the Softmax would keep it FP32 but stops that fusion (reported
  elsewhere as 0 fused attention nodes), and the two matmuls then run as generic FP16
  GEMMs, the failure of paper §3.3. ``fp32_attention=True`` keeps the whole core in
  FP32 instead: correct without a fused kernel, and slower; a fallback for a plan that
  fails verification.
* **Constant subgraphs FP32.** What depends on no graph input (the prompt-independent
  start of the decoder: the learned queries' first self-attention, their position
  encodings and box bias) is computed once, when TensorRT folds constants at build
  time, so FP32 there costs nothing at run time; in FP16 it cost the tiny test model
  3x its box error.
* **FP32 islands** where FP16's range or resolution is not enough: normalisations
  (LayerNorm's mean and variance over the channels), reductions, exponentials,
  logarithms, powers and roots, the sine/cosine of the decoder's box position
  encodings, and index-like ops (Range, CumSum, TopK, Resize). Each island is entered
  and left through Cast nodes.
* **Everything else FP16**, weights included (saturated at ±65504; values outside FP16's
  range are counted in the report). Graph inputs and outputs stay FP32, so the Triton
  contract of ``dart_triton.contract.specs`` holds for both precisions.

``python -m dart_triton.export.tensorrt.fp16 IN.onnx OUT.onnx [--fp32-attention]`` runs the pass
by hand (the step before ``trtexec --stronglyTyped`` on TensorRT 11).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dart_triton.export.tensorrt.onnx_graph import (
    attention_blocks,
    constant_outputs,
    consumers_of,
    fold_attention_scales,
    unique_name,
)

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
# Bumped whenever the rules change: recorded in plan sidecars, so old plans rebuild.
PASS_VERSION = 2
SUFFIX = ".fp16.onnx"
# Graphs whose initializers exceed this go to one external-data file (protobuf's 2 GiB
# limit; the same threshold as the FP32 export).
EXTERNAL_DATA_BYTES = 1 << 30

DEFAULT_FP32_OPS = frozenset({
    # normalisation statistics and reductions
    "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "BatchNormalization", "LpNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare",
    "ReduceL2", "ReduceLogSumExp",
    # range-hungry elementwise math (box position encodings, inverse sigmoid)
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Sin", "Cos", "Atan",
    # index-like ops
    "Range", "CumSum", "TopK", "Resize", "Upsample", "NonMaxSuppression", "RoiAlign",
})
# Ops that take a tensor of any type: their inputs are never cast.
_ANY_INPUT_OPS = frozenset({"Shape", "Size", "Cast"})
# (op, input index) that the ONNX spec types as float32 whatever the node computes in.
_FLOAT32_INPUTS = frozenset({("Resize", 2), ("Upsample", 1)})


@dataclass(frozen=True)
class Fp16Policy:
    fp32_ops: frozenset[str] = DEFAULT_FP32_OPS
    fp32_nodes: frozenset[str] = frozenset()  # node names kept FP32 in addition
    fp32_attention: bool = False  # keep every attention core FP32 (no fused FP16 kernel)
    fold_attention_scales: bool = True  # scale Q before Q·Kᵀ (off: only to show why)

    def record(self) -> dict:
        """What a plan sidecar records about the pass (a change rebuilds the plan)."""
        return {"pass_version": PASS_VERSION, "fp32_attention": self.fp32_attention,
                "fold_attention_scales": self.fold_attention_scales,
                "fp32_ops": sorted(self.fp32_ops), "fp32_nodes": sorted(self.fp32_nodes)}


@dataclass
class Fp16Report:
    attention_blocks: int = 0  # Softmax nodes found
    folded_scales: int = 0  # attention scales moved before Q·Kᵀ
    fp16_nodes: int = 0
    fp32_nodes: int = 0
    casts: int = 0  # Cast nodes inserted
    saturated_values: int = 0  # weight values outside FP16's range
    fp32_op_types: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Fp16ConversionError(ValueError):
    """The graph cannot be converted (unsupported structure)."""


# Types ---------------------------------------------------------------------------------------


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (ONNX type inference; weights need not be loaded)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _to_half(tensor: TensorProto, base_dir: Path | None, report: Fp16Report) -> TensorProto:
    value = numpy_helper.to_array(tensor, str(base_dir) if base_dir else "")
    finite = np.isfinite(value)
    report.saturated_values += int((np.abs(value[finite]) > FP16_MAX).sum())
    half = np.where(finite, np.clip(value, -FP16_MAX, FP16_MAX), value).astype(np.float16)
    return numpy_helper.from_array(half, tensor.name)


# The pass ------------------------------------------------------------------------------------


def convert_model(model: onnx.ModelProto, policy: Fp16Policy = Fp16Policy(),
                  base_dir: Path | None = None) -> tuple[onnx.ModelProto, Fp16Report]:
    """The FP16 graph of ``model`` (modified in place and returned) and what was done.

    ``base_dir`` is where external weights live when ``model`` was loaded without them.
    """
    graph = model.graph
    for n in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in n.attribute):
            raise Fp16ConversionError(f"node {n.name or n.op_type} has a subgraph: the FP16 "
                                      "pass handles flat graphs (the DART exports are)")
    if any(t.data_type == HALF for t in graph.initializer):
        raise Fp16ConversionError("the graph already holds FP16 weights: convert the FP32 "
                                  "export, not an FP16 graph")
    report = Fp16Report()
    blocks = attention_blocks(graph)
    report.attention_blocks = len(blocks)
    core_ids: set[int] = set()  # nodes of the attention cores kept FP32
    if policy.fp32_attention:
        for b in blocks:
            core_ids.update(id(n) for n in (b.softmax, b.qk, b.scale, b.mask, *b.pv)
                            if n is not None)
    elif policy.fold_attention_scales:
        report.folded_scales = fold_attention_scales(graph)
    types = _elem_types(model)

    nodes = list(graph.node)
    constant = constant_outputs(graph)

    def is_fp32(node: onnx.NodeProto) -> bool:
        return (node.op_type in policy.fp32_ops or node.name in policy.fp32_nodes
                or id(node) in core_ids or any(o in constant for o in node.output))

    consumers = consumers_of(nodes)
    const_nodes = {n.output[0]: n for n in nodes if n.op_type == "Constant"}

    def wanted(node: onnx.NodeProto, index: int) -> int | None:
        """The float type input `index` of `node` must have (None: any)."""
        if node.op_type in _ANY_INPUT_OPS:
            return None
        if (node.op_type, index) in _FLOAT32_INPUTS:
            return FLOAT
        return FLOAT if is_fp32(node) else HALF

    # Constants (initializers, Constant nodes) take the type their readers want; a
    # constant read in both precisions keeps FP32 and gets an FP16 copy.
    inits = {t.name: t for t in graph.initializer}
    half_copy: dict[str, str] = {}
    taken = set(inits) | {o for n in nodes for o in n.output} | {v.name for v in graph.input}
    new_inits: list[TensorProto] = []
    for name, tensor in inits.items():
        if tensor.data_type != FLOAT:
            new_inits.append(tensor)
            continue
        wants = {wanted(c, i) for c in consumers.get(name, [])
                 for i, x in enumerate(c.input) if x == name} - {None}
        if wants == {HALF}:
            new_inits.append(_to_half(tensor, base_dir, report))
        else:
            new_inits.append(tensor)
            if HALF in wants:
                copy = _to_half(tensor, base_dir, report)
                copy.name = half_copy[name] = unique_name(taken, f"{name}/fp16")
                new_inits.append(copy)
    for name, node in const_nodes.items():
        if types.get(name) != FLOAT:
            continue
        wants = {wanted(c, i) for c in consumers.get(name, [])
                 for i, x in enumerate(c.input) if x == name} - {None}
        if wants == {HALF}:
            attr = next(a for a in node.attribute if a.name == "value")
            attr.t.CopyFrom(_to_half(attr.t, None, report))
            types[name] = HALF

    # What each float tensor is once converted: graph inputs stay FP32, constants as
    # decided above, node outputs follow their node's precision.
    have: dict[str, int] = {}
    for v in graph.input:
        if types.get(v.name) == FLOAT:
            have[v.name] = FLOAT
    for t in new_inits:
        if t.data_type in (FLOAT, HALF):
            have[t.name] = t.data_type

    out: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def cast_to(name: str, to: int) -> str:
        if name in half_copy and to == HALF:
            return half_copy[name]
        key = (name, to)
        if key not in casts:
            casts[key] = unique_name(taken, f"{name}/to_{'fp16' if to == HALF else 'fp32'}")
            out.append(helper.make_node("Cast", [name], [casts[key]], to=to,
                                        name=unique_name(taken, f"{casts[key]}/cast")))
            report.casts += 1
        return casts[key]

    for node in nodes:
        if node.op_type == "Constant":
            out.append(node)
            if node.output[0] in have or types.get(node.output[0]) in (FLOAT, HALF):
                have[node.output[0]] = types.get(node.output[0])
            continue
        fp32 = is_fp32(node)
        if fp32:
            report.fp32_nodes += 1
            report.fp32_op_types[node.op_type] = report.fp32_op_types.get(node.op_type, 0) + 1
        else:
            report.fp16_nodes += 1
        for i, name in enumerate(node.input):
            want = wanted(node, i)
            if not name or want is None or have.get(name) in (None, want):
                continue
            node.input[i] = cast_to(name, want)
        own = FLOAT if fp32 else HALF
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == FLOAT and not fp32:
                to.i = HALF
        elif node.op_type == "ConstantOfShape":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and attr.t.data_type == FLOAT and not fp32:
                attr.t.CopyFrom(_to_half(attr.t, None, report))
        out.append(node)
        for o in node.output:
            if types.get(o) == FLOAT:
                have[o] = own

    # Graph outputs keep their FP32 type: the last FP16 producer hands over through a Cast.
    renames = {}
    for v in graph.output:
        if have.get(v.name) == HALF:
            renames[v.name] = unique_name(taken, f"{v.name}/fp16")
    for n in out:
        for i, name in enumerate(n.output):
            if name in renames:
                n.output[i] = renames[name]
        for i, name in enumerate(n.input):
            if name in renames:
                n.input[i] = renames[name]
    for original, half in renames.items():
        out.append(helper.make_node("Cast", [half], [original], to=FLOAT,
                                    name=unique_name(taken, f"{original}/to_fp32/cast")))
        report.casts += 1

    del graph.node[:]
    graph.node.extend(out)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    del graph.value_info[:]  # stale types; consumers re-infer
    return model, report


def convert_file(src: str | Path, dst: str | Path, policy: Fp16Policy = Fp16Policy(),
                 log: Callable[[str], None] | None = None) -> Fp16Report:
    """Convert ``src`` (weights beside it are read) into ``dst`` and check the result."""
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    try:
        model, report = convert_model(model, policy, base_dir=src.parent)
    except onnx.shape_inference.InferenceError as e:
        raise Fp16ConversionError(f"{src.name}: ONNX type inference failed: "
                                  f"{' '.join(str(e).split())}") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst.name + ".data"
    (dst.parent / data_name).unlink(missing_ok=True)
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(dst), save_as_external_data=large,
                    all_tensors_to_one_file=True, location=data_name)
    # Types must line up everywhere (a missed cast fails here, not in the builder).
    try:
        onnx.checker.check_model(str(dst))
        onnx.shape_inference.infer_shapes(onnx.load(str(dst), load_external_data=False),
                                          check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise Fp16ConversionError(f"the FP16 graph of {src.name} is invalid: "
                                  f"{' '.join(str(e).split())}") from None
    if log:
        log(f"fp16 graph {dst.name}: {report.fp16_nodes} FP16 / {report.fp32_nodes} FP32 "
            f"nodes, {report.attention_blocks} attention blocks "
            f"({report.folded_scales} scales folded), {report.casts} casts")
    return report


def fp16_path(onnx_path: str | Path) -> Path:
    """Where the FP16 graph of ``X.onnx`` is written: ``X.fp16.onnx`` beside it."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + SUFFIX)


RUNTIMES = ("onnxruntime", "onnx-reference")


def compare_with_fp32(fp32_graph: str | Path, fp16_graph: str | Path,
                      inputs: Mapping[str, np.ndarray],
                      runtime: str = "onnxruntime") -> dict[str, dict[str, float]]:
    """Cosine and max |diff| per output of the FP16 graph against the FP32 graph (which
    always runs in ONNX Runtime on the CPU).

    ``onnxruntime``: ONNX Runtime's CPU kernels. On x86 most of them have no FP16 version,
    so ONNX Runtime computes those ops in FP32 between inserted casts (and drops cast pairs
    it finds redundant): FP16 weights and storage, mostly FP32 arithmetic.
    ``onnx-reference``: ONNX's reference evaluator (numpy), every op in the type the graph
    states: FP16 arithmetic as written, overflow included. Pessimistic against TensorRT's
    fused kernels (they accumulate in FP32), and slow: for the tiny CI graphs.
    """
    import onnxruntime as ort

    from dart_triton.export.tensorrt.verify import cosine, max_abs

    def feed(names: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = set(names)
        return {k: v for k, v in inputs.items() if k in wanted}

    session = ort.InferenceSession(str(fp32_graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ref = dict(zip(names, session.run(names, feed(i.name for i in session.get_inputs())),
                   strict=True))
    if runtime == "onnxruntime":
        half = ort.InferenceSession(str(fp16_graph), providers=["CPUExecutionProvider"])
        got = half.run(names, feed(i.name for i in half.get_inputs()))
    elif runtime == "onnx-reference":
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(fp16_graph))
        with np.errstate(over="ignore", invalid="ignore"):  # overflow shows in the figures
            got = evaluator.run(names, feed(evaluator.input_names))
    else:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    return {k: {"cosine": cosine(ref[k], g), "max_abs": max_abs(ref[k], g)}
            for k, g in zip(names, got, strict=True)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dart_triton.export.tensorrt.fp16",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="FP32 graph (backbone.onnx or enc_dec.onnx)")
    ap.add_argument("dst", type=Path, nargs="?", help="output (default: SRC as X.fp16.onnx)")
    ap.add_argument("--fp32-attention", action="store_true",
                    help="keep the attention cores FP32 (no fused FP16 attention)")
    args = ap.parse_args(argv)
    try:
        convert_file(args.src, args.dst or fp16_path(args.src),
                     Fp16Policy(fp32_attention=args.fp32_attention), log=print)
    except (OSError, ValueError) as e:
        print(f"fp16: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
