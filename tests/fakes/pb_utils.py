"""A stand-in for Triton's `triton_python_backend_utils`, enough to run our python
models in process (the pattern of tensorrtllm_backend's model unit tests).

BLS calls (`InferenceRequest.exec/async_exec`) are routed to in-process model
instances registered in `MODELS`, so the `dart` BLS logic runs without a server.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

MODELS: dict[str, object] = {}


class TritonError:
    # The codes tritonserver 2.51's python backend offers (probed on the bundled server).
    (UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS,
     CANCELLED) = range(8)

    def __init__(self, msg: str, code: int = 1):
        self._msg, self._code = msg, code

    def message(self) -> str:
        return self._msg

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    pass


class Tensor:
    def __init__(self, name: str, value: np.ndarray):
        self._name, self._value = name, np.asarray(value)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._value

    def is_cpu(self) -> bool:
        return True

    # (name, object) for every from_dlpack call: what python_backend would have been given
    dlpack_given: ClassVar[list[tuple[str, object]]] = []

    @classmethod
    def from_dlpack(cls, name, value):
        """Records what it was handed. The real one synchronises streams only for an
        object with ``__dlpack__`` (it passes its own stream); a capsule carries none."""
        cls.dlpack_given.append((name, value))
        try:
            return cls(name, np.from_dlpack(value))
        except BufferError:  # device memory (a CUDA tensor): numpy takes host memory only
            return cls(name, value.cpu().numpy())


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self.output_tensors, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class ResponseSender:
    """What a request's sender was given: (response, flags), in order."""

    def __init__(self):
        self.sent: list[tuple[InferenceResponse, int]] = []

    def send(self, response=None, flags: int = 0) -> None:
        self.sent.append((response, flags))


class Request:
    def __init__(self, inputs: list[Tensor], requested: list[str] | None = None):
        self.inputs = {t.name(): t for t in inputs}
        self.requested = requested
        self.sender = ResponseSender()

    def requested_output_names(self) -> list[str]:
        return list(self.requested or [])

    def get_response_sender(self) -> ResponseSender:
        return self.sender


def answers(requests: list[Request], returned) -> list[InferenceResponse]:
    """Each request's one response: as `execute` returned them, or (returned None) as
    sent through the requests' senders, each exactly once, final."""
    if returned is not None:
        return list(returned)
    for r in requests:
        assert len(r.sender.sent) == 1, r.sender.sent
        assert r.sender.sent[0][1] == TRITONSERVER_RESPONSE_COMPLETE_FINAL
    return [r.sender.sent[0][0] for r in requests]


def get_input_tensor_by_name(request: Request, name: str):
    return request.inputs.get(name)


def get_output_tensor_by_name(response: InferenceResponse, name: str):
    return next((t for t in response.output_tensors if t.name() == name), None)


class InferenceRequest:
    calls: ClassVar[list[tuple[str, dict[str, tuple]]]] = []

    def __init__(self, model_name: str, inputs: list[Tensor], requested_output_names: list[str]):
        self.model_name, self.inputs, self.outputs = model_name, inputs, requested_output_names

    def exec(self) -> InferenceResponse:
        InferenceRequest.calls.append(
            (self.model_name, {t.name(): t.as_numpy().shape for t in self.inputs}))
        request = Request(self.inputs, self.outputs)
        response = answers([request], MODELS[self.model_name].execute([request]))[0]
        if not response.has_error():
            response.output_tensors = [t for t in response.output_tensors
                                       if t.name() in self.outputs]
        return response

    async def async_exec(self) -> InferenceResponse:
        return self.exec()


class MetricFamily:
    COUNTER, GAUGE = 0, 1

    def __init__(self, name: str, description: str, kind: int):
        self.name = name

    def Metric(self, labels: dict):
        return Metric()


class Metric:
    def __init__(self):
        self.value = 0.0

    def increment(self, v: float) -> None:
        self.value += v
