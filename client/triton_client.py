"""`DartClient`: the `dart` / `dart_ensemble` request contract over Triton gRPC or HTTP."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Literal

import numpy as np
from tritonclient.utils import InferenceServerException

from dart_triton import specs

from .detections import Detections
from .errors import DartClientError
from .inputs import check_image, class_list, encode_classes, option_arrays
from .pipeline import in_order

Transport = Literal["grpc", "http"]
DEFAULT_URLS: dict[str, str] = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
_CONTRACT = specs.dart_spec(specs.GraphDims())
_OUTPUTS = (specs.BOXES, specs.SCORES, specs.CLASS_IDS)


@contextlib.contextmanager
def _server_errors(url: str) -> Iterator[None]:
    """Re-raise transport and server failures as DartClientError with the server's message."""
    try:
        yield
    except DartClientError:
        raise
    except InferenceServerException as e:
        status = e.status()
        raise DartClientError(e.message() or str(e), str(status) if status else None) from e
    except TimeoutError as e:  # an OSError too, but not a connection failure
        raise DartClientError(f"no answer from Triton at {url} in time: {e}", "TIMEOUT") from e
    except OSError as e:  # the HTTP client's connection refused / DNS / reset
        raise DartClientError(f"cannot reach Triton at {url}: {e}") from e


def _quiet_gevent() -> None:
    """Stop gevent printing a traceback for every failed HTTP request greenlet.

    The failure is re-raised from ``get_result`` as a DartClientError anyway, so
    the hub's printout (on by default, per thread) would only duplicate it.
    """
    import gevent

    gevent.get_hub().exception_stream = None


class DetectionFuture:
    """A pending `detect_async` request; ``result()`` blocks until it is answered."""

    def __init__(self, wait: Callable[[float | None], Detections], url: str) -> None:
        self._wait = wait
        self._url = url

    def result(self, timeout: float | None = None) -> Detections:
        with _server_errors(self._url):
            return self._wait(timeout)


