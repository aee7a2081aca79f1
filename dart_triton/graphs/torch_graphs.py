"""backbone and enc_dec as PyTorch modules served from safetensors (the torch backend).

A repository built with ``--backend torch`` holds, in ``<model>/1/weights/``, the SAM3
config (at the build's image size), every tensor of the restructured module (parameters
and the precomputed buffers: RoPE tables, position embeddings) as safetensors, and the
graph dims. Nothing is unpickled: the module is rebuilt from the config with its
parameters on the meta device (no random initialisation of 840M weights) and then every
tensor is assigned from the file. backbone is `RestructuredBackbone`, enc_dec is
`BatchedDetectionHead` with SDPA attention (`Sam3Parts.runtime_head`). At run time the
backbone's attention is SDPA too (`RopeAttention(attention="sdpa")`, same weights): the
explicit ``softmax(Q·Kᵀ)·V`` exists for TensorRT's FP16 pattern matching, while PyTorch's
fused kernels keep FP32 accumulation in FP16 and never materialise the score matrix.

`TorchGraph` runs one such module on a device in a precision, optionally compiled
(`torch.compile`) and with one CUDA graph per input shape; compilation and capture
happen in `warm_up`, which the Triton model calls before it reports ready. The same
class runs in process (`TorchGraphs`), so "served" and "in process" are the same modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dart_triton.contract import specs
from dart_triton.contract.parameters import TorchGraphParameters
from dart_triton.contract.passes import pad_to_bucket, unpad
from dart_triton.contract.specs import GraphDims
from dart_triton.graphs import aot
from dart_triton.model.tensor_io import TensorsMismatch, assign_tensors, module_tensors, storable

WEIGHTS_DIR = "weights"  # inside <model>/1/
CONFIG_FILE = "sam3_config.json"
TENSORS_FILE = "model.safetensors"
META_FILE = "dart_graph.json"
FORMAT = 1

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# --compile -> torch.compile mode. CUDA graphs are a separate switch (captured here, per
# bucket), so inductor's own cudagraphs stay off in every mode.
COMPILE_MODES = {"none": None, "default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class TorchGraphError(ValueError):
    """A weights directory that cannot be loaded (missing, foreign, or incomplete)."""


# Settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchSettings:
    """How the graph modules run: precision, torch.compile mode, CUDA graphs."""

    precision: str = "fp32"
    compile: str = "none"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, "
                             f"got {self.compile!r}")

    def check_device(self, device: torch.device | str) -> None:
        """FP16 and CUDA graphs are GPU features: refuse them for a CPU in one line."""
        if torch.device(device).type == "cuda":
            return
        if self.precision == "fp16":
            raise ValueError("fp16 needs a GPU (PyTorch's CPU FP16 kernels are slow or "
                             "missing): use fp32 on the CPU")
        if self.cuda_graphs:
            raise ValueError("CUDA graphs need a GPU")

    @classmethod
    def from_parameters(cls, params: TorchGraphParameters) -> TorchSettings:
        return cls(precision=params.precision, compile=params.compile,
                   cuda_graphs=params.cuda_graphs)


# Saving and rebuilding the modules ------------------------------------------------------


def save_graph_module(out_dir: str | Path, name: str, module: nn.Module, sam3_config,
                      dims: GraphDims, backbone: dict | None = None) -> Path:
    """Write one graph module's weights directory (config, tensors, dims)."""
    from safetensors.torch import save_file

    if name not in specs.MASK_GRAPH_MODELS:
        raise ValueError(f"not a graph model: {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(sam3_config.to_json_string())
    save_file(storable(module_tensors(module)), str(out / TENSORS_FILE),
              metadata={"model": name, "format": str(FORMAT)})
    meta = {"format": FORMAT, "model": name, "dims": asdict(dims),
            "attention": "sdpa" if name == specs.ENC_DEC else "explicit"}
    if backbone:  # not SAM3's ViT: a pruned ViT or a student (`students.served_record`)
        meta["backbone"] = backbone
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def skeleton(name: str, sam3_config, dims: GraphDims, backbone: dict | None = None) -> nn.Module:
    """The graph module's structure with its parameters on the meta device.

    Built the way `model_parts.load_parts` builds it; the buffers computed here (on the
    CPU, from shapes) are replaced by the saved ones."""
    from transformers import Sam3Model

    from dart_triton.model.backbone import RestructuredBackbone
    from dart_triton.model.detection_head import BatchedDetectionHead
    from dart_triton.model.mask_head import MaskHead

    if name == specs.BACKBONE and backbone and backbone.get("kind") == "timm":
        from dart_triton.backbones.students import (
            served_skeleton,  # a timm student: no SAM3 modules
        )

        return served_skeleton(backbone, dims)
    with torch.device("meta"):
        sam3 = Sam3Model(sam3_config)
        if name == specs.BACKBONE:
            module = RestructuredBackbone(sam3.vision_encoder, dims.imgsz,
                                          list(dims.backbone_levels))
            if backbone:  # a pruned ViT (training-free, or distilled)
                from dart_triton.backbones.pruned import prune

                module = prune(module, [(int(b), p) for b, p in backbone["removed"]])
            return module
        if name == specs.MASK_DECODER:
            return MaskHead(sam3, dims)
        return BatchedDetectionHead(sam3, dims, "sdpa")


def _read_meta(root: Path, name: str) -> dict:
    try:
        meta = json.loads((root / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise TorchGraphError(f"{root} is not a torch graph weights directory: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("model") != name:
        raise TorchGraphError(f"{root / META_FILE} holds {meta.get('model')!r} (format "
                              f"{meta.get('format')}), expected {name!r} (format {FORMAT})")
    return meta


def read_dims(weights_dir: str | Path, name: str) -> GraphDims:
    """The graph dims a weights directory was written for."""
    return GraphDims.from_dict(_read_meta(Path(weights_dir), name)["dims"])


def load_graph_module(weights_dir: str | Path, name: str) -> tuple[nn.Module, GraphDims]:
    """(module on the CPU in FP32 or as saved, graph dims) from a weights directory."""
    from safetensors.torch import load_file
    from transformers import Sam3Config

    root = Path(weights_dir)
    meta = _read_meta(root, name)
    try:
        config = Sam3Config.from_dict(json.loads((root / CONFIG_FILE).read_text()))
    except (OSError, ValueError) as exc:
        raise TorchGraphError(f"{root} is not a torch graph weights directory: {exc}") from None
    dims = GraphDims.from_dict(meta["dims"])
    module = skeleton(name, config, dims, meta.get("backbone"))
    try:
        assign_tensors(module, load_file(str(root / TENSORS_FILE)))
    except TensorsMismatch as exc:
        raise TorchGraphError(str(exc)) from None
    if name == specs.BACKBONE and hasattr(module, "blocks"):  # a ViT (students have none)
        use_sdpa(module)
    return module.eval(), dims


def use_sdpa(backbone: nn.Module) -> nn.Module:
    """Every block's attention computed by SDPA (`backbone.RopeAttention`; in place)."""
    for block in backbone.blocks:
        if block.attn is not None:  # None: pruned away
            block.attn.attention = "sdpa"
    return backbone


# Running them ---------------------------------------------------------------------------


def example_inputs(name: str, dims: GraphDims, n: int = 1,
                   device: torch.device | str = "cpu", frames: int = 0
                   ) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's dtypes and shapes (contents irrelevant: for warm-up/capture);
    ``n``: prompts (enc_dec) or frames (backbone); ``frames``: enc_dec's shared pass of
    ``n`` prompts over that many frames (with its frame index)."""
    spec = (specs.enc_dec_spec(dims, frames > 0) if name == specs.ENC_DEC
            else specs.all_specs(dims)[name])
    out = []
    for t in spec.inputs:
        if t.name == specs.FRAME_INDEX:
            out.append(torch.arange(n, device=device) % frames)
            continue
        shape = ((n, *t.dims[1:]) if name == specs.BACKBONE
                 else (frames, *t.dims[1:]) if t.name == specs.FPN_FEATURES and frames
                 else tuple(n if d == -1 else d for d in t.dims))
        dtype = getattr(torch, t.numpy_dtype)
        out.append(torch.ones(shape, dtype=dtype, device=device) if dtype == torch.int32
                   else torch.zeros(shape, dtype=dtype, device=device))
    return tuple(out)


def _shape_key(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in inputs)


class _CapturedGraph:
    """One CUDA graph for one set of input shapes: static inputs in, static outputs out."""

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor], warmup: int = 3):
        self.inputs = [t.clone() for t in inputs]
        # Warm-up on a side stream (as torch.cuda.graphs' docs require): compiles, picks
        # cuBLAS/cuDNN algorithms and fills the allocator before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # a private memory pool per graph: never shared
            self.outputs = fn(*self.inputs)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        # The next replay overwrites the static outputs: hand out copies.
        return tuple(t.clone() for t in self.outputs)


class TorchGraph:
    """One graph module on one device: tensors in (any device, spec dtypes), FP32 out.

    With `compiled` (an ahead-of-time package, `graphs.aot`), that runs instead of the
    module, which may then be None."""

    def __init__(self, name: str, module: nn.Module | None, dims: GraphDims,
                 device: torch.device | str = "cpu", settings: TorchSettings | None = None,
                 compiled: Callable | None = None):
        self.name, self.dims = name, dims
        self.device = torch.device(device)
        self.settings = settings or TorchSettings()
        self.settings.check_device(self.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # streams, graphs and pools follow it
        self.dtype = PRECISIONS[self.settings.precision]
        self.module = None if module is None else aot.ServedModule(
            module.to(device=self.device, dtype=self.dtype), self.dtype).eval()
        # mask_decoder runs eagerly: two dynamic dimensions (prompts, kept queries) and
        # convolutions that cuDNN already runs as single kernels.
        mode = None if name == specs.MASK_DECODER else COMPILE_MODES[self.settings.compile]
        self._fn: Callable = self.module
        self.compiled_ahead = compiled is not None
        if compiled is not None:
            self._fn = compiled
        elif mode is not None:
            # enc_dec's N varies: fixed shapes only where CUDA graphs pin them anyway.
            dynamic = False if (name == specs.BACKBONE or self.settings.cuda_graphs) else None
            self._fn = torch.compile(self.module, mode=mode, dynamic=dynamic)
        self._graphs: dict[tuple, _CapturedGraph] = {}
        self._warm: list[int] = []  # prompt counts compiled (and captured) at load
        self._frames: list[int] = []  # frame counts of shared enc_dec passes, likewise

    def _on_device(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(self.device, non_blocking=True) for t in inputs]

    def _rows(self, n: int) -> int:
        """The prompt count enc_dec runs `n` at: with CUDA graphs (static shapes), the next
        warm shape. A caller that does not pad (the `dart_ensemble` gate passes N as it
        comes) would otherwise leave the graphs and, compiled, recompile for each new N
        in the middle of serving (the H200 run: 311 ms per call on average at N = 2).
        The backbone's batch of frames likewise, compiled too (its shapes are static)."""
        static = self.settings.cuda_graphs or (
            self.name == specs.BACKBONE and self.settings.compile != "none")
        if not static or self.name == specs.MASK_DECODER:
            return n
        return min((b for b in self._warm if b >= n), default=n)

    def _pad_shared(self, inputs: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
        """A shared pass (fpn_features [F], text, mask, frame_index) at warm shapes: frames
        of zeros up to the next warm frame count (no row reads them), rows as
        `pad_to_bucket` pads them, each padded row in the last row's frame."""
        features, text, mask, index = inputs
        f, n = int(features.shape[0]), int(index.shape[0])
        frames = min((b for b in self._frames if b >= f), default=f)
        if frames != f:
            features = torch.cat([features, features.new_zeros((frames - f,
                                                                *features.shape[1:]))])
        if rows != n:
            text, mask = pad_to_bucket(text, mask, rows)
            index = torch.cat([index, index[-1:].expand(rows - n)])
        return [features, text, mask, index]

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = self._on_device(inputs)
        n = int(inputs[-1].shape[0])
        rows = self._rows(n)
        if len(inputs) == 4 and self.name == specs.ENC_DEC:  # a shared pass
            if self._frames:  # static shapes (CUDA graphs, compiled): pad to warm ones
                inputs = self._pad_shared(list(inputs), rows)
        elif rows != n and self.name == specs.BACKBONE:  # frames of zeros, cut off below
            pixels = inputs[0]
            inputs = [torch.cat([pixels, pixels.new_zeros((rows - n, *pixels.shape[1:]))])]
        elif rows != n:  # enc_dec: (fpn_features, text_features, text_mask)
            inputs = [inputs[0], *pad_to_bucket(inputs[1], inputs[2], rows)]
        graph = self._graphs.get(_shape_key(inputs))
        out = graph(inputs) if graph is not None else self._fn(*inputs)
        return tuple(unpad(t, n).contiguous() for t in out)

    def warm_shapes(self, buckets: Sequence[int] = ()) -> list[int]:
        """The shapes warmed (and captured) at load: enc_dec's prompt counts (the buckets,
        else max_classes), the backbone's frame counts (`batch_buckets`, else 1)."""
        if self.name == specs.BACKBONE:
            return sorted(set(buckets)) or [1]
        if self.name == specs.MASK_DECODER:
            return [1]  # one prompt, one query: loads the kernels; shapes vary anyway
        return sorted(set(buckets)) or [self.dims.max_classes]

    @torch.no_grad()
    def warm_up(self, buckets: Sequence[int] = (), frames: Sequence[int] = ()) -> list[int]:
        """Compile and (with CUDA graphs) capture for each warm shape; returns them.
        `frames`: enc_dec serves shared passes of that many frames (`batch_buckets`):
        each frame count with each prompt count that can hold it."""
        shapes = self.warm_shapes(buckets)
        self._warm = shapes
        static = self.settings.cuda_graphs or self.settings.compile != "none"
        self._frames = sorted(set(frames)) if self.name == specs.ENC_DEC and static else []
        pairs = ([(n, f) for f in frames for n in shapes if f <= n] if self.name == specs.ENC_DEC
                 and frames else [(n, 0) for n in shapes])
        for n, f in pairs:
            inputs = example_inputs(self.name, self.dims, n, self.device, f)
            if self.settings.cuda_graphs and self.name != specs.MASK_DECODER:
                self._graphs[_shape_key(inputs)] = _CapturedGraph(self._fn, inputs)
            else:
                self._fn(*inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return shapes

    @classmethod
    def from_weights(cls, weights_dir: str | Path, name: str,
                     device: torch.device | str = "cpu",
                     settings: TorchSettings | None = None) -> TorchGraph:
        """The module from its weights directory; compiled, from the repository's
        ahead-of-time package when there is one (`graphs.aot`: then the safetensors are
        not read), else by `torch.compile` at load."""
        settings = settings or TorchSettings()
        if settings.compile != "none":
            settings.check_device(device)
            compiled = aot.load_package(weights_dir, name, device)
            if compiled is not None:
                return cls(name, None, read_dims(weights_dir, name), device, settings, compiled)
        module, dims = load_graph_module(weights_dir, name)
        return cls(name, module, dims, device, settings)


def weights_dir(repo: str | Path, name: str, version: int = 1) -> Path:
    return Path(repo) / name / str(version) / WEIGHTS_DIR


class TorchGraphs:
    """Both modules of a torch repository in this process (`runtime.LocalGraphs`):
    numpy in and out, for `DartPipeline` — the served modules, without the server."""

    def __init__(self, backbone: TorchGraph, enc_dec: TorchGraph):
        self._backbone, self._enc_dec = backbone, enc_dec

    @classmethod
    def from_repository(cls, repo: str | Path, device: torch.device | str = "cpu",
                        settings: TorchSettings | None = None,
                        buckets: Sequence[int] = (), warm: bool = True) -> TorchGraphs:
        graphs = [TorchGraph.from_weights(weights_dir(repo, name), name, device, settings)
                  for name in specs.GRAPH_MODELS]
        if warm:
            for g in graphs:
                g.warm_up(buckets)
        return cls(*graphs)

    @property
    def dims(self) -> GraphDims:
        return self._enc_dec.dims

    def backbone(self, pixel_values):
        """numpy in, numpy out; a torch tensor in (e.g. preprocessed on the GPU), the
        features stay a tensor on the module's device, as between the served models."""
        features = self._backbone(torch.as_tensor(pixel_values))[0]
        return features if isinstance(pixel_values, torch.Tensor) else features.cpu().numpy()

    def enc_dec(self, fpn_features, text_features, text_mask):
        out = self._enc_dec(*(torch.as_tensor(t) for t in (fpn_features, text_features,
                                                            text_mask)))
        return tuple(t.cpu().numpy() for t in out)
