"""`DartClient`: the `dart` / `dart_ensemble` request contract over Triton gRPC or HTTP."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Literal, TypeVar

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
# Status of a request that never reached a server: nothing listening, connection reset.
UNAVAILABLE = "UNAVAILABLE"
# Statuses worth retrying: the server is (re)starting or gone for now. The gRPC code, HTTP
# 503, and a connection failure; never INVALID_ARGUMENT (the same request fails again).
_RETRYABLE = frozenset({"StatusCode.UNAVAILABLE", "503", UNAVAILABLE})
T = TypeVar("T")


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
        raise DartClientError(f"cannot reach Triton at {url}: {e}", UNAVAILABLE) from e


def is_unavailable(error: DartClientError) -> bool:
    """True when ``error`` says the server could not take the request now (worth a retry)."""
    return error.status in _RETRYABLE


def retry_unavailable(
    call: Callable[[], T],
    retries: int,
    backoff: float,
    *,
    backoff_max: float = float("inf"),
    first: int = 0,
    sleep: Callable[[float], None] = time.sleep,
    before_retry: Callable[[], None] | None = None,
) -> T:
    """``call()``, repeated while it fails with UNAVAILABLE, at most ``retries`` times in all.

    Retry n (1-based) waits ``backoff * 2**(n-1)`` seconds first, at most ``backoff_max``.
    ``first`` is how many retries were already spent (1 when an asynchronous attempt
    failed). Any other error, or the last UNAVAILABLE one, is raised.
    """
    attempt = first
    while True:
        if attempt:
            sleep(min(backoff * 2 ** (attempt - 1), backoff_max))
            if before_retry is not None:
                before_retry()
        try:
            return call()
        except DartClientError as e:
            if attempt >= retries or not is_unavailable(e):
                raise
        attempt += 1


def _quiet_gevent() -> None:
    """Stop gevent printing a traceback for every failed HTTP request greenlet.

    The failure is re-raised from ``get_result`` as a DartClientError anyway, so
    the hub's printout (on by default, per thread) would only duplicate it.
    """
    import gevent

    gevent.get_hub().exception_stream = None


class DetectionFuture:
    """A pending `detect_async` request; ``result()`` blocks until it is answered.

    A request that failed with UNAVAILABLE is sent again (synchronously, by ``resend``).
    """

    def __init__(
        self,
        wait: Callable[[float | None], Detections],
        url: str,
        resend: Callable[[], Detections] | None = None,
    ) -> None:
        self._wait = wait
        self._url = url
        self._resend = resend

    def result(self, timeout: float | None = None) -> Detections:
        try:
            with _server_errors(self._url):
                return self._wait(timeout)
        except DartClientError as e:
            if self._resend is None or not is_unavailable(e):
                raise
            return self._resend()


class DartClient:
    """Client of the `dart` model (or `dart_ensemble`, same contract).

    Not thread-safe, as the underlying tritonclient clients are not: use one
    DartClient per thread. With ``protocol="http"``, ``concurrency`` is the size
    of the connection pool and so caps the requests `detect_async` keeps in flight.

    A detection request that fails with UNAVAILABLE (nothing listening: the server is
    restarting) is retried up to ``retries`` times, after ``retry_backoff``, then twice,
    four times that many seconds, ..., at most ``retry_backoff_max`` each (defaults: 3
    retries, 0.5 + 1 + 2 s). Other failures, INVALID_ARGUMENT above all, are never
    retried. ``retries=0`` turns it off.
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
        retries: int = 3,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 10.0,
    ) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        if min(retries, retry_backoff, retry_backoff_max) < 0:
            raise ValueError("retries, retry_backoff and retry_backoff_max must be >= 0")
        self.url = url or DEFAULT_URLS[protocol]
        self.protocol = protocol
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self._verbose = verbose
        self._concurrency = max(1, concurrency)
        # Imported here so that importing this module does not pull in both stacks.
        if protocol == "grpc":
            import tritonclient.grpc as tc

            self._outputs = [tc.InferRequestedOutput(n) for n in _OUTPUTS]
        else:
            import tritonclient.http as tc

            self._outputs = [tc.InferRequestedOutput(n, binary_data=True) for n in _OUTPUTS]
            _quiet_gevent()
        self._tc = tc
        self._client = self._connect()
        self._retired: list[Any] = []

    def _connect(self) -> Any:
        if self.protocol == "grpc":
            return self._tc.InferenceServerClient(self.url, verbose=self._verbose)
        return self._tc.InferenceServerClient(
            self.url,
            verbose=self._verbose,
            concurrency=self._concurrency,
            # None means "wait as long as it takes", as it does for gRPC.
            network_timeout=self.timeout if self.timeout is not None else 1e9,
        )

    def _reconnect(self) -> None:
        """A fresh gRPC channel before a retry: one that failed to connect waits out its
        own reconnect backoff (growing to minutes) and fails fast meanwhile."""
        if self.protocol == "grpc":
            self._retired.append(self._client)  # pending async requests may still use it
            self._client = self._connect()

    # --- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        for client in [*self._retired, self._client]:
            with contextlib.suppress(Exception):
                client.close()
        self._retired.clear()

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
        return self._retrying(lambda: self._detect_once(inputs, classes))

    def _retrying(self, call: Callable[[], T], first: int = 0) -> T:
        return retry_unavailable(
            call,
            self.retries,
            self.retry_backoff,
            backoff_max=self.retry_backoff_max,
            first=first,
            before_retry=self._reconnect,
        )

    def _detect_once(self, inputs: list[Any], classes: list[str]) -> Detections:
        with _server_errors(self.url):
            if self.protocol == "grpc":
                result = self._client.infer(
                    self.model, inputs, outputs=self._outputs, client_timeout=self.timeout
                )
            else:
                result = self._client.infer(self.model, inputs, outputs=self._outputs)
            return self._parse(result, classes)

    def _resend(self, inputs: list[Any], classes: list[str]) -> Callable[[], Detections] | None:
        """For a DetectionFuture: send again, synchronously, once its attempt was UNAVAILABLE."""
        if self.retries == 0:
            return None
        return lambda: self._retrying(lambda: self._detect_once(inputs, classes), first=1)

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
        resend = self._resend(inputs, classes)
        try:
            with _server_errors(self.url):
                if self.protocol == "grpc":
                    return self._send_grpc(inputs, classes, resend)
                request = self._client.async_infer(self.model, inputs, outputs=self._outputs)
        except DartClientError as e:
            if resend is None or not is_unavailable(e):
                raise
            done: Future[Detections] = Future()
            done.set_result(resend())
            return DetectionFuture(done.result, self.url)

        # HTTP requests run as greenlets that make progress whenever the caller blocks
        # in get_result, so waiting on the oldest also drives the younger ones.
        def wait(timeout: float | None) -> Detections:
            return self._parse(request.get_result(timeout=timeout), classes)

        return DetectionFuture(wait, self.url, resend)

    def _send_grpc(
        self,
        inputs: list[Any],
        classes: list[str],
        resend: Callable[[], Detections] | None,
    ) -> DetectionFuture:
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
        return DetectionFuture(fut.result, self.url, resend)

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