class DartClient:
    """Client of the `dart` model (or `dart_ensemble`, same contract).

    Not thread-safe, as the underlying tritonclient clients are not: use one
    DartClient per thread. With ``protocol="http"``, ``concurrency`` is the size
    of the connection pool and so caps the requests `detect_async` keeps in flight.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: Transport = "grpc",
        model: str = "dart",
        *,
        concurrency: int = 4,
        timeout: float | None = 300.0,
        verbose: bool = False,
    ) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url = url or DEFAULT_URLS[protocol]
        self.protocol = protocol
        self.model = model
        self.timeout = timeout
        # Imported here so that importing this module does not pull in both stacks.
        if protocol == "grpc":
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(self.url, verbose=verbose)
            self._outputs = [tc.InferRequestedOutput(n) for n in _OUTPUTS]
        else:
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(
                self.url,
                verbose=verbose,
                concurrency=max(1, concurrency),
                # None means "wait as long as it takes", as it does for gRPC.
                network_timeout=timeout if timeout is not None else 1e9,
            )
            self._outputs = [tc.InferRequestedOutput(n, binary_data=True) for n in _OUTPUTS]
            _quiet_gevent()
        self._tc = tc

    # --- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DartClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- server info ------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when the server is live and the model is loaded; False when unreachable."""
        try:
            with _server_errors(self.url):
                return bool(
                    self._client.is_server_live() and self._client.is_model_ready(self.model)
                )
        except DartClientError:
            return False

    def model_metadata(self, model: str | None = None) -> dict[str, Any]:
        """Metadata of ``model`` (default: this client's model), as a dict."""
        with _server_errors(self.url):
            if self.protocol == "grpc":
                return self._client.get_model_metadata(model or self.model, as_json=True)
            return self._client.get_model_metadata(model or self.model)

    def model_config(self, model: str | None = None) -> dict[str, Any]:
        """Config of ``model`` (default: this client's model) as a dict.

        gRPC's ``{"config": ...}`` wrapper is removed so both protocols look alike.
        """
        with _server_errors(self.url):
            if self.protocol == "grpc":
                return self._client.get_model_config(model or self.model, as_json=True)["config"]
            return self._client.get_model_config(model or self.model)

    def imgsz(self) -> int | None:
        """The resolution the server runs at, from a ``parameters { key: "imgsz" }`` entry.

        Looked up on the model, then on `preprocess` (an ensemble has no parameters
        of its own); None when neither says.
        """
        for model in (self.model, "preprocess"):
            try:
                value = config_parameter(self.model_config(model), "imgsz")
            except DartClientError:
                continue
            if value and value.strip().isdigit():
                return int(value)
        return None

    # --- inference --------------------------------------------------------------------
    def _inputs(
        self,
        image: np.ndarray,
        classes: Sequence[str],
        score_threshold: float | None,
        nms_iou: float | None,
        max_detections: int | None,
    ) -> list[Any]:
        arrays = {
            specs.IMAGE: check_image(image),
            specs.CLASSES: encode_classes(classes),
            **option_arrays(score_threshold, nms_iou, max_detections),
        }
        inputs = []
        for name, array in arrays.items():
            dtype = _CONTRACT.input(name).triton_dtype
            tensor = self._tc.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def _parse(self, result: Any, classes: Sequence[str]) -> Detections:
        arrays = [result.as_numpy(name) for name in _OUTPUTS]
        missing = [n for n, a in zip(_OUTPUTS, arrays, strict=True) if a is None]
        if missing:
            raise DartClientError(f"model {self.model!r} returned no {', '.join(missing)}")
        try:
            return Detections(*arrays, class_names=tuple(classes))
        except ValueError as e:  # a server answering off-contract is a server error
            raise DartClientError(f"malformed response from {self.model!r}: {e}") from e

    def detect(
        self,
        image: np.ndarray,
        classes: Sequence[str],
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
    ) -> Detections:
        """Detect ``classes`` in one RGB uint8 ``[H, W, 3]`` image.

        Options left as None are not sent, so the server's defaults apply.
        """
        classes = class_list(classes)
        inputs = self._inputs(image, classes, score_threshold, nms_iou, max_detections)
        with _server_errors(self.url):
            if self.protocol == "grpc":
                result = self._client.infer(
                    self.model, inputs, outputs=self._outputs, client_timeout=self.timeout
                )
            else:
                result = self._client.infer(self.model, inputs, outputs=self._outputs)
            return self._parse(result, classes)

    def detect_async(
        self,
        image: np.ndarray,
        classes: Sequence[str],
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
    ) -> DetectionFuture:
        """Send one request without waiting; ``.result()`` on the return value waits."""
        classes = class_list(classes)
        inputs = self._inputs(image, classes, score_threshold, nms_iou, max_detections)
        with _server_errors(self.url):
            if self.protocol == "grpc":
                return self._send_grpc(inputs, classes)
            request = self._client.async_infer(self.model, inputs, outputs=self._outputs)

        # HTTP requests run as greenlets that make progress whenever the caller blocks
        # in get_result, so waiting on the oldest also drives the younger ones.
        def wait(timeout: float | None) -> Detections:
            return self._parse(request.get_result(timeout=timeout), classes)

        return DetectionFuture(wait, self.url)

    def _send_grpc(self, inputs: list[Any], classes: list[str]) -> DetectionFuture:
        fut: Future[Detections] = Future()

        def done(result: Any, error: InferenceServerException | None) -> None:
            # Runs on a gRPC thread: hand everything, errors included, to the future.
            try:
                if error is not None:
                    raise error
                fut.set_result(self._parse(result, classes))
            except Exception as e:
                fut.set_exception(e)

        self._client.async_infer(
            self.model, inputs, done, outputs=self._outputs, client_timeout=self.timeout
        )
        return DetectionFuture(fut.result, self.url)

    def detect_stream(
        self,
        frames: Iterable[np.ndarray],
        classes: Sequence[str],
        in_flight: int = 4,
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
    ) -> Iterator[Detections]:
        """Detections of each frame, in input order, with ``in_flight`` requests pending."""
        classes = class_list(classes)

        def submit(frame: np.ndarray) -> DetectionFuture:
            return self.detect_async(frame, classes, score_threshold, nms_iou, max_detections)

        for _, detections in in_order(frames, submit, in_flight):
            yield detections


def config_parameter(config: dict[str, Any], key: str) -> str | None:
    """A ``parameters { key: ... }`` value of a model config dict, or None when absent."""
    value = (config.get("parameters") or {}).get(key)
    if isinstance(value, dict):
        return value.get("string_value")
    return None if value is None else str(value)


class ThreadLocalDetector:
    """A ``image -> Detections`` callable that is safe to call from many threads.

    Each thread gets its own DartClient, since tritonclient clients are not
    thread-safe; the thread pool's size is then the number of requests in flight.
    """

    def __init__(
        self,
        classes: Sequence[str],
        url: str | None = None,
        protocol: Transport = "grpc",
        model: str = "dart",
        **options: Any,
    ) -> None:
        self.classes = class_list(classes)
        self._client_args = {"url": url, "protocol": protocol, "model": model}
        self._options = options
        self._local = threading.local()
        self._clients: list[DartClient] = []
        self._lock = threading.Lock()

    def client(self) -> DartClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = DartClient(**self._client_args, concurrency=1)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def __call__(self, image: np.ndarray) -> Detections:
        return self.client().detect(image, self.classes, **self._options)

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                with contextlib.suppress(Exception):
                    client.close()
            self._clients.clear()
