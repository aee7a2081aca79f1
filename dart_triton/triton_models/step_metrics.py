"""dart's step timers (`contract.metrics`: STEP_SECONDS, STEP_CALLS by `step`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from dart_triton.contract.metrics import STEP_CALLS, STEP_SECONDS, STEPS
from dart_triton.triton_models import pb


class StepMetrics:
    def __init__(self) -> None:
        family = pb.pb_utils.MetricFamily
        # The families must outlive their metrics: keep both on the instance.
        self.seconds_family = family(name=STEP_SECONDS, kind=family.COUNTER,
                                     description="seconds dart spent in each step of a request")
        self.calls_family = family(name=STEP_CALLS, kind=family.COUNTER,
                                   description="times dart ran each step of a request")
        self.seconds = {s: self.seconds_family.Metric(labels={"step": s}) for s in STEPS}
        self.calls = {s: self.calls_family.Metric(labels={"step": s}) for s in STEPS}

    @contextlib.contextmanager
    def time(self, step: str) -> Iterator[None]:
        """Count the time the block takes (awaits included) under `step`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step].increment(time.perf_counter() - start)
            self.calls[step].increment(1)
