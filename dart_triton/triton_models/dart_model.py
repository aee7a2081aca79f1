"""dart: the public detector, a BLS pipeline over the other models.

The orchestration (backbone ∥ text, enc_dec passes, padding, merging) is
`dart_triton.pipeline.orchestration`, shared with the in-process `DartPipeline`; this module only
binds its steps to BLS calls (`BlsRunner`) and maps errors to Triton codes. Frames
overlap across `dart` instances: while one instance waits on `backbone`, another's
`enc_dec` runs (inter-frame pipelining).

Errors: a bad request -> INVALID_ARGUMENT; a called model that fails -> INTERNAL naming
it, or UNAVAILABLE when it is down (a dead stub: retrying after a restart helps).
tritonserver 2.51's python backend counts an error *response* as a success in
`nv_inference_request_success` (a raised exception is counted as a failure but always
reaches the client as INTERNAL with a traceback), so `dart` counts its failures itself:
`dart_request_failures_total{code=...}`.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from dart_triton.contract import metrics, specs
from dart_triton.contract.parameters import DartParameters
from dart_triton.contract.passes import plan_passes
from dart_triton.model import image_files
from dart_triton.model.postprocess import select
from dart_triton.model.preprocess import preprocess_tensor
from dart_triton.pipeline.masks import detect_with_masks
from dart_triton.pipeline.orchestration import HeadOutputs, ModelCallError, run_graphs
from dart_triton.triton_models import pb
from dart_triton.triton_models.postprocess_model import detection_tensors, masks_tensor
from dart_triton.triton_models.step_metrics import StepMetrics

# What a called model says when its stub is gone or not loaded: retrying later can help.
# ("no available versions": the model is being loaded again after its stub died.)
_UNAVAILABLE_SIGNS = ("not healthy", "not ready", "unavailable", "stub process",
                      "no available versions")


def _unavailable(code: int | None, message: str) -> bool:
    return code == getattr(pb.pb_utils.TritonError, "UNAVAILABLE", None) or any(
        s in message.lower() for s in _UNAVAILABLE_SIGNS)


async def call_model(model: str, inputs: list, outputs: tuple[str, ...]) -> list:
    """One BLS call; any failure becomes a `ModelCallError` naming the model."""
    request = pb.pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                           requested_output_names=list(outputs))
    try:
        response = await request.async_exec()
    except Exception as exc:  # the call itself failed (e.g. the model is not loaded)
        raise ModelCallError(model, str(exc), _unavailable(None, str(exc))) from None
    if response.has_error():
        error = response.error()
        code = error.code() if callable(getattr(error, "code", None)) else None
        raise ModelCallError(model, error.message(), _unavailable(code, error.message()))
    tensors = [pb.pb_utils.get_output_tensor_by_name(response, name) for name in outputs]
    missing = [n for n, t in zip(outputs, tensors, strict=True) if t is None]
    if missing:
        raise ModelCallError(model, f"returned no {', '.join(missing)}")
    return tensors


class BlsRunner:
    """The orchestration's steps as BLS calls, each timed under its model's name. FPN
    features stay a Triton tensor from backbone to enc_dec (no copy); text features
    become torch tensors for slicing."""

    async def _call(self, model: str, inputs: list, outputs: tuple[str, ...]) -> list:
        with self.steps.time(model):
            return await call_model(model, inputs, outputs)

    def __init__(self, steps: StepMetrics, mask_levels: tuple[str, ...] = (),
                 shared_passes: bool = False, passes_in_flight: int = 0):
        self.steps = steps
        self.mask_levels = mask_levels  # backbone outputs mask_decoder reads
        # enc_dec batches requests: prompt rows travel as one item, [1, n, ...]
        # (`specs.shared_enc_dec_spec`; text_encoder's rows come so too)
        self.shared_passes = shared_passes
        self.passes_in_flight = passes_in_flight  # read by `run_graphs`

    async def backbone(self, pixel_values: torch.Tensor, mask_levels: bool = False):
        outputs = (specs.FPN_FEATURES, *(self.mask_levels if mask_levels else ()))
        levels = await self._call(
            specs.BACKBONE, [pb.from_torch(specs.PIXEL_VALUES, pixel_values)], outputs)
        return levels if mask_levels else levels[0]

    async def text(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        classes = np.array([n.encode("utf-8") for n in names], dtype=object)
        features, mask = await self._call(
            specs.TEXT_ENCODER, [pb.pb_utils.Tensor(specs.CLASSES, classes)],
            (specs.TEXT_FEATURES, specs.TEXT_MASK))
        features, mask = pb.as_torch(features), pb.as_torch(mask)
        return (features[0], mask[0]) if self.shared_passes else (features, mask)

    async def enc_dec(self, features, text_features: torch.Tensor,
                      text_mask: torch.Tensor, mask_inputs: bool = False) -> HeadOutputs:
        if self.shared_passes:  # one item: the frame (as it came) and its rows
            text_features, text_mask = text_features[None], text_mask[None]
        outs = await self._call(specs.ENC_DEC, [
            features,
            pb.from_torch(specs.TEXT_FEATURES, text_features),
            pb.from_torch(specs.TEXT_MASK, text_mask),
        ], (*specs.HEAD_OUTPUTS, *(specs.MASK_INPUTS if mask_inputs else ())))
        # Zero-copy torch views: GPU outputs (the torch backend) stay on the GPU, and
        # `select` runs NMS there; CPU outputs are numpy underneath.
        head = (pb.as_torch(t) for t in outs)
        return HeadOutputs(*((t[0] for t in head) if self.shared_passes else head))

    async def mask_decoder(self, levels: list, encoder_memory: torch.Tensor,
                           text_features: torch.Tensor, text_mask: torch.Tensor,
                           kept_queries: torch.Tensor) -> torch.Tensor:
        (logits,) = await self._call(specs.MASK_DECODER, [
            *levels,  # the backbone's own output tensors, passed on as they are
            pb.from_torch(specs.ENCODER_MEMORY, encoder_memory.contiguous()),
            pb.from_torch(specs.TEXT_FEATURES, text_features.contiguous()),
            pb.from_torch(specs.TEXT_MASK, text_mask.contiguous()),
            pb.from_torch(specs.KEPT_QUERIES, kept_queries.contiguous()),
        ], (specs.MASK_LOGITS,))
        return pb.as_torch(logits)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.params = pb.model_parameters(args, DartParameters)
        self.device = pb.device_of(args)
        self.steps = StepMetrics()
        self.runner = BlsRunner(self.steps, tuple(filter(None, self.params.mask_levels.split(","))),
                                self.params.shared_passes, self.params.passes_in_flight)
        family = pb.pb_utils.MetricFamily
        # The family must outlive its metrics: keep both on the instance.
        self.failure_family = family(
            name=metrics.REQUEST_FAILURES,
            description="dart requests answered with an error, by Triton error code",
            kind=family.COUNTER)
        self.failures = {code: self.failure_family.Metric(labels={"code": code})
                         for code in metrics.FAILURE_CODES}

    async def _run(self, request) -> list:
        steps = self.steps
        with steps.time("read"):
            req = pb.read_request(request)
        with steps.time("preprocess"):  # an image file is decoded here too
            image = (torch.from_numpy(req.image).to(self.device) if req.image is not None
                     else image_files.decode(req.image_bytes, self.device))
            pixels = preprocess_tensor(image, self.params.imgsz)
        passes = plan_passes(len(req.names), self.params.max_classes,
                             self.params.enc_dec_buckets)
        if req.masks.return_masks:
            return await self._run_with_masks(req, pixels, image.shape[:2], passes)
        head = await run_graphs(self.runner, pixels, req.names, passes)
        with steps.time("select"):
            kept = select(*head.detection, image.shape[:2], req.options)
        with steps.time("respond"):
            return [*detection_tensors(*kept), masks_tensor(None)]

    async def _run_with_masks(self, req, pixels, size, passes) -> list:
        if not self.params.masks:
            raise ValueError("RETURN_MASKS: this repository was built without masks; build "
                             "one with `dart-triton build --masks` to serve them")
        size = (int(size[0]), int(size[1]))
        kept, rles = await detect_with_masks(self.runner, pixels, req.names, passes, size,
                                             req.options, req.masks, self.params.max_classes)
        with self.steps.time("respond"):
            return [*detection_tensors(*kept), masks_tensor(rles)]

    def _error(self, exc: BaseException):
        self.failures[pb.error_code(exc)].increment(1)
        return pb.error_response(exc)

    async def execute(self, requests):
        results = await asyncio.gather(*(self._run(r) for r in requests),
                                       return_exceptions=True)
        return [self._error(r) if isinstance(r, BaseException)
                else pb.pb_utils.InferenceResponse(output_tensors=r) for r in results]
