"""Fairness: a request with many prompts puts at most `passes_in_flight` enc_dec passes
into the shared queue at once, so a request arriving later is decoded between them
instead of after all of them. The orchestration with a runner whose enc_dec is one
first-come-first-served queue (what a batched enc_dec model is to its callers)."""

from __future__ import annotations

import asyncio

import numpy as np

from dart_triton.contract.passes import plan_passes
from dart_triton.pipeline.orchestration import HeadOutputs, run_graphs


class QueuedRunner:
    """One enc_dec worker serving passes in arrival order; records who ran when."""

    def __init__(self, in_flight: int):
        self.passes_in_flight = in_flight
        self.queue: asyncio.Queue = asyncio.Queue()
        self.order: list[str] = []
        self.most_queued: dict[str, int] = {}

    async def backbone(self, pixel_values, mask_levels=False):
        return pixel_values

    async def text(self, names):
        return np.array(names, dtype=object), np.ones((len(names), 1), np.int32)

    async def enc_dec(self, features, text_features, text_mask, mask_inputs=False):
        owner = str(features)
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((owner, done))
        queued = sum(1 for o, _ in self.queue._queue if o == owner)
        self.most_queued[owner] = max(self.most_queued.get(owner, 0), queued)
        await done
        n = len(text_features)
        return HeadOutputs(np.zeros((n, 1, 4)), np.zeros((n, 1)), np.zeros((n, 1)))

    async def serve(self) -> None:
        while True:
            owner, done = await self.queue.get()
            await asyncio.sleep(0)
            self.order.append(owner)
            done.set_result(None)


async def _two_requests(in_flight: int) -> QueuedRunner:
    runner = QueuedRunner(in_flight)
    worker = asyncio.create_task(runner.serve())
    big = [f"class {i}" for i in range(64)]  # 16 passes of 4
    small = ["cat"]
    first = asyncio.create_task(run_graphs(runner, "big", big, plan_passes(len(big), 4)))
    await asyncio.sleep(0)  # the big request is queued first
    await run_graphs(runner, "small", small, plan_passes(1, 4))
    head = await first
    worker.cancel()
    assert len(head.boxes) == len(big)  # every pass answered, rows in order
    return runner


def test_a_bounded_request_lets_a_later_one_in_between():
    runner = asyncio.run(_two_requests(in_flight=2))
    assert runner.most_queued["big"] <= 2
    assert runner.order.index("small") <= 3  # after at most the big one's first passes


def test_unbounded_a_later_request_waits_for_every_pass():
    runner = asyncio.run(_two_requests(in_flight=0))
    assert runner.most_queued["big"] == 16
    assert runner.order.index("small") == 16
