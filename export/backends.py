"""The backend table: how `backbone` and `enc_dec` are served, one entry per backend.

Everything that differs between backends lives in its entry: the config body of the two
graph models, which python models the repository needs, where the models run, and the
artifacts written into the graph models' version directories. Nothing else in the
project branches on a backend's name; a new backend is a new entry here.

  tensorrt    -> platform "tensorrt_plan" (GPU, FP16 plans built from the ONNX graphs)
  onnxruntime -> platform "onnxruntime_onnx" (the NGC image's onnxruntime backend)
  python      -> the python backend running the same ONNX graphs in ONNX Runtime
                 (any Triton, including the python-only one in nvidia-pytriton)
  torch       -> the python backend running the restructured PyTorch modules from
                 safetensors (CPU FP32, or GPU FP16 with torch.compile / CUDA graphs)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dart_triton.backbones.choice import BackboneChoice
from dart_triton.contract import specs
from dart_triton.contract.parameters import OnnxGraphParameters
from dart_triton.contract.passes import batch_buckets
from dart_triton.contract.specs import GraphDims, ModelSpec
from dart_triton.export import pbtxt, torch_weights
from dart_triton.export.options import BuildOptions, RepoOptions, packaged_vocabulary

# The python models every repository has, and the module that implements each.
PYTHON_MODELS: dict[str, str] = {
    specs.PREPROCESS: "dart_triton.triton_models.preprocess_model",
    specs.TEXT_ENCODER: "dart_triton.triton_models.text_encoder_model",
    specs.POSTPROCESS: "dart_triton.triton_models.postprocess_model",
    specs.DART: "dart_triton.triton_models.dart_model",
}


@dataclass(frozen=True)
class Backend:
    name: str
    help: str
    # The runtime line of the graph models' config.pbtxt.
    runtime: str
    # Text after the instance group of a graph model's config (profiles, CUDA graphs, params).
    graph_extras: Callable[[ModelSpec, RepoOptions], str]
    # Writes what the graph models load into `repo/<model>/1/` from the exported graphs.
    write_artifacts: Callable[[Path, Path, BuildOptions, RepoOptions, Callable], None]
    # Graph models served by a python model (model name -> implementing module).
    graph_python_models: dict[str, str] = field(default_factory=dict)
    # Whether the graph models need a GPU whatever `--gpu` says.
    gpu_only: bool = False
    # Optimisation profiles of enc_dec: one per N bucket (TensorRT); otherwise none.
    profiles_per_bucket: bool = False
    # What the graph models serve, written from the checkpoint into a scratch directory
    # (then handed to `write_artifacts`) -> the graph dims. None: the ONNX graphs.
    export: Callable[[Path, Path, BuildOptions, Callable], GraphDims] | None = None
    # The build options this backend's graph models take, checked -> RepoOptions.graph_settings.
    graph_settings: Callable[[BuildOptions], dict[str, object]] = lambda build: {}
    # Whether its enc_dec can batch requests whose prompt counts differ (shared passes with
    # --max-batch): a python model gets a batch as separate requests and packs them itself.
    # Triton's tensorrt_plan and onnxruntime backends concatenate a batch along one axis,
    # which prompt rows of different lengths beside one frame each cannot share.
    shares_passes: bool = False

    def configure(self, opts: RepoOptions) -> RepoOptions:
        """`opts` as this backend serves them: on a GPU whatever `--gpu` said, where the
        backend only runs there."""
        return replace(opts, gpu=True) if self.gpu_only and not opts.gpu else opts

    def repo_options(self, build: BuildOptions, dims: GraphDims) -> RepoOptions:
        """The repository's options for `build` at `dims`."""
        vocab = build.vocabulary or packaged_vocabulary()
        return self.configure(RepoOptions(
            backend=build.backend, dims=dims, instances=dict(build.instances), gpu=build.gpu,
            gpus=build.gpus, enc_dec_buckets=build.buckets, warm_vocabulary=vocab.name,
            ort_threads=build.ort_threads, graph_settings=self.graph_settings(build),
            backbone=BackboneChoice.parse(build.backbone).describe(),
            max_batch=build.max_batch, batch_delay_us=build.batch_delay_us,
            shared_passes=self.shares_passes and build.max_batch > 1))

    def python_models(self, dims: GraphDims | None = None) -> dict[str, str]:
        """Every python model of a repository with this backend at `dims` -> implementing
        module (without `dims`: of any repository, mask_decoder included)."""
        graphs = specs.graph_models(dims) if dims is not None else specs.MASK_GRAPH_MODELS
        return {**PYTHON_MODELS, **{m: module for m, module in self.graph_python_models.items()
                                    if m in graphs}}

    def graph_config(self, spec: ModelSpec, opts: RepoOptions) -> str:
        profiles = None
        if self.profiles_per_bucket and spec.name == specs.ENC_DEC and opts.enc_dec_buckets:
            profiles = [str(i) for i in range(len(opts.enc_dec_buckets))]
        # A batched backbone: the spec's leading 1 becomes Triton's batch dimension, so
        # the one-frame requests of `dart` and the ensemble are batched by Triton (every
        # backend: the graphs' frame dimension is dynamic, `export_backbone`). With shared
        # passes enc_dec too: a request (a frame and its prompts) is one item of the batch.
        batched = opts.max_batch > 1 and (spec.name == specs.BACKBONE or (
            spec.name == specs.ENC_DEC and opts.shared_passes))
        return (pbtxt.header(spec.name, self.runtime, opts.max_batch if batched else 0)
                + pbtxt.io(spec, batched)
                + (pbtxt.dynamic_batching(opts.batch_delay_us) if batched else "")
                + pbtxt.instances(opts.instances[spec.name], opts.gpu, profiles, opts.gpus)
                + self.graph_extras(spec, opts))


