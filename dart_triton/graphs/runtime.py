"""The two graphs in this process: PyTorch modules, or ONNX Runtime sessions.

Both take and return numpy arrays keyed by the names in `specs`, so pipelines and
Triton python models do not care which one they hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dart_triton.contract import specs


class LocalGraphs(Protocol):
    """The graphs in this process, synchronously (numpy in, numpy out). With masks (a
    mask head, `GraphDims.masks`): `backbone_levels`, enc_dec's mask inputs, `mask_decoder`."""

    def backbone(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def backbone_levels(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """Every level the backbone returns: detection first, then the mask levels."""
        ...

    def enc_dec(self, fpn_features: np.ndarray, text_features: np.ndarray,
                text_mask: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def mask_decoder(self, levels: list[np.ndarray], encoder_memory: np.ndarray,
                     text_features: np.ndarray, text_mask: np.ndarray,
                     kept_queries: np.ndarray) -> np.ndarray: ...


class TorchModuleGraphs(LocalGraphs):
    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module,
                 mask_head: torch.nn.Module | None = None):
        self._backbone, self._head, self._mask_head = backbone, head, mask_head

    @torch.no_grad()
    def backbone(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.backbone_levels(pixel_values)[0]

    @torch.no_grad()
    def backbone_levels(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        return [t.numpy() for t in self._backbone(torch.from_numpy(pixel_values))]

    @torch.no_grad()
    def enc_dec(self, fpn_features, text_features, text_mask):
        out = self._head(torch.from_numpy(fpn_features), torch.from_numpy(text_features),
                         torch.from_numpy(text_mask))
        return tuple(t.numpy() for t in out)

    @torch.no_grad()
    def mask_decoder(self, levels, encoder_memory, text_features, text_mask, kept_queries):
        if self._mask_head is None:
            raise ValueError("these graphs were built without masks")
        inputs = (*levels, encoder_memory, text_features, text_mask, kept_queries)
        return self._mask_head(*(torch.from_numpy(np.asarray(x)) for x in inputs)).numpy()


def ort_session(path: str | Path, threads: int | None = None, spin: bool = True):
    """An ONNX Runtime session. `spin` False: its threads sleep between runs instead of
    spinning for more work, which in a server would take the cores from the other
    models' processes (on 2 cores it tripled `dart`'s preprocessing time)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("DART_ORT_THREADS", "0"))
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OrtGraph:
    """One ONNX graph in ONNX Runtime; call with named numpy inputs."""

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True):
        self.session = ort_session(path, threads, spin)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, inputs)


class OrtGraphs(LocalGraphs):
    def __init__(self, onnx_dir: str | Path, threads: int | None = None):
        onnx_dir = Path(onnx_dir)
        self._backbone = OrtGraph(onnx_dir / "backbone.onnx", threads)
        self._enc_dec = OrtGraph(onnx_dir / "enc_dec.onnx", threads)
        self._shared = specs.FRAME_INDEX in [i.name for i in self._enc_dec.session.get_inputs()]
        masks = onnx_dir / f"{specs.MASK_DECODER}.onnx"
        self._mask_decoder = OrtGraph(masks, threads) if masks.is_file() else None

    def backbone(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.backbone_levels(pixel_values)[0]

    def backbone_levels(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        return self._backbone(**{specs.PIXEL_VALUES: pixel_values})

    def mask_decoder(self, levels, encoder_memory, text_features, text_mask, kept_queries):
        if self._mask_decoder is None:
            raise ValueError("these graphs were built without masks")
        names = [i.name for i in self._mask_decoder.session.get_inputs()]
        values = (*levels, encoder_memory, text_features, text_mask, kept_queries)
        return self._mask_decoder(**dict(zip(names, values, strict=True)))[0]

    def enc_dec(self, fpn_features, text_features, text_mask):
        inputs = {specs.FPN_FEATURES: fpn_features, specs.TEXT_FEATURES: text_features,
                  specs.TEXT_MASK: text_mask}
        if self._shared:  # the graph of shared passes, here for one frame
            inputs[specs.FRAME_INDEX] = np.zeros(len(text_features), np.int64)
        return tuple(self._enc_dec(**inputs))
