"""dart: the public detector, a BLS pipeline over the other models.

Per request: check inputs → preprocess (in process) → backbone ∥ text_encoder (async
BLS, at once) → enc_dec on chunks of ≤ max_classes prompts (all chunks in flight) →
postprocess (in process). The backbone runs once, whatever the number of classes.
Frames overlap across `dart` instances: while one instance waits on `backbone`,
another's `enc_dec` runs (inter-frame pipelining).
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from dart_triton import specs
from dart_triton.buckets import pad_to_bucket, plan_passes
from dart_triton.pipelines import chunk_slices
from dart_triton.postprocess import merge_chunks, select
from dart_triton.preprocess import preprocess_tensor
from dart_triton.triton import pb
from dart_triton.triton.postprocess_model import detection_tensors
from dart_triton.validation import check_image, check_options, decode_class_names


async def _call(model: str, inputs: list, outputs: list[str]) -> list:
    request = pb.pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                           requested_output_names=outputs)
    response = await request.async_exec()
    if response.has_error():
        raise ValueError(f"{model}: {response.error().message()}")
    return [pb.pb_utils.get_output_tensor_by_name(response, name) for name in outputs]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = pb.model_params(args)
        self.imgsz = int(params["imgsz"])
        self.max_classes = int(params["max_classes"])
        self.buckets = sorted(int(b) for b in params.get("enc_dec_buckets", "").split(",") if b)
        self.device = pb.device_of(args)

    def _passes(self, n: int) -> list[tuple[int, int, int]]:
        """(start, stop, padded rows) per enc_dec pass; padding only with TensorRT buckets."""
        if self.buckets:
            return plan_passes(n, [b for b in self.buckets if b <= self.max_classes])
        return [(s.start, s.stop, s.stop - s.start) for s in chunk_slices(n, self.max_classes)]

    async def _decode(self, features, text_features: torch.Tensor, text_mask: torch.Tensor,
                      start: int, stop: int, rows: int):
        feats, mask = pad_to_bucket(text_features[start:stop], text_mask[start:stop], rows)
        outs = await _call("enc_dec", [
            features,
            pb.from_torch(specs.TEXT_FEATURES, feats),
            pb.from_torch(specs.TEXT_MASK, mask),
        ], [specs.PRED_BOXES, specs.PRED_LOGITS, specs.PRESENCE_LOGITS])
        return tuple(pb.as_numpy(t)[: stop - start] for t in outs)

    async def _run(self, request) -> list:
        image_tensor = pb.required_input(request, specs.IMAGE)
        classes_tensor = pb.required_input(request, specs.CLASSES)
        image = check_image(pb.as_numpy(image_tensor))
        names = decode_class_names(pb.as_numpy(classes_tensor))
        options = pb.request_options(request)
        check_options(**options)

        pixels = preprocess_tensor(torch.from_numpy(image).to(self.device), self.imgsz)
        (features,), (text_features, text_mask) = await asyncio.gather(
            _call("backbone", [pb.from_torch(specs.PIXEL_VALUES, pixels)], [specs.FPN_FEATURES]),
            _call("text_encoder", [pb.pb_utils.Tensor(specs.CLASSES, pb.as_numpy(classes_tensor))],
                  [specs.TEXT_FEATURES, specs.TEXT_MASK]),
        )
        text_features, text_mask = pb.as_torch(text_features), pb.as_torch(text_mask)
        chunks = await asyncio.gather(*(
            self._decode(features, text_features, text_mask, *p)
            for p in self._passes(len(names))))
        return detection_tensors(*select(*merge_chunks(list(chunks)), np.array(image.shape[:2]),
                                         **options))

    async def execute(self, requests):
        results = await asyncio.gather(*(self._run(r) for r in requests),
                                       return_exceptions=True)
        responses = []
        for result in results:
            if isinstance(result, ValueError):
                responses.append(pb.error_response(result))
            elif isinstance(result, BaseException):
                responses.append(pb.error_response(RuntimeError(f"internal error: {result!r}")))
            else:
                responses.append(pb.pb_utils.InferenceResponse(output_tensors=result))
        return responses
