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
from dart_triton.contract.validation import check_class_count, decode_class_names
from dart_triton.model import image_files
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
        # CLASSES is checked here although Triton's config declares it required: with the
        # image inputs optional, tritonserver 2.51 counts a request's inputs, not their
        # names, and lets one without CLASSES into the ensemble (which then deadlocks).
        classes = pb.as_numpy(pb.required_input(request, specs.CLASSES))
        self._check_count(classes)  # the ensemble's gate: its limit before any other work
        pixels, data = pb.read_image(request)
        decode_class_names(classes)
        pb.read_options(request)  # checked here, at the gate; postprocess reads them again
        if pb.read_mask_options(request).return_masks:
            raise ValueError(f"{specs.DART_ENSEMBLE} returns boxes only: send RETURN_MASKS "
                             f"to the `{specs.DART}` model for masks")
        image = (torch.from_numpy(pixels).to(self.device) if pixels is not None
                 else image_files.decode(data, self.device))  # the costly part, last
        size = np.array(image.shape[:2], dtype=np.int32)
        outputs = [pb.from_torch(specs.PIXEL_VALUES, preprocess_tensor(image, self.imgsz)),
                   pb.pb_utils.Tensor(specs.ORIGINAL_SIZE, size)]
        outputs.append(pb.pb_utils.Tensor(specs.CHECKED_CLASSES, classes))
        return outputs

    def execute(self, requests):
        return pb.respond(requests, self._run)
