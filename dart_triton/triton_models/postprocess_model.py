"""postprocess: head outputs + original_size (+ request options) -> BOXES, SCORES, CLASS_IDS."""

from __future__ import annotations

import numpy as np

from dart_triton.contract import specs
from dart_triton.model.postprocess import select
from dart_triton.triton_models import pb


def detection_tensors(boxes, scores, class_ids) -> list:
    """`select`'s (boxes, scores, class ids) as the output tensors, in spec order."""
    return [pb.pb_utils.Tensor(name, value)
            for name, value in zip(specs.DETECTION_OUTPUTS, (boxes, scores, class_ids),
                                   strict=True)]


def masks_tensor(rles: list[bytes] | None):
    """MASKS: one COCO RLE counts string per detection; [0] when none were asked for."""
    return pb.pb_utils.Tensor(specs.MASKS, np.array(rles or [], dtype=object))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        pass

    def _run(self, request) -> list:
        boxes, logits, presence, size = (
            pb.as_numpy(pb.required_input(request, name))
            for name in (*specs.HEAD_OUTPUTS, specs.ORIGINAL_SIZE))
        return detection_tensors(*select(boxes, logits, presence, size, pb.read_options(request)))

    def execute(self, requests):
        return pb.respond(requests, self._run)
