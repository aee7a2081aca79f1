"""SAM3 split into DART's parts: restructured backbone, batched detection head, text
encoder, and (with masks) the mask head for kept detections."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dart_triton.contract.specs import DEFAULT_MAX_CLASSES, PATCH_SIZE, GraphDims
from dart_triton.model.backbone import RestructuredBackbone
from dart_triton.model.checkpoint import TEXT_MAX_LENGTH, load_sam3, load_tokenizer
from dart_triton.model.detection_head import BatchedDetectionHead
from dart_triton.model.mask_head import MaskHead


def image_size_of(model) -> int:
    size = model.config.vision_config.backbone_config.image_size
    return int(size[0] if isinstance(size, list | tuple) else size)


def graph_dims(model, max_classes: int = DEFAULT_MAX_CLASSES,
               masks: bool = False) -> GraphDims:
    cfg = model.config
    return GraphDims(
        imgsz=image_size_of(model),
        fpn_dim=int(cfg.vision_config.fpn_hidden_size),
        text_len=TEXT_MAX_LENGTH,
        text_dim=int(model.text_projection.out_features),
        num_queries=int(cfg.detr_decoder_config.num_queries),
        max_classes=max_classes,
        masks=masks,
        scale_factors=tuple(cfg.vision_config.scale_factors),  # where detection reads
    )


@dataclass
class Sam3Parts:
    model: object  # transformers Sam3Model (the reference; also owns the weights)
    tokenizer: object
    backbone: RestructuredBackbone
    head: BatchedDetectionHead  # explicit attention: the graph that is exported
    dims: GraphDims
    mask_head: MaskHead | None = None  # with masks (`dims.masks`)

    @cached_property
    def runtime_head(self) -> BatchedDetectionHead:
        """The same head with fused (SDPA) attention, for running in PyTorch."""
        return BatchedDetectionHead(self.model, self.dims, "sdpa").eval()


def load_parts(checkpoint: str | Path, imgsz: int | None = None,
               max_classes: int = DEFAULT_MAX_CLASSES, masks: bool = False) -> Sam3Parts:
    if imgsz is not None and (imgsz <= 0 or imgsz % PATCH_SIZE):
        raise ValueError(f"--imgsz must be a positive multiple of {PATCH_SIZE}, got {imgsz}")
    if max_classes < 1:
        raise ValueError(f"--max-classes must be at least 1, got {max_classes}")
    model = load_sam3(checkpoint, imgsz=imgsz)
    dims = graph_dims(model, max_classes, masks)
    backbone = RestructuredBackbone(model.vision_encoder, dims.imgsz,
                                    list(dims.backbone_levels)).eval()
    head = BatchedDetectionHead(model, dims).eval()
    mask_head = MaskHead(model, dims).eval() if masks else None
    return Sam3Parts(model, load_tokenizer(checkpoint), backbone, head, dims, mask_head)
