"""preprocess: IMAGE UINT8 [H, W, 3] -> pixel_values [1, 3, S, S] + original_size."""

from __future__ import annotations

import numpy as np
import torch

from dart_triton import specs
from dart_triton.preprocess import preprocess_tensor
from dart_triton.triton import pb
from dart_triton.validation import check_image


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.imgsz = int(pb.model_params(args)["imgsz"])
        self.device = pb.device_of(args)

    def _run(self, request) -> list:
        image = check_image(pb.as_numpy(pb.required_input(request, specs.IMAGE)))
        pixels = preprocess_tensor(torch.from_numpy(image).to(self.device), self.imgsz)
        size = np.array(image.shape[:2], dtype=np.int32)
        return [pb.from_torch(specs.PIXEL_VALUES, pixels),
                pb.pb_utils.Tensor(specs.ORIGINAL_SIZE, size)]

    def execute(self, requests):
        return pb.respond(requests, self._run)
