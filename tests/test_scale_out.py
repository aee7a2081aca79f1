"""Requests spread over several servers (issue 14, points 3 and 4).

First the rotation and set-aside logic (`Endpoints`, `call_spread`) against fake servers
(plain functions, a fake clock: no network). Then the load test: two real `dart-triton
serve` launchers (each in its own process group, on free loopback ports, serving the same
tiny python-backend repository); `coco-eval` over both URLs gives what it gives over one,
and SIGKILL of one launcher's process group mid-run loses nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from dart_triton.client.endpoints import Endpoints, call_spread
from dart_triton.client.errors import DartClientError
from dart_triton.client.triton_client import is_unavailable, retry_unavailable

GONE = DartClientError("connection refused", "UNAVAILABLE")
NO_MODEL = DartClientError("Request for unknown model: 'dart' has no available versions",
                           "StatusCode.NOT_FOUND")
BAD = DartClientError("bad image", "StatusCode.INVALID_ARGUMENT")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _is_gone(e: DartClientError) -> bool:
    return is_unavailable(e) or e.status == "StatusCode.NOT_FOUND"


def _spread(endpoints: Endpoints, call: Callable[[int], str], sleeps: list[float],
            **kwargs) -> str:
    options = {"retries": 3, "backoff": 0.5, "backoff_max": 4.0, "is_gone": _is_gone,
               "is_transient": is_unavailable, "sleep": sleeps.append, **kwargs}
    return call_spread(endpoints, call, **options)


def _servers(behaviour: dict[int, list[DartClientError | None]]):
    """A ``call(i)`` whose server i fails with each of ``behaviour[i]`` in turn, then
    answers ("answer from i"); and the log of servers called."""
    calls: list[int] = []

    def call(i: int) -> str:
        calls.append(i)
        queue = behaviour.get(i, [])
        error = queue.pop(0) if queue else None
        if error is not None:
            raise error
        return f"answer from {i}"

    return call, calls


# --- rotation and set-aside, no servers -----------------------------------------------------
def test_round_robin_and_a_failed_server_set_aside_with_doubling_backoff():
    clock = Clock()
    ep = Endpoints(["a:1", "b:1", "c:1"], backoff=0.5, backoff_max=2.0, clock=clock)
    assert [ep.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]

    ep.failed(1, ep.generation(1))
    assert ep.is_aside(1)
    assert [ep.pick() for _ in range(4)] == [0, 2, 0, 2]
    clock.now += 0.5  # its time is up: back in the rotation, on probation
    assert not ep.is_aside(1) and [ep.pick() for _ in range(3)] == [0, 1, 2]
    # Failing again, it stays away twice as long, then at most backoff_max.
    for wait in (1.0, 2.0, 2.0):
        ep.failed(1, ep.generation(1))
        clock.now += wait - 0.01
        assert ep.is_aside(1) and 1 not in {ep.pick() for _ in range(4)}
        clock.now += 0.01
        assert not ep.is_aside(1)
    # An answer puts it back for good: the next failure is a first one again.
    ep.succeeded(1, ep.generation(1))
    ep.failed(1, ep.generation(1))
    clock.now += 0.5
    assert not ep.is_aside(1)

    # Every server set aside: the one due back soonest, never no server at all.
    for i in (2, 0, 1):
        ep.failed(i, ep.generation(i))
        clock.now += 0.1
    assert ep.pick() == 2 and ep.pick(exclude={2}) == 0
    assert ep.pick(exclude={0, 1, 2}) is None
    with pytest.raises(ValueError, match="twice"):
        Endpoints(["a:1", "a:1"], 0.5)


def test_one_outage_counts_once_and_an_old_success_says_nothing_of_now():
    clock = Clock()
    ep = Endpoints(["a:1", "b:1"], backoff=1.0, clock=clock)
    sent_before = ep.generation(0)  # four requests in flight when server 0 dies
    for _ in range(4):
        ep.failed(0, sent_before)
    clock.now += 1.0
    assert not ep.is_aside(0), "four failures of one outage must not back off 8 s"
    ep.failed(0, ep.generation(0))
    ep.succeeded(0, sent_before)  # an answer to a request sent before it died
    assert ep.is_aside(0)
    assert ep.generation(0) == sent_before + 2  # connections made before are stale


def test_a_failed_request_goes_to_the_next_server_at_once():
    ep = Endpoints(["a:1", "b:1", "c:1"], backoff=0.5)
    sleeps: list[float] = []
    call, calls = _servers({0: [GONE], 1: [NO_MODEL]})
    assert _spread(ep, call, sleeps) == "answer from 2"
    assert calls == [0, 1, 2] and sleeps == []
    assert ep.is_aside(0) and ep.is_aside(1) and not ep.is_aside(2)
    # New requests avoid the two set aside.
    assert [_spread(ep, call, sleeps) for _ in range(2)] == ["answer from 2"] * 2

    # The request's own fault goes to no other server and sets nothing aside.
    ep = Endpoints(["a:1", "b:1"], backoff=0.5)
    call, calls = _servers({0: [BAD]})
    with pytest.raises(DartClientError, match="bad image"):
        _spread(ep, call, sleeps)
    assert calls == [0] and not ep.is_aside(0)


def test_every_server_gone_waits_in_rounds_then_gives_up():
    ep = Endpoints(["a:1", "b:1"], backoff=0.5)
    sleeps: list[float] = []
    call, calls = _servers({0: [GONE] * 3, 1: [GONE] * 3})
    assert _spread(ep, call, sleeps) == "answer from 0"
    # Round 1 (0, 1), wait, round 2 (both due back: 0 first), wait, ...: waits as
    # retry_unavailable's, each after a whole round.
    assert calls == [0, 1, 0, 1, 0, 1, 0] and sleeps == [0.5, 1.0, 2.0]

    sleeps.clear()
    call, calls = _servers({0: [GONE] * 9, 1: [GONE] * 9})
    with pytest.raises(DartClientError, match="connection refused"):
        _spread(ep, call, sleeps, retries=2)
    assert len(calls) == 6 and sleeps == [0.5, 1.0]

    # The model missing everywhere (a wrong name, not a restart): no waiting.
    sleeps.clear()
    call, calls = _servers({0: [NO_MODEL], 1: [NO_MODEL]})
    with pytest.raises(DartClientError, match="unknown model"):
        _spread(Endpoints(["a:1", "b:1"], backoff=0.5), call, sleeps)
    assert calls == [0, 1] and sleeps == []


@pytest.mark.parametrize("failures", range(6))
@pytest.mark.parametrize("first", [0, 1])  # 1: an asynchronous attempt already failed
def test_one_server_retries_exactly_as_retry_unavailable(failures, first):
    def run(spread: bool) -> tuple[str, list[float], list[int]]:
        sleeps: list[float] = []
        call, calls = _servers({0: [GONE] * failures})
        try:
            if first:
                with contextlib.suppress(DartClientError):
                    call(0)  # the asynchronous attempt
            if spread:
                last = GONE if first else None
                tried = [0] if last else []
                outcome = _spread(Endpoints(["a:1"], 0.5), call, sleeps, tried=tried,
                                  last=last)
            else:
                outcome = retry_unavailable(lambda: call(0), 3, 0.5, backoff_max=4.0,
                                            first=first, sleep=sleeps.append)
        except DartClientError as e:
            outcome = f"raised {e}"
        return outcome, sleeps, calls

    assert run(spread=True) == run(spread=False)


def test_concurrent_requests_lose_nothing_when_a_server_dies():
    """8 threads, 3 fake servers; server 1 dies after its 10th request and never returns
    (set aside for longer than the test): every request is answered exactly once, and
    server 1 sees at most the requests already sent to it when it died."""
    ep = Endpoints(["a:1", "b:1", "c:1"], backoff=60.0)
    lock = threading.Lock()
    served: Counter[int] = Counter()
    after_death: list[int] = []

    def call(i: int) -> int:
        with lock:
            dead = i == 1 and served[1] >= 10
            if dead:
                after_death.append(i)
            else:
                served[i] += 1
        time.sleep(0.002)
        if dead:
            raise GONE
        return i

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _spread(ep, call, []), range(300)))
    assert sum(served.values()) == 300  # each request answered by exactly one server
    assert Counter(results) == served and served[1] == 10 and 1 <= len(after_death) <= 8
    assert served[0] + served[2] == 290 and abs(served[0] - served[2]) <= 10
