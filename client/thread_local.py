"""`ThreadLocalDetector`: one DartClient per thread, for thread pools."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from dart_triton.contract.detections import Detections

from .endpoints import Endpoints
from .inputs import class_list
from .server_errors import parse_urls
from .triton_client import DEFAULT_URLS, DartClient, Transport


class ThreadLocalDetector:
    """A ``image -> Detections`` callable that is safe to call from many threads.

    Each thread gets its own DartClient, since tritonclient clients are not
    thread-safe; the thread pool's size is then the number of requests in flight.
    With several URLs the clients share one rotation and one view of which servers
    are set aside, so the threads together spread requests evenly and all avoid a
    server as soon as one of them finds it gone.
    """

    def __init__(
        self,
        classes: Sequence[str],
        url: str | Sequence[str] | None = None,
        protocol: Transport = "grpc",
        model: str = "dart",
        *,
        retries: int | None = None,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 2.0,
        **options: Any,
    ) -> None:
        self.classes = class_list(classes)
        urls = parse_urls(url) or (DEFAULT_URLS.get(protocol, ""),)
        self.endpoints = Endpoints(urls, retry_backoff, retry_backoff_max)
        self._client_args = {
            "url": urls, "protocol": protocol, "model": model, "retries": retries,
            "retry_backoff": retry_backoff, "retry_backoff_max": retry_backoff_max,
            "endpoints": self.endpoints,
        }  # fmt: skip
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
