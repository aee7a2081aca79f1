"""`DartClient`: the `dart` / `dart_ensemble` request contract over Triton gRPC or HTTP, to
one server or spread over several."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from tritonclient.utils import InferenceServerException

from dart_triton.contract import specs
from dart_triton.contract.detections import Detections

from .endpoints import Endpoints, call_spread
from .errors import DartClientError
from .inputs import class_list
from .pipeline import completed, in_order, interleaved
from .request import Request, build_request, parse_result, requested_outputs
from .server_errors import (
    NO_MODEL,
    config_parameter,
    is_unavailable,
    parse_urls,
    quiet_gevent,
    server_errors,
)

Transport = Literal["grpc", "http"]
# How long a request waits for a server to come back (a restart on a GPU: weights read,
# CUDA graphs captured; minutes when graphs are compiled at load).
DEFAULT_RETRY_DEADLINE = 180.0
DEFAULT_URLS: dict[str, str] = {p: f"127.0.0.1:{port}" for p, port in specs.DEFAULT_PORTS.items()
                                 if p != "metrics"}
T = TypeVar("T")


class DetectionFuture:
    """A pending `detect_async` request; ``result()`` blocks until it is answered.

    A request whose server could not take it is handed to ``resend`` with the failure,
    which sends it again (synchronously) or raises.
    """

    def __init__(
        self,
        wait: Callable[[float | None], Detections],
        url: str,
        resend: Callable[[DartClientError], Detections] | None = None,
    ) -> None:
        self._wait = wait
        self._url = url
        self._resend = resend

    def result(self, timeout: float | None = None) -> Detections:
        try:
            with server_errors(self._url):
                return self._wait(timeout)
        except DartClientError as e:
            if self._resend is None:
                raise
            return self._resend(e)


@dataclass
class _Connection:
    """This client's tritonclient client for one server; ``generation``: the server's
    failure count when it was made (a later failure makes it stale)."""

    client: Any
    generation: int


class DartClient:
    """Client of the `dart` model (or `dart_ensemble`, same contract).

    ``url`` is one Triton address or several: requests then go round robin over them
    (``in_flight`` of `detect_stream` still counts them all). A server that fails a
    request (unreachable, restarting, or without the model just now) is set aside for a
    while and the request goes to the next server at once; see `Endpoints`.
    ``endpoints`` shares that rotation and health with other clients of the same servers
    (`ThreadLocalDetector` makes one per thread).

    Not thread-safe, as the underlying tritonclient clients are not: use one
    DartClient per thread. With ``protocol="http"``, ``concurrency`` is the size
    of each server's connection pool and so caps the requests `detect_async` keeps in
    flight there.

    A detection request that fails on every server because none can take it now
    (UNAVAILABLE: nothing listening while a server restarts, or a called model down; a
    python-backend stub that died: INTERNAL "Stub process ... is not healthy") is sent
    again after ``retry_backoff``, then twice, four times that many seconds, ..., at most
    ``retry_backoff_max`` apart, until ``retry_deadline`` seconds have passed (default
    180: a restart on a GPU, weights read and CUDA graphs captured, fits) or, if given,
    ``retries`` times. Other failures, INVALID_ARGUMENT above all, are never retried.
    ``retries=0`` turns waiting off (a request still moves on to another server at once).
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        protocol: Transport = "grpc",
        model: str = "dart",
        *,
        concurrency: int = 4,
        timeout: float | None = 300.0,
        verbose: bool = False,
        retries: int | None = None,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 2.0,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE,
        endpoints: Endpoints | None = None,
    ) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        if min(retries or 0, retry_backoff, retry_backoff_max, retry_deadline) < 0:
            raise ValueError("retries, retry_backoff, retry_backoff_max and retry_deadline "
                             "must be >= 0")
        urls = parse_urls(url) or (endpoints.urls if endpoints else (DEFAULT_URLS[protocol],))
        if endpoints is None:
            endpoints = Endpoints(urls, retry_backoff, retry_backoff_max)
        elif endpoints.urls != urls:
            raise ValueError(f"endpoints are {endpoints.urls}, not the URLs given {urls}")
        self.urls = urls
        self.url = ",".join(urls)  # for messages: the one address, or all of them
        self.protocol = protocol
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.retry_deadline = retry_deadline
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self._endpoints = endpoints
        self._verbose = verbose
        self._concurrency = max(1, concurrency)
        # Imported here so that importing this module does not pull in both stacks.
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc

            quiet_gevent()
        self._tc = tc
        self._outputs = requested_outputs(tc, protocol)
        self._connections = [
            _Connection(self._connect(u), endpoints.generation(i)) for i, u in enumerate(urls)
        ]
        self._retired: list[Any] = []

    def _connect(self, url: str) -> Any:
        if self.protocol == "grpc":
            return self._tc.InferenceServerClient(url, verbose=self._verbose)
        return self._tc.InferenceServerClient(
            url,
            verbose=self._verbose,
            concurrency=self._concurrency,
            # None means "wait as long as it takes", as it does for gRPC.
            network_timeout=self.timeout if self.timeout is not None else 1e9,
        )

    def _reconnect(self) -> None:
        """Fresh gRPC channels to the servers that failed since theirs were made: a channel
        that failed to connect waits out its own reconnect backoff (growing to minutes)
        and fails fast meanwhile. Called before each retry on such a server."""
        for i, conn in enumerate(self._connections):
            generation = self._endpoints.generation(i)
            if conn.generation == generation:
                continue
            if self.protocol == "grpc":
                self._retired.append(conn.client)  # pending async requests may still use it
                conn.client = self._connect(self.urls[i])
            conn.generation = generation

    def _client(self, i: int) -> Any:
        """This client's connection to server ``i``, fresh if the server failed since."""
        if self._connections[i].generation != self._endpoints.generation(i):
            self._reconnect()
        return self._connections[i].client

    def _is_gone(self, error: DartClientError) -> bool:
        """Whether a detection request should leave the server that failed it.

        Besides UNAVAILABLE: with several servers, one that has not got the model (a
        draining Triton unloads it while still answering: NOT_FOUND for seconds) sends the
        request to another. With one there is nowhere else to go: that error is final.
        """
        return is_unavailable(error) or (len(self.urls) > 1 and error.status in NO_MODEL)

    def _spread(
        self,
        call: Callable[[int], T],
        *,
        retries: int | None = None,
        is_gone: Callable[[DartClientError], bool] | None = None,
        tried: Sequence[int] = (),
        last: DartClientError | None = None,
    ) -> T:
        return call_spread(
            self._endpoints,
            call,
            retries=self.retries if retries is None else retries,
            deadline=self.retry_deadline,
            backoff=self.retry_backoff,
            backoff_max=self.retry_backoff_max,
            is_gone=is_gone or self._is_gone,
            is_transient=is_unavailable,
            tried=tried,
            last=last,
        )

    def _report(self, i: int, generation: int, error: DartClientError | None) -> None:
        """Tell the shared health what an asynchronous request to server ``i`` found."""
        if error is not None and self._is_gone(error):
            self._endpoints.failed(i, generation)
        else:
            self._endpoints.succeeded(i, generation)

    # --- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        for client in [*self._retired, *(c.client for c in self._connections)]:
            with contextlib.suppress(Exception):
                client.close()
        self._retired.clear()

    def __enter__(self) -> DartClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- server info ------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when a server is live with the model loaded; False when none is."""
        return len(self.unready()) < len(self.urls)

    def unready(self) -> list[str]:
        """The URLs whose server is not live with the model loaded (each one is asked).

        With several servers, those are set aside for a while.
        """
        missing = []
        for i, url in enumerate(self.urls):
            generation = self._endpoints.generation(i)
            client = self._client(i)
            try:
                with server_errors(url):
                    ok = bool(client.is_server_live() and client.is_model_ready(self.model))
            except DartClientError:
                ok = False
            if ok:
                self._endpoints.succeeded(i, generation)
            else:
                missing.append(url)
                if len(self.urls) > 1:
                    self._endpoints.failed(i, generation)
        return missing

    def _ask(self, question: Callable[[Any], T]) -> T:
        """``question(client)`` answered by the first server that can be reached (no wait).

        Only an unreachable server is passed over: the model a question is about may
        rightly be missing everywhere (`imgsz` asks about `preprocess`).
        """

        def call(i: int) -> T:
            with server_errors(self.urls[i]):
                return question(self._client(i))

        return self._spread(call, retries=0, is_gone=is_unavailable)

    def model_metadata(self, model: str | None = None) -> dict[str, Any]:
        """Metadata of ``model`` (default: this client's model), as a dict."""
        if self.protocol == "grpc":
            return self._ask(lambda c: c.get_model_metadata(model or self.model, as_json=True))
        return self._ask(lambda c: c.get_model_metadata(model or self.model))

    def model_config(self, model: str | None = None) -> dict[str, Any]:
        """Config of ``model`` (default: this client's model) as a dict.

        gRPC's ``{"config": ...}`` wrapper is removed so both protocols look alike.
        """
        if self.protocol == "grpc":
            return self._ask(
                lambda c: c.get_model_config(model or self.model, as_json=True)["config"]
            )
        return self._ask(lambda c: c.get_model_config(model or self.model))

    def imgsz(self) -> int | None:
        """The resolution the server runs at, from a ``parameters { key: "imgsz" }`` entry.

        Looked up on the model, then on `preprocess` (an ensemble has no parameters
        of its own); None when neither says.
        """
        for model in (self.model, specs.PREPROCESS):
            try:
                value = config_parameter(self.model_config(model), "imgsz")
            except DartClientError:
                continue
            if value and value.strip().isdigit():
                return int(value)
        return None

    # --- inference --------------------------------------------------------------------
    def _request(self, image: np.ndarray | bytes, classes: Sequence[str],
                 **options: Any) -> Request:
        return build_request(self._tc, self._outputs, image, classes, **options)

    def detect(
        self,
        image: np.ndarray | bytes,
        classes: Sequence[str],
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        *,
        masks: bool = False,
        mask_threshold: float = specs.DEFAULT_MASK_THRESHOLD,
    ) -> Detections:
        """Detect ``classes`` in one image: RGB uint8 ``[H, W, 3]`` pixels, or the bytes of
        a JPEG, PNG or WebP file (sent as they are, as IMAGE_BYTES; the server decodes them
        and applies their EXIF orientation).

        Options left as None are not sent, so the server's defaults apply. ``masks=True``
        (`dart` only) also returns each detection's mask, cut at ``mask_threshold``, as COCO
        RLE in ``Detections.masks`` at ``Detections.image_size`` (`client.masks` decodes).
        """
        request = self._request(image, classes, score_threshold=score_threshold,
                                nms_iou=nms_iou, max_detections=max_detections,
                                masks=masks, mask_threshold=mask_threshold)
        return self._spread(lambda i: self._detect_once(i, request))

    def _detect_once(self, i: int, request: Request) -> Detections:
        client = self._client(i)
        with server_errors(self.urls[i]):
            if self.protocol == "grpc":
                result = client.infer(self.model, request.inputs, outputs=request.outputs,
                                      client_timeout=self.timeout)
            else:
                result = client.infer(self.model, request.inputs, outputs=request.outputs)
            return parse_result(result, request, self.model)

    def _resend(self, i: int, request: Request) -> Callable[[DartClientError], Detections]:
        """For a DetectionFuture: once its attempt on server ``i`` failed with ``error``,
        send it again (synchronously) to the next server, or raise ``error``."""

        def resend(error: DartClientError) -> Detections:
            if not self._is_gone(error):
                raise error
            return self._spread(
                lambda j: self._detect_once(j, request), tried=[i], last=error
            )

        return resend

    def detect_async(
        self,
        image: np.ndarray | bytes,
        classes: Sequence[str],
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        *,
        masks: bool = False,
        mask_threshold: float = specs.DEFAULT_MASK_THRESHOLD,
    ) -> DetectionFuture:
        """Send one request without waiting; ``.result()`` on the return value waits.
        Options as `detect`'s."""
        request = self._request(image, classes, score_threshold=score_threshold,
                                nms_iou=nms_iou, max_detections=max_detections,
                                masks=masks, mask_threshold=mask_threshold)
        i = self._endpoints.pick()
        assert i is not None  # nothing is excluded
        generation, url = self._endpoints.generation(i), self.urls[i]
        resend = self._resend(i, request)
        try:
            with server_errors(url):
                if self.protocol == "grpc":
                    return self._send_grpc(i, generation, request, resend)
                pending = self._client(i).async_infer(self.model, request.inputs,
                                                      outputs=request.outputs)
        except DartClientError as e:
            self._report(i, generation, e)
            return DetectionFuture(completed(resend(e)).result, url)

        # HTTP requests run as greenlets that make progress whenever the caller blocks
        # in get_result, so waiting on the oldest also drives the younger ones.
        def wait(timeout: float | None) -> Detections:
            try:
                with server_errors(url):
                    answer = pending.get_result(timeout=timeout)
            except DartClientError as e:
                if e.status != "TIMEOUT":  # a slow answer says nothing of the server
                    self._report(i, generation, e)
                raise
            self._report(i, generation, None)
            return parse_result(answer, request, self.model)

        return DetectionFuture(wait, url, resend)

    def _send_grpc(
        self,
        i: int,
        generation: int,
        request: Request,
        resend: Callable[[DartClientError], Detections],
    ) -> DetectionFuture:
        fut: Future[Detections] = Future()
        url = self.urls[i]

        def done(result: Any, error: InferenceServerException | None) -> None:
            # Runs on a gRPC thread: hand everything, errors included, to the future,
            # and tell the shared health at once, so that new requests avoid a dead server.
            try:
                with server_errors(url):
                    if error is not None:
                        raise error
                self._report(i, generation, None)
                fut.set_result(parse_result(result, request, self.model))
            except DartClientError as e:
                if e.status != "StatusCode.DEADLINE_EXCEEDED":
                    self._report(i, generation, e)
                fut.set_exception(e)
            except Exception as e:
                fut.set_exception(e)

        self._client(i).async_infer(
            self.model, request.inputs, done, outputs=request.outputs, client_timeout=self.timeout
        )
        return DetectionFuture(fut.result, url, resend)

    def detect_stream(
        self,
        frames: Iterable[np.ndarray],
        classes: Sequence[str],
        in_flight: int = 4,
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        max_detections: int | None = None,
        **mask_options: Any,
    ) -> Iterator[Detections]:
        """Detections of each frame, in input order, with ``in_flight`` requests pending
        (over all servers together). ``mask_options``: masks, mask_threshold."""
        classes = class_list(classes)

        def submit(frame: np.ndarray) -> DetectionFuture:
            return self.detect_async(frame, classes, score_threshold, nms_iou, max_detections,
                                     **mask_options)

        for _, detections in in_order(frames, submit, in_flight):
            yield detections

    def detect_streams(
        self,
        streams: Sequence[Iterable[np.ndarray | bytes]],
        classes: Sequence[str],
        in_flight: int = 8,
        **options: Any,
    ) -> Iterator[tuple[int, Detections]]:
        """``(stream index, detections)`` for the frames of several streams (cameras) that
        share one budget: frames are taken round robin, ``in_flight`` requests pending over
        all of them; each stream's detections come in its frame order. ``options``:
        score_threshold, nms_iou, max_detections, masks, mask_threshold."""
        classes = class_list(classes)

        def submit(frame: np.ndarray | bytes) -> DetectionFuture:
            return self.detect_async(frame, classes, **options)

        for index, _, detections in interleaved(streams, submit, in_flight):
            yield index, detections


