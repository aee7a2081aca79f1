"""Several Triton servers behind one client: round robin, a failing server set aside.

`Endpoints` is the shared state (which server is next, which are set aside, until when);
`call_spread` runs one request against it: a request that fails because its server is
gone goes to another server at once, and waits (backing off) only when every server has
failed it. Neither knows about tritonclient, so both are tested with fake servers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import DartClientError

T = TypeVar("T")


@dataclass
class _Health:
    failures: int = 0  # in a row; the set-aside time doubles with each
    aside_until: float = 0.0  # new requests avoid it until then (clock time)
    # Bumped by each counted failure: a request sent before it was sent into the same
    # outage, so its failure is not counted again and its success says nothing about now;
    # and a connection made before it is stale.
    generation: int = 0


class Endpoints:
    """Rotation and health of ``urls``, shared by every client of them (thread-safe).

    A server that fails (`failed`) is set aside for ``backoff * 2**(k-1)`` seconds, at
    most ``backoff_max``, where k counts its failures in a row; then new requests try it
    again. A request that succeeds there (`succeeded`) puts it back for good.
    """

    def __init__(
        self,
        urls: Sequence[str],
        backoff: float,
        backoff_max: float = float("inf"),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("at least one URL is needed")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a URL is given twice: {', '.join(urls)}")
        self.urls = tuple(urls)
        self._backoff, self._backoff_max = backoff, backoff_max
        self._clock = clock
        self._health = [_Health() for _ in urls]
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.urls)

    def pick(self, exclude: Collection[int] = ()) -> int | None:
        """The server for the next request, skipping ``exclude``; None when all are skipped.

        Round robin over the servers not set aside; when every one left is set aside, the
        one due back soonest (a request is never held back while a server might answer).
        """
        with self._lock:
            now, n = self._clock(), len(self.urls)
            order = [(self._next + k) % n for k in range(n)]
            left = [i for i in order if i not in exclude]
            if not left:
                return None
            ready = [i for i in left if self._health[i].aside_until <= now]
            chosen = ready[0] if ready else min(left, key=lambda i: self._health[i].aside_until)
            self._next = (chosen + 1) % n
            return chosen

    def generation(self, i: int) -> int:
        with self._lock:
            return self._health[i].generation

    def is_aside(self, i: int) -> bool:
        with self._lock:
            return self._health[i].aside_until > self._clock()

    def failed(self, i: int, generation: int) -> None:
        """A request sent to ``i`` at ``generation`` found it gone: set ``i`` aside."""
        with self._lock:
            health = self._health[i]
            if generation != health.generation:
                return  # the failure already counted for the outage it was sent into
            health.failures += 1
            health.generation += 1
            wait = min(self._backoff * 2 ** (health.failures - 1), self._backoff_max)
            health.aside_until = self._clock() + wait

    def succeeded(self, i: int, generation: int) -> None:
        """A request sent to ``i`` at ``generation`` was answered: ``i`` is back."""
        with self._lock:
            health = self._health[i]
            if generation == health.generation:
                health.failures, health.aside_until = 0, 0.0


def call_spread(
    endpoints: Endpoints,
    call: Callable[[int], T],
    *,
    retries: int | None,
    backoff: float,
    backoff_max: float = float("inf"),
    deadline: float | None = None,
    is_gone: Callable[[DartClientError], bool],
    is_transient: Callable[[DartClientError], bool],
    tried: Collection[int] = (),
    last: DartClientError | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call(i)`` on the servers of ``endpoints`` until one answers.

    A failure for which ``is_gone`` holds (the server is unreachable, restarting, or
    has not got the model now) sets that server aside and the request goes to the next
    one at once. Once every server has failed it (a round), the request waits
    ``backoff * 2**(n-1)`` seconds (at most ``backoff_max``) before round n+1, at most
    ``retries`` times (None: no limit) and while ``deadline`` seconds from the start
    have not passed (None: no limit), and only if some failure of the round was
    ``is_transient``; else the last failure is raised. Any other error is raised at once.
    ``tried`` are the servers this request already failed on in this round (``last`` is
    that failure): how an asynchronous attempt hands its request over. With one server
    this is a plain retry with exponential backoff, as `retry_unavailable` does.
    """
    tried = set(tried)
    waits, transient = 0, last is not None and is_transient(last)
    end = None if deadline is None else clock() + deadline
    while True:
        i = endpoints.pick(exclude=tried)
        if i is None:
            assert last is not None  # tried is only filled by failures
            left = float("inf") if end is None else end - clock()
            spent = retries is not None and waits >= retries
            if spent or not transient or left <= 0:
                raise last
            waits += 1
            sleep(min(backoff * 2 ** (waits - 1), backoff_max, left))
            tried.clear()
            transient = False
            continue
        generation = endpoints.generation(i)
        try:
            result = call(i)
        except DartClientError as e:
            if not is_gone(e):
                endpoints.succeeded(i, generation)  # it answered: the request is at fault
                raise
            endpoints.failed(i, generation)
            tried.add(i)
            last, transient = e, transient or is_transient(e)
            continue
        endpoints.succeeded(i, generation)
        return result
