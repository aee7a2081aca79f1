"""Two detectors behind one signature, in process.

* `NaivePipeline`: SAM3 as shipped — `transformers`' `Sam3Model` once per class prompt
  (backbone, encoder-decoder and mask head every time). The reference.
* `DartPipeline`: backbone once per image, text features from the cache, one batched
  encoder-decoder pass per chunk of at most `max_classes` prompts, no mask head.

Data path: image → preprocess → backbone → (text cache) → encoder-decoder → postprocess.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dart_triton.contract.detections import Detections
from dart_triton.contract.passes import plan_passes
from dart_triton.contract.specs import (
    DEFAULT_MAX_CLASSES,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_NMS_IOU,
    DEFAULT_SCORE_THRESHOLD,
)
from dart_triton.contract.validation import DetectOptions, check_classes
from dart_triton.graphs.runtime import LocalGraphs, OrtGraphs, TorchModuleGraphs
from dart_triton.model.checkpoint import TEXT_MAX_LENGTH
from dart_triton.model.parts import Sam3Parts, image_size_of, load_parts
from dart_triton.model.postprocess import postprocess
from dart_triton.model.preprocess import preprocess
from dart_triton.model.text_encoder import TextEncoder
from dart_triton.pipeline.orchestration import HeadOutputs, run_graphs, run_sync


class InProcessRunner:
    """The orchestration's steps in this process: the backbone in a worker thread while
    the text encoder runs, then the enc_dec passes one after another (on a CPU, passes in
    parallel would only fight over the same cores)."""

    def __init__(self, graphs: LocalGraphs, text_encoder: TextEncoder):
        self.graphs, self.text_encoder = graphs, text_encoder

    async def backbone(self, pixel_values: np.ndarray) -> np.ndarray:
        return await asyncio.to_thread(self.graphs.backbone, pixel_values)

    async def text(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.text_encoder.encode(names)

    async def enc_dec(self, features, text_features, text_mask) -> HeadOutputs:
        return HeadOutputs(*self.graphs.enc_dec(features, text_features, text_mask))


class _Pipeline:
    """image → preprocess → `raw` (the part the two pipelines do differently) → postprocess."""

    imgsz: int

    def raw(self, pixel_values: np.ndarray, names: list[str]) -> HeadOutputs:
        raise NotImplementedError

    def detect(self, image, classes, score_threshold=DEFAULT_SCORE_THRESHOLD,
               nms_iou=DEFAULT_NMS_IOU, max_detections=DEFAULT_MAX_DETECTIONS,
               class_agnostic_nms=False) -> Detections:
        names = check_classes(classes)
        options = DetectOptions(score_threshold, nms_iou, max_detections, class_agnostic_nms)
        pixels, original_size = preprocess(image, self.imgsz)
        return postprocess(*self.raw(pixels, names), original_size, names, options)


class NaivePipeline(_Pipeline):
    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.imgsz = image_size_of(model)

    @torch.no_grad()
    def raw(self, pixel_values: np.ndarray, names: list[str]) -> HeadOutputs:
        """Per-prompt SAM3 outputs stacked: boxes [N,Q,4], logits [N,Q], presence [N,1]."""
        pixels = torch.from_numpy(pixel_values)
        outs = []
        for name in names:
            tok = self.tokenizer([name], padding="max_length", max_length=TEXT_MAX_LENGTH,
                                 truncation=True, return_tensors="pt")
            out = self.model(pixel_values=pixels, input_ids=tok["input_ids"],
                             attention_mask=tok["attention_mask"])
            outs.append(HeadOutputs(out.pred_boxes.numpy(), out.pred_logits.numpy(),
                                    out.presence_logits.numpy()))
        return HeadOutputs.concat(outs)


class DartPipeline(_Pipeline):
    def __init__(self, graphs: LocalGraphs, text_encoder: TextEncoder, imgsz: int,
                 max_classes: int = DEFAULT_MAX_CLASSES, buckets: Sequence[int] = ()):
        self.runner = InProcessRunner(graphs, text_encoder)
        self.imgsz = imgsz
        self.max_classes = max_classes
        self.buckets = tuple(buckets)

    @property
    def text_encoder(self) -> TextEncoder:
        return self.runner.text_encoder

    @classmethod
    def from_parts(cls, parts: Sam3Parts, graphs: LocalGraphs | None = None) -> DartPipeline:
        return cls(graphs or TorchModuleGraphs(parts.backbone, parts.runtime_head),
                   TextEncoder.from_sam3(parts.model, parts.tokenizer),
                   parts.dims.imgsz, parts.dims.max_classes)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, imgsz: int | None = None,
                        max_classes: int = DEFAULT_MAX_CLASSES,
                        onnx_dir: str | Path | None = None) -> DartPipeline:
        """PyTorch graphs, or the exported ONNX graphs in ONNX Runtime when `onnx_dir`."""
        parts = load_parts(checkpoint, imgsz, max_classes)
        return cls.from_parts(parts, OrtGraphs(onnx_dir) if onnx_dir else None)

    def raw(self, pixel_values: np.ndarray, names: list[str]) -> HeadOutputs:
        passes = plan_passes(len(names), self.max_classes, self.buckets)
        return run_sync(run_graphs(self.runner, pixel_values, names, passes))