# Graph model extras -------------------------------------------------------------------


@dataclass(frozen=True)
class CudaGraphShape:
    """One CUDA graph a TensorRT graph model captures."""

    batch_size: int = 0  # Triton's batch size (0: a model without a batch dimension)
    n: int | None = None  # enc_dec's prompt count (None: no dynamic dimension)
    # The smallest batch the graph also serves (graph_lower_bound; None: only its own).
    lower_batch: int | None = None


def tensorrt_graph_shapes(spec: ModelSpec, opts: RepoOptions) -> list[CudaGraphShape]:
    """Every CUDA graph a TensorRT graph model captures.

    Only shapes every optimisation profile of the model accepts. tensorrt_backend captures
    each `graph_spec` on the execution context of every profile (InitializeCudaGraph loops
    specs x contexts; a GraphSpec has no profile field), and a shape outside a profile
    fails `setInputShape` with two ERROR lines at every load of every instance. With
    buckets 1,4,16 (disjoint profiles) no N fits all three, so the multi-bucket enc_dec
    has no CUDA graphs: the ERROR lines would teach operators to ignore real errors,
    while TensorRT's few fused kernels per enc_dec pass leave little launch overhead for
    a graph to save. The backbone (one profile) and a one-bucket enc_dec (one profile
    ending at its bucket) keep theirs. A batched backbone (--max-batch B, one profile over
    1..B frames) has one per frame bucket (`batch_buckets`), each also serving the batch
    sizes down to the previous bucket: the frames are independent, so the rows a smaller
    batch leaves stale in the captured buffers only make outputs nobody reads."""
    if not opts.cuda_graphs:
        return []
    if spec.name == specs.MASK_DECODER:
        return []  # two dynamic dimensions (prompts, kept queries): no fixed shape to capture
    if spec.name != specs.ENC_DEC:
        if spec.name != specs.BACKBONE or opts.max_batch <= 1:
            return [CudaGraphShape()]
        buckets = batch_buckets(opts.max_batch)
        return [CudaGraphShape(b, lower_batch=low + 1 if b > low + 1 else None)
                for low, b in zip([0, *buckets], buckets, strict=False)]
    buckets = sorted(set(opts.enc_dec_buckets))
    return [CudaGraphShape(n=buckets[0])] if len(buckets) == 1 else []


def _graph_inputs(spec: ModelSpec, g: CudaGraphShape, indent: str) -> list[str]:
    """A graph spec's input shapes: without the batch dimension where the model has one
    (Triton's model config: GraphSpec.input)."""
    entries = []
    for t in spec.inputs:
        shape = tuple(g.n if d == -1 else d for d in t.dims)
        if g.batch_size:
            shape = shape[1:]
        entries.append(f"{indent}input {{ key: \"{t.name}\" value {{ dim: "
                       f"{pbtxt.dims(shape)} }} }}")
    return entries


