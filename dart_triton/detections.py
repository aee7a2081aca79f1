"""The detection result every pipeline, Triton model and client returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detections:
    boxes: np.ndarray  # FP32 [K, 4] xyxy, input-image pixels
    scores: np.ndarray  # FP32 [K], descending
    class_ids: np.ndarray  # INT32 [K], index into the request's class list
    class_names: list[str] = field(default_factory=list)  # the request's class list

    @classmethod
    def empty(cls, class_names: list[str] | None = None) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int32), list(class_names or []))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def labels(self) -> list[str]:
        return [self.class_names[i] for i in self.class_ids.tolist()]
