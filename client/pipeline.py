"""Keep K requests in flight and hand back results in input order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class SupportsResult(Protocol[R_co]):
    """Anything with a blocking ``result()``: a concurrent Future or a DetectionFuture."""

    def result(self, timeout: float | None = None) -> R_co: ...


def completed(value: R) -> Future[R]:
    """A future that is already done, to run a synchronous function through `in_order`."""
    fut: Future[R] = Future()
    fut.set_result(value)
    return fut


def in_order(
    items: Iterable[T],
    submit: Callable[[T], SupportsResult[R]],
    in_flight: int,
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, result)`` in input order with up to ``in_flight`` submissions pending.

    Waiting on the oldest request while younger ones run overlaps network and
    server time; ordering is what a video writer needs.
    """
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    pending: deque[tuple[T, SupportsResult[R]]] = deque()
    for item in items:
        pending.append((item, submit(item)))
        if len(pending) >= in_flight:
            head, fut = pending.popleft()
            yield head, fut.result()
    while pending:
        head, fut = pending.popleft()
        yield head, fut.result()


def interleaved(
    streams: Sequence[Iterable[T]],
    submit: Callable[[T], SupportsResult[R]],
    in_flight: int,
) -> Iterator[tuple[int, T, R]]:
    """Yield ``(stream index, item, result)`` over several streams that share one budget:
    items are taken round robin, up to ``in_flight`` submissions pending over them all.

    Results come back oldest first, so each stream's come in its own order. One thread
    does it all: waiting on the oldest drives the younger requests (HTTP greenlets) and a
    finished stream simply leaves the round.
    """
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    iterators = [iter(stream) for stream in streams]
    live = list(range(len(iterators)))
    pending: deque[tuple[int, T, SupportsResult[R]]] = deque()
    turn = 0
    while live or pending:
        if live and len(pending) < in_flight:
            turn %= len(live)
            index = live[turn]
            try:
                item = next(iterators[index])
            except StopIteration:
                live.pop(turn)
                continue
            pending.append((index, item, submit(item)))
            turn += 1
            continue
        index, item, fut = pending.popleft()
        yield index, item, fut.result()
