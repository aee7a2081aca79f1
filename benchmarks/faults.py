"""Faults under a steady client: how long service is away, and how many requests fail.

`dart-triton serve` (its defaults) runs the tiny python-backend repository; a `DartClient`
with default settings sends one request every 0.2 s throughout. Each fault is made while
it runs: SIGKILL of both `dart` stubs, of the text_encoder stub, of the backbone stub,
SIGSTOP of the backbone stub, SIGKILL of tritonserver. The outage is the longest time
without an answer around the fault (a request's wait included); a failed request is one
the client gave up on. Goals (CPU, tiny repository): a dead or frozen stub back within
15 s (frozen: 60 s), tritonserver within 45 s, 0 failed requests.

    python -m dart_triton.benchmarks.faults
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from dart_triton.benchmarks import common

STUDY = "faults"
COLUMNS = ["fault", "outage_s", "goal_s", "failed_requests", "requests", "served_by"]
FAULTS = [  # (name, target, signal, goal in seconds)
    ("SIGKILL both dart stubs", "dart", signal.SIGKILL, 15),
    ("SIGKILL the text_encoder stub", "text_encoder", signal.SIGKILL, 15),
    ("SIGKILL the backbone stub", "backbone", signal.SIGKILL, 15),
    ("SIGSTOP the backbone stub", "backbone", signal.SIGSTOP, 60),
    ("SIGKILL tritonserver", "tritonserver", signal.SIGKILL, 45),
]


class Probe(threading.Thread):
    """One request every 0.2 s with a default DartClient: (sent, answered) and failures."""

    def __init__(self, url: str, image: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.url, self.image = url, image
        self.answers: list[tuple[float, float]] = []
        self.failures = 0
        self.halt = threading.Event()

    def run(self) -> None:
        from dart_triton.client import DartClient
        from dart_triton.client.errors import DartClientError

        with DartClient(self.url) as client:
            while not self.halt.is_set():
                sent = time.monotonic()
                try:
                    client.detect(self.image, ["person"])
                    self.answers.append((sent, time.monotonic()))
                except DartClientError:
                    self.failures += 1
                self.halt.wait(0.2)


def _tritonserver(serve_pid: int) -> int:
    import psutil

    kids = psutil.Process(serve_pid).children(recursive=True)
    return next(p.pid for p in kids if p.name().startswith("tritonserver"))


def _wait(log: Path, pattern: str, since: int = 0, timeout: float = 600) -> None:
    import re

    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(errors="replace")[since:]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern!r} in {log}")
        time.sleep(0.2)


def measure(repo: Path, workdir: Path) -> list[dict]:
    from dart_triton.serving.processes import free_port, stub_processes

    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    log = workdir / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "dart_triton.cli", "serve", "--model-repository", str(repo),
             *(f"--{n}-port={p}" for n, p in ports.items())],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        _wait(log, r"deep health check: one request")
        image = common.test_image()[::4, ::4].copy()
        for name, target, sig, goal in FAULTS:
            since = len(log.read_text(errors="replace"))
            probe = Probe(f"127.0.0.1:{ports['grpc']}", image)
            probe.start()
            time.sleep(3)
            triton = _tritonserver(serve.pid)
            victims = [triton] if target == "tritonserver" else [
                pid for pid, stub in stub_processes(triton).items() if stub.model == target]
            struck = time.monotonic()
            for pid in victims:
                os.kill(pid, sig)
            _wait(log, r"restart \d+ done" if target == "tritonserver"
                  else rf"model '{target}' loaded again", since)
            time.sleep(3)
            probe.halt.set()
            probe.join(300)
            times = sorted(a for _, a in probe.answers if a > struck - 2)
            outage = max(b - a for a, b in itertools.pairwise(times))
            how = "restart" if target == "tritonserver" else "model loaded again"
            rows.append({"fault": name, "outage_s": outage, "goal_s": goal,
                         "failed_requests": probe.failures, "requests": len(probe.answers),
                         "served_by": how})
            print(f"  {rows[-1]}", flush=True)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    args.config = "tiny"
    from dart_triton.export.repository import build_repository

    with tempfile.TemporaryDirectory(prefix="dart-faults-") as tmp:
        repo = Path(tmp) / "repo"
        build_repository(common.checkpoint_for(args), repo, backend="python", max_classes=4,
                         log=lambda *_: None)
        rows = measure(repo, Path(tmp))
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    notes = ("`dart-triton serve` with its defaults on the tiny python-backend repository; "
             "a DartClient with default settings sends one request every 0.2 s. outage: "
             "the longest time without an answer around the fault.")
    head = common.section_header("Faults", command, "tiny random-weight SAM3, CPU", notes)
    common.publish_table(args, STUDY, head, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