def _tensorrt_extras(spec: ModelSpec, opts: RepoOptions) -> str:
    """CUDA graphs: one per concrete input shape (batch_size 0 with max_batch_size 0, else
    the batch it is captured at, 1..max_batch_size), for the shapes of
    `tensorrt_graph_shapes`."""
    shapes = tensorrt_graph_shapes(spec, opts)
    if not shapes:
        return ""
    specs_txt = []
    for g in shapes:
        lines = [f"        batch_size: {g.batch_size}", *_graph_inputs(spec, g, " " * 8)]
        if g.lower_batch is not None:
            lower = [f"          batch_size: {g.lower_batch}",
                     *_graph_inputs(spec, g, " " * 10)]
            lines += ["        graph_lower_bound {", *lower, "        }"]
        specs_txt.append("      {\n" + "\n".join(lines) + "\n      }")
    return ("optimization {\n  cuda {\n    graphs: true\n    graph_spec [\n"
            + ",\n".join(specs_txt) + "\n    ]\n  }\n}\n")


def _no_extras(spec: ModelSpec, opts: RepoOptions) -> str:
    return ""


def _python_graph_extras(spec: ModelSpec, opts: RepoOptions) -> str:
    # With frames in flight, backbone and enc_dec run at once: `ort_threads` gives each a
    # share of the cores instead of both claiming all of them.
    params = OnnxGraphParameters(max_classes=opts.dims.max_classes, ort_threads=opts.ort_threads)
    return pbtxt.params(params.to_strings())


# Artifacts ----------------------------------------------------------------------------


def _copy_onnx(repo: Path, graphs: Path, build: BuildOptions, opts: RepoOptions,
               log: Callable) -> None:
    for name in specs.graph_models(opts.dims):
        version = repo / name / "1"
        for old in version.glob("model.onnx*"):
            old.unlink()
        shutil.copy2(graphs / f"{name}.onnx", version / "model.onnx")
        data = graphs / f"{name}.onnx.data"
        if data.is_file():  # external weights keep the file name the graph refers to
            shutil.copy2(data, version / data.name)


def _build_plans(repo: Path, graphs: Path, build: BuildOptions, opts: RepoOptions,
                 log: Callable) -> None:
    if not build.build_plans:
        log("tensorrt: no plans built (--no-plans); build them on the serving GPU with "
            "`dart-triton build-plans`")
        return
    from dart_triton.export.tensorrt.build import build_plans

    build_plans(graphs, repo, build.plan_options(opts.dims.max_classes))


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            name="tensorrt",
            help="TensorRT plans (GPU, FP16 by default), built and verified on this GPU",
            runtime='platform: "tensorrt_plan"\n',
            graph_extras=_tensorrt_extras,
            write_artifacts=_build_plans,
            gpu_only=True,
            profiles_per_bucket=True,
        ),
        Backend(
            name="onnxruntime",
            help="the ONNX graphs on Triton's onnxruntime backend (NGC image)",
            runtime='platform: "onnxruntime_onnx"\n',
            graph_extras=_no_extras,
            write_artifacts=_copy_onnx,
        ),
        Backend(
            name="python",
            help="the ONNX graphs in ONNX Runtime inside the python backend (any Triton)",
            runtime='backend: "python"\n',
            graph_extras=_python_graph_extras,
            write_artifacts=_copy_onnx,
            graph_python_models={m: "dart_triton.triton_models.graph_model"
                                 for m in specs.MASK_GRAPH_MODELS},
            shares_passes=True,
        ),
        Backend(
            name="torch",
            help="the restructured PyTorch modules in the python backend, from safetensors "
                 "(CPU FP32; with --gpu FP16 by default, GPU-resident, optional "
                 "--compile / --cuda-graphs)",
            runtime='backend: "python"\n',
            graph_extras=torch_weights.graph_extras,
            write_artifacts=torch_weights.copy_weights,
            graph_python_models={m: torch_weights.MODULE for m in specs.MASK_GRAPH_MODELS},
            export=torch_weights.export_weights,
            graph_settings=torch_weights.settings,
            shares_passes=True,
        ),
    )
}


def check_build(build: BuildOptions) -> Backend:
    """The entry of `build.backend`, with the build's backend options checked (one line
    naming what is wrong): the one place a build looks its backend up."""
    backend = get_backend(build.backend)
    backend.graph_settings(build)
    return backend


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}") from None
