"""The torch backend's build side: weights instead of graphs, and the graph models' params.

`export_weights` writes, for backbone and enc_dec, what `dart_triton.graphs.torch_graphs` loads:
the SAM3 config at the build's image size, the restructured module's tensors as
safetensors, and the graph dims. No ONNX export and no ONNX Runtime check: the served
modules are the PyTorch ones the parity tests cover.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dart_triton.contract import specs
from dart_triton.contract.parameters import TorchGraphParameters
from dart_triton.contract.specs import GraphDims, ModelSpec
from dart_triton.export import pbtxt
from dart_triton.export.options import BuildOptions, RepoOptions

MODULE = "dart_triton.triton_models.torch_graph_model"
# dart_triton.graphs.torch_graphs (torch, transformers) is imported where used: the backend
# table is read by commands that must start fast.


def settings(build: BuildOptions) -> dict[str, object]:
    """The build's torch options, checked, with the defaults resolved: FP16 on a GPU and
    FP32 on the CPU unless ``--precision`` says otherwise."""
    from dart_triton.graphs.torch_graphs import TorchSettings

    gpu = build.gpu or bool(build.gpus)
    precision = build.precision or ("fp16" if gpu else "fp32")
    chosen = TorchSettings(precision=precision, compile=build.compile,
                           cuda_graphs=bool(build.cuda_graphs))
    try:
        chosen.check_device("cuda" if gpu else "cpu")
    except ValueError as exc:
        raise ValueError(f"--backend torch: {exc} (add --gpu)") from None
    return asdict(chosen)


def graph_extras(spec: ModelSpec, opts: RepoOptions) -> str:
    params = TorchGraphParameters(**opts.graph_settings, max_classes=opts.dims.max_classes,
                                  enc_dec_buckets=opts.enc_dec_buckets)
    # On a GPU, tensors reach the model as they are (DLPack), not through host memory.
    return pbtxt.params(params.to_strings(gpu_inputs=opts.gpu))


def export_weights(checkpoint: Path, out: Path, build: BuildOptions, log: Callable) -> GraphDims:
    """Both graph modules' weights directories under `out/<model>/`; returns the dims."""
    from dart_triton.backbones.choice import with_backbone
    from dart_triton.backbones.students import served_record
    from dart_triton.graphs.torch_graphs import save_graph_module
    from dart_triton.model.parts import load_parts

    settings(build)  # a bad combination fails before minutes of loading
    parts = with_backbone(load_parts(checkpoint, build.imgsz, build.max_classes, build.masks),
                          build.backbone)
    modules = {specs.BACKBONE: parts.backbone, specs.ENC_DEC: parts.runtime_head}
    if parts.mask_head is not None:
        modules[specs.MASK_DECODER] = parts.mask_head
    for name, module in modules.items():
        log(f"torch: saving {name} ({parts.dims.imgsz}px) as safetensors ...")
        record = served_record(module) if name == specs.BACKBONE else None
        save_graph_module(out / name, name, module, parts.model.config, parts.dims, record)
    if build.compile != "none":
        compile_ahead(out, build, log)
    return parts.dims


def compile_ahead(out: Path, build: BuildOptions, log: Callable) -> None:
    """Compile each saved module ahead of time into its weights directory (`graphs.aot`), on
    the device it will serve on, so that a start loads machine code instead of compiling.
    Without that device here, the served model compiles at load (one line says so)."""
    import torch

    from dart_triton.graphs import aot
    from dart_triton.graphs.torch_graphs import (
        PRECISIONS,
        TorchSettings,
        example_inputs,
        load_graph_module,
    )

    chosen = TorchSettings(**settings(build))
    device = "cuda" if build.gpu or build.gpus else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        log("torch: no GPU here, so nothing is compiled ahead of time; the served models "
            "compile at load (build on the serving GPU kind for fast starts)")
        return
    dtype = PRECISIONS[chosen.precision]
    for name in specs.GRAPH_MODELS:
        module, dims = load_graph_module(out / name, name)  # exactly what is served
        log(f"torch: compiling {name} ahead of time for {device} ({chosen.precision}, "
            f"{chosen.compile}) ...")
        with torch.no_grad():
            aot.compile_package(
                name, module.to(device=device, dtype=dtype), dims, device, dtype,
                chosen.compile, out / name,
                lambda n, f=0, name=name, dims=dims: example_inputs(name, dims, n, device, f),
                build.max_batch)


def copy_weights(repo: Path, exported: Path, build: BuildOptions, opts: RepoOptions,
                 log: Callable) -> None:
    """Move the exported weights into `repo/<model>/1/weights/` (a rebuild replaces them)."""
    from dart_triton.graphs.torch_graphs import WEIGHTS_DIR

    for name in specs.graph_models(opts.dims):
        version = repo / name / "1"
        for stale in version.glob("model.onnx*"):  # left by a build with another backend
            stale.unlink()
        dest = version / WEIGHTS_DIR
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(exported / name, dest)
