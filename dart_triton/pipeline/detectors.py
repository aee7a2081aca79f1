"""Two detectors behind one signature, in process.

* `NaivePipeline`: SAM3 as shipped — `transformers`' `Sam3Model` once per class prompt
  (backbone, encoder-decoder and mask head every time). The reference.
* `DartPipeline`: backbone once per image, text features from the cache, one batched
  encoder-decoder pass per chunk of at most `max_classes` prompts, no mask head unless
  masks are asked for (then only for the kept detections: `pipeline.masks`).

Data path: image → preprocess → backbone → (text cache) → encoder-decoder → postprocess.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from pycocotools import mask as coco_mask

from dart_triton.contract.detections import Detections
from dart_triton.contract.passes import plan_passes
from dart_triton.contract.specs import (
    DEFAULT_MASK_THRESHOLD,
    DEFAULT_MAX_CLASSES,
    DEFAULT_MAX_DETECTIONS,
    DEFAULT_NMS_IOU,
    DEFAULT_SCORE_THRESHOLD,
)
from dart_triton.contract.validation import DetectOptions, MaskOptions, check_classes
from dart_triton.graphs.runtime import LocalGraphs, OrtGraphs, TorchModuleGraphs
from dart_triton.model.checkpoint import TEXT_MAX_LENGTH
from dart_triton.model.parts import Sam3Parts, image_size_of, load_parts
from dart_triton.model.postprocess import postprocess, select_kept
from dart_triton.model.preprocess import preprocess
from dart_triton.model.text_encoder import TextEncoder
from dart_triton.pipeline.masks import detect_with_masks
from dart_triton.pipeline.orchestration import HeadOutputs, run_graphs, run_sync


class InProcessRunner:
    """The orchestration's steps in this process: the backbone in a worker thread while
    the text encoder runs, then the enc_dec passes one after another (on a CPU, passes in
    parallel would only fight over the same cores)."""

    def __init__(self, graphs: LocalGraphs, text_encoder: TextEncoder):
        self.graphs, self.text_encoder = graphs, text_encoder

    async def backbone(self, pixel_values: np.ndarray, mask_levels: bool = False):
        run = self.graphs.backbone_levels if mask_levels else self.graphs.backbone
        return await asyncio.to_thread(run, pixel_values)

    async def text(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.text_encoder.encode(names)

    async def enc_dec(self, features, text_features, text_mask,
                      mask_inputs: bool = False) -> HeadOutputs:
        outputs = self.graphs.enc_dec(features, text_features, text_mask)
        return HeadOutputs(*(outputs if mask_inputs else outputs[:3]))

    async def mask_decoder(self, levels, encoder_memory, text_features, text_mask,
                           kept_queries) -> np.ndarray:
        arrays = (x.numpy() if isinstance(x, torch.Tensor) else x
                  for x in (encoder_memory, text_features, text_mask, kept_queries))
        return await asyncio.to_thread(self.graphs.mask_decoder, levels, *arrays)


class _Pipeline:
    """image → preprocess → `raw` (the part the two pipelines do differently) → postprocess."""

    imgsz: int

    def raw(self, pixel_values: np.ndarray, names: list[str]) -> HeadOutputs:
        raise NotImplementedError

    def with_masks(self, pixels: np.ndarray, size: tuple[int, int], names: list[str],
                   options: DetectOptions, masks: MaskOptions) -> Detections:
        raise NotImplementedError

    def detect(self, image, classes, score_threshold=DEFAULT_SCORE_THRESHOLD,
               nms_iou=DEFAULT_NMS_IOU, max_detections=DEFAULT_MAX_DETECTIONS,
               class_agnostic_nms=False, masks=False,
               mask_threshold=DEFAULT_MASK_THRESHOLD) -> Detections:
        """Detections of `classes`; with `masks`, each with its mask (COCO RLE)."""
        names = check_classes(classes)
        options = DetectOptions(score_threshold, nms_iou, max_detections, class_agnostic_nms)
        mask_options = MaskOptions(masks, mask_threshold)
        pixels, original_size = preprocess(image, self.imgsz)
        if masks:
            size = (int(original_size[0]), int(original_size[1]))
            return self.with_masks(pixels, size, names, options, mask_options)
        return postprocess(*self.raw(pixels, names).detection, original_size, names, options)


class NaivePipeline(_Pipeline):
    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.imgsz = image_size_of(model)
        self.last_masks: list[torch.Tensor] = []  # pred_masks per prompt of the last `raw`

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
            self.last_masks.append(out.pred_masks)
        return HeadOutputs.concat(outs)

    def with_masks(self, pixels, size, names, options, masks) -> Detections:
        """The reference: each kept query's mask from `Sam3Model`'s own mask head, through
        `Sam3Processor.post_process_instance_segmentation` (sigmoid, bilinear to the image,
        threshold), kept queries only."""
        from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

        self.last_masks = []
        head = self.raw(pixels, names)
        boxes, scores, class_ids, query_ids = select_kept(*head.detection, size, options)
        processor = Sam3ImageProcessor()
        rles: list[bytes] = []
        for prompt, query in zip(class_ids.tolist(), query_ids.tolist(), strict=True):
            one = SimpleNamespace(  # the kept query alone; threshold -1 keeps it
                pred_logits=torch.zeros(1, 1), pred_boxes=torch.zeros(1, 1, 4),
                presence_logits=None, pred_masks=self.last_masks[prompt][:, query:query + 1])
            mask = processor.post_process_instance_segmentation(
                one, threshold=-1.0, mask_threshold=masks.mask_threshold,
                target_sizes=[size])[0]["masks"][0]
            rles.append(coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))[
                "counts"])
        return Detections(boxes, scores, class_ids, tuple(names), tuple(rles), size)


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
        return cls(graphs or TorchModuleGraphs(parts.backbone, parts.runtime_head,
                                               parts.mask_head),
                   TextEncoder.from_sam3(parts.model, parts.tokenizer),
                   parts.dims.imgsz, parts.dims.max_classes)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, imgsz: int | None = None,
                        max_classes: int = DEFAULT_MAX_CLASSES,
                        onnx_dir: str | Path | None = None, masks: bool = False) -> DartPipeline:
        """PyTorch graphs, or the exported ONNX graphs in ONNX Runtime when `onnx_dir`;
        `masks`: with the mask head (`detect(..., masks=True)`)."""
        parts = load_parts(checkpoint, imgsz, max_classes, masks)
        return cls.from_parts(parts, OrtGraphs(onnx_dir) if onnx_dir else None)

    def raw(self, pixel_values: np.ndarray, names: list[str]) -> HeadOutputs:
        passes = plan_passes(len(names), self.max_classes, self.buckets)
        return run_sync(run_graphs(self.runner, pixel_values, names, passes))

    def with_masks(self, pixels, size, names, options, masks) -> Detections:
        passes = plan_passes(len(names), self.max_classes, self.buckets)
        kept, rles = run_sync(detect_with_masks(self.runner, pixels, names, passes, size,
                                                options, masks, self.max_classes))
        return Detections(*kept, tuple(names), tuple(rles), size)
