"""preprocess: IMAGE UINT8 [H, W, 3] -> pixel_values [1, 3, S, S] + original_size.

In `dart_ensemble` it is also the gate: the request's CLASSES and options are checked
here, and the names go on to `text_encoder` as checked_classes, so that every bad
request fails in the first step, before any other step runs. The ensemble makes one
`enc_dec` pass, so more classes than its `max_classes` are refused first of all.
"""

from __future__ import annotations

import numpy as np
import torch

from dart_triton.contract import specs
from dart_triton.contract.parameters import PreprocessParameters
from dart_triton.contract.validation import check_class_count, check_image, decode_class_names
from dart_triton.model.preprocess import preprocess_tensor
from dart_triton.triton_models import pb


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = pb.model_parameters(args, PreprocessParameters)
        self.imgsz = params.imgsz
        # The enc_dec pass size: all `dart_ensemble` can take (`dart` splits larger lists).
        self.max_classes = params.max_classes
        self.device = pb.device_of(args)

    def _check_count(self, classes: np.ndarray) -> None:
        check_class_count(classes.size)  # over any model's limit: `dart` would not help
        if classes.size > self.max_classes:
            raise ValueError(
                f"{specs.DART_ENSEMBLE} takes at most {self.max_classes} classes per request "
                f"(got {classes.size}); send larger class lists to the `{specs.DART}` model, "
                "which splits them into passes")

    def _run(self, request) -> list:
        classes = pb.optional_input(request, specs.CLASSES)
        if classes is not None:  # the ensemble's gate: its limit before any other work
            self._check_count(pb.as_numpy(classes))
        image = check_image(pb.as_numpy(pb.required_input(request, specs.IMAGE)))
        if classes is not None:
            decode_class_names(pb.as_numpy(classes))
        pb.read_options(request)  # checked here, at the gate; postprocess reads them again
        pixels = preprocess_tensor(torch.from_numpy(image).to(self.device), self.imgsz)
        size = np.array(image.shape[:2], dtype=np.int32)
        outputs = [pb.from_torch(specs.PIXEL_VALUES, pixels),
                   pb.pb_utils.Tensor(specs.ORIGINAL_SIZE, size)]
        if classes is not None:
            outputs.append(pb.pb_utils.Tensor(specs.CHECKED_CLASSES, pb.as_numpy(classes)))
        return outputs

    def execute(self, requests):
        return pb.respond(requests, self._run)
