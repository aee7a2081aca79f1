"""What one `dart` request returns, as plain numpy arrays, plus COCO export."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Detections of one image.

    ``class_names`` is the CLASSES list of the request: ``class_ids`` index into it.
    ``masks`` (when asked for): one COCO compressed-RLE ``counts`` string per detection,
    in the order of ``boxes``, of a mask at ``image_size`` (H, W) — what `dart` returns
    as MASKS. ``{"size": list(image_size), "counts": masks[i]}`` is the COCO RLE.
    """

    boxes: np.ndarray  # [K, 4] float32, xyxy in input-image pixels
    scores: np.ndarray  # [K] float32
    class_ids: np.ndarray  # [K] int32
    class_names: tuple[str, ...]
    masks: tuple[bytes, ...] | None = None  # [K] COCO RLE counts (RETURN_MASKS)
    image_size: tuple[int, int] | None = None  # (H, W) of the masks

    def __post_init__(self) -> None:
        # Normalise once here so every consumer can trust shapes and dtypes; a server
        # that returns zero detections may hand back a flat [0] BOXES tensor.
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        class_ids = np.asarray(self.class_ids, dtype=np.int32).reshape(-1)
        if not len(boxes) == len(scores) == len(class_ids):
            raise ValueError(
                f"inconsistent detections: {len(boxes)} boxes, {len(scores)} scores, "
                f"{len(class_ids)} class ids"
            )
        n = len(self.class_names)
        if len(class_ids) and (class_ids.min() < 0 or class_ids.max() >= n):
            raise ValueError(f"class id out of range [0, {n}): {class_ids.tolist()}")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "class_ids", class_ids)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.masks is not None:
            masks = tuple(bytes(m) if not isinstance(m, str) else m.encode("ascii")
                          for m in self.masks)
            if len(masks) != len(scores):
                raise ValueError(f"inconsistent detections: {len(masks)} masks for "
                                 f"{len(scores)} detections")
            if self.image_size is None:
                raise ValueError("masks need the image_size (H, W) they are at")
            object.__setattr__(self, "masks", masks)
        if self.image_size is not None:
            object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))

    @classmethod
    def empty(cls, class_names: Sequence[str]) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0), tuple(class_names))

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def names(self) -> list[str]:
        """Class name of each detection."""
        return [self.class_names[i] for i in self.class_ids]

    def labels(self) -> list[str]:
        """``"name score"`` caption of each detection, for drawing."""
        return [f"{n} {s:.2f}" for n, s in zip(self.names, self.scores, strict=True)]

    def to_coco(
        self, image_id: int, category_ids: Sequence[int] | None = None
    ) -> list[dict]:
        """COCO results format (``bbox`` is xywh), plus ``category_name``; with masks,
        ``segmentation`` too: COCO compressed RLE, its counts a str (JSON has no bytes).

        ``category_ids[i]`` is the dataset category id of ``class_names[i]``;
        without it the class index itself is the category id.
        """
        if category_ids is not None and len(category_ids) != len(self.class_names):
            raise ValueError(
                f"{len(category_ids)} category ids for {len(self.class_names)} class names"
            )
        # Width/height in float32 like the boxes, then each value as the shortest decimal
        # that round-trips to the same float32: exact, but 0.9 rather than 0.8999999761.
        xywh = np.concatenate([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], axis=1)
        out = []
        for box, score, cid in zip(xywh, self.scores, self.class_ids.tolist(), strict=True):
            out.append(
                {
                    "image_id": image_id,
                    "category_id": int(category_ids[cid]) if category_ids is not None else cid,
                    "category_name": self.class_names[cid],
                    "bbox": [_short(v) for v in box],
                    "score": _short(score),
                }
            )
        for i, record in enumerate(out if self.masks is not None else ()):
            record["segmentation"] = self.rle(i, text=True)
        return out

    def rle(self, i: int, *, text: bool = False) -> dict:
        """The COCO RLE of detection ``i``'s mask (``pycocotools.mask.decode`` takes it);
        ``text``: counts as str, for JSON. ValueError without masks."""
        if self.masks is None or self.image_size is None:
            raise ValueError("these detections have no masks (ask for them: masks=True)")
        counts = self.masks[i]
        return {"size": list(self.image_size),
                "counts": counts.decode("ascii") if text else counts}


def _short(value: np.float32) -> float:
    return float(str(value))
