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
    """The two graphs in this process, synchronously (numpy in, numpy out)."""

    def backbone(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def enc_dec(self, fpn_features: np.ndarray, text_features: np.ndarray,
                text_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class TorchModuleGraphs(LocalGraphs):
    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module):
        self._backbone, self._head = backbone, head

    @torch.no_grad()
    def backbone(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._backbone(torch.from_numpy(pixel_values))[0].numpy()

    @torch.no_grad()
    def enc_dec(self, fpn_features, text_features, text_mask):
        out = self._head(torch.from_numpy(fpn_features), torch.from_numpy(text_features),
                         torch.from_numpy(text_mask))
        return tuple(t.numpy() for t in out)


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

    def backbone(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._backbone(**{specs.PIXEL_VALUES: pixel_values})[0]

    def enc_dec(self, fpn_features, text_features, text_mask):
        return tuple(self._enc_dec(**{
            specs.FPN_FEATURES: fpn_features,
            specs.TEXT_FEATURES: text_features,
            specs.TEXT_MASK: text_mask,
        }))
