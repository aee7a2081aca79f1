"""What a Triton failure means for a request: the server's message as a DartClientError,
which statuses are worth retrying, and the retry loop itself."""

from __future__ import annotations

import contextlib
import http.client
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tritonclient.utils import InferenceServerException

from .errors import DartClientError

# Status of a request that never reached a server: nothing listening, connection reset.
UNAVAILABLE = "UNAVAILABLE"
# Statuses worth retrying: the server is (re)starting or gone for now. The gRPC code, HTTP
# 503, and a connection failure; never INVALID_ARGUMENT (the same request fails again).
RETRYABLE = frozenset({"StatusCode.UNAVAILABLE", "503", UNAVAILABLE})
# Statuses of a server that has not got the model (for now): gRPC code, HTTP 404.
NO_MODEL = frozenset({"StatusCode.NOT_FOUND", "404"})
T = TypeVar("T")


@contextlib.contextmanager
def server_errors(url: str) -> Iterator[None]:
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
    except http.client.HTTPException as e:
        # geventhttpclient's HTTPConnectionClosed: the server went away before answering.
        closed = type(e).__name__ == "HTTPConnectionClosed"
        raise DartClientError(f"bad HTTP answer from Triton at {url}: {e!r}",
                              UNAVAILABLE if closed else None) from e


# tritonserver's answers while a model is replaced (its stub died, serve loads it again):
# the dead stub's INTERNAL, then NOT_FOUND for the moments the model has no version.
DEAD_STUB = re.compile(r"Stub process .* is not healthy|has no available versions")
# Statuses of a request the server refused as bad (gRPC code, HTTP 400): never retried.
REFUSED = frozenset({"StatusCode.INVALID_ARGUMENT", "400"})


def is_refusal(error: DartClientError) -> bool:
    """True when the server refused the request itself (e.g. a damaged image file)."""
    return error.status in REFUSED


class RefusalAsResult:
    """A pending request whose refusal by the server (e.g. a damaged image file) is its
    result rather than an exception: one bad input is skipped, the others go on."""

    def __init__(self, pending: Any):
        self.pending = pending

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self.pending.result(timeout)
        except DartClientError as e:
            if is_refusal(e):
                return e
            raise


def is_unavailable(error: DartClientError) -> bool:
    """True when ``error`` says the server could not take the request now (worth a retry):
    UNAVAILABLE, or a model whose python-backend stub died (tritonserver answers INTERNAL
    "Stub process '<instance>' is not healthy." until the model is loaded again)."""
    return error.status in RETRYABLE or DEAD_STUB.search(str(error)) is not None


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


def quiet_gevent() -> None:
    """Stop gevent printing a traceback for every failed HTTP request greenlet.

    The failure is re-raised from ``get_result`` as a DartClientError anyway, so
    the hub's printout (on by default, per thread) would only duplicate it.
    """
    import gevent

    gevent.get_hub().exception_stream = None


def parse_urls(url: str | Sequence[str] | None) -> tuple[str, ...]:
    """``url`` as a tuple of addresses; a comma-separated string counts as several, and an
    address listed twice counts once."""
    if not url:
        return ()
    items = [url] if isinstance(url, str) else list(url)
    urls = [u.strip() for item in items for u in item.split(",")]
    if not all(urls):
        raise ValueError(f"an empty Triton address in {url!r}")
    return tuple(dict.fromkeys(urls))


def config_parameter(config: dict[str, Any], key: str) -> str | None:
    """A ``parameters { key: ... }`` value of a model config dict, or None when absent."""
    value = (config.get("parameters") or {}).get(key)
    if isinstance(value, dict):
        return value.get("string_value")
    return None if value is None else str(value)
