"""Requests spread over several servers (issue 14, points 3 and 4).

First the rotation and set-aside logic (`Endpoints`, `call_spread`) against fake servers
(plain functions, a fake clock: no network). Then the load test: two real `dart-triton
serve` launchers (each in its own process group, on free loopback ports, serving the same
tiny python-backend repository); `coco-eval` over both URLs gives what it gives over one,
and SIGKILL of one launcher's process group mid-run loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from dart_triton.benchmarks.coco_eval import main as coco_eval
from dart_triton.client.endpoints import Endpoints, call_spread
from dart_triton.client.errors import DartClientError
from dart_triton.client.server_errors import is_unavailable, retry_unavailable
from dart_triton.serving.processes import free_port, kill_group, remove_shm_regions

GONE = DartClientError("connection refused", "UNAVAILABLE")
NO_MODEL = DartClientError("Request for unknown model: 'dart' is not found",
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


# --- the load test: two real supervised servers on loopback ------------------------------------
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
N_IMAGES = 32
DART_SUCCESS = re.compile(r'^nv_inference_request_success\{model="dart",version="1"\} (\d+)$',
                          re.M)


@dataclass
class Serve:
    """One `dart-triton serve` launcher, the leader of its own process group."""

    proc: subprocess.Popen[bytes]
    err: Path
    ports: dict[str, int]

    def url(self, protocol: str = "grpc") -> str:
        return f"127.0.0.1:{self.ports[protocol]}"

    def dart_requests(self) -> int:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        match = DART_SUCCESS.search(text)
        return int(match.group(1)) if match else 0

    def tritonserver(self) -> int:
        kids = [p for p in psutil.Process(self.proc.pid).children()
                if Path(p.cmdline()[0]).name == "tritonserver"]
        assert len(kids) == 1, kids
        return kids[0].pid


def _start_serve(repository: Path, tmp: Path) -> Serve:
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    cmd = [
        sys.executable, "-m", "dart_triton.cli", "serve", "--model-repository", str(repository),
        *(f"--{name}-port={port}" for name, port in ports.items()),
        # No deep checks: the servers' request counts are then the test's requests alone.
        "--check-interval=0", "--stop-timeout=10",
        "--exit-timeout-secs=5",  # tritonserver's: a drain does not wait on keep-alives
    ]  # fmt: skip
    err = tmp / "serve.err"
    with (tmp / "serve.out").open("wb") as out, err.open("wb") as errf:
        proc = subprocess.Popen(cmd, stdout=out, stderr=errf, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group
    return Serve(proc, err, ports)


def _wait_ready(serve: Serve, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while "ready  http=" not in serve.err.read_text(errors="replace"):
        assert serve.proc.poll() is None, serve.err.read_text(errors="replace")
        assert time.monotonic() < deadline, f"serve not ready in {timeout:.0f} s"
        time.sleep(0.5)


def _stop(serve: Serve, tritonserver: int | None) -> None:
    """SIGTERM the launcher (it stops its server); after a SIGKILL, clean up for it."""
    if serve.proc.poll() is None:
        serve.proc.send_signal(signal.SIGTERM)
        try:
            serve.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.proc.pid, signal.SIGKILL)
            serve.proc.wait()
    if tritonserver is not None:  # the server of a killed launcher
        with contextlib.suppress(psutil.Error):
            psutil.Process(tritonserver).wait(30)
        kill_group(tritonserver)
    remove_shm_regions(f"dart_triton_{serve.proc.pid}_")


@pytest.fixture(scope="module")
def servers(python_repository: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[list[Serve]]:
    """Two launchers on one repository, started together."""
    launched: list[Serve] = []
    tritonservers: dict[int, int] = {}
    try:
        for name in ("a", "b"):
            launched.append(_start_serve(python_repository, tmp_path_factory.mktemp(name)))
        for serve in launched:
            _wait_ready(serve)
            tritonservers[serve.proc.pid] = serve.tritonserver()
        yield launched
    finally:
        for serve in launched:
            _stop(serve, tritonservers.get(serve.proc.pid))


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """N_IMAGES small noise images of several sizes and their (arbitrary) boxes."""
    pytest.importorskip("faster_coco_eval", reason="the eval extra is not installed")
    root = tmp_path_factory.mktemp("coco_scale_out")
    rng = np.random.default_rng(14)
    images, annotations = [], []
    for image_id in range(1, N_IMAGES + 1):
        w, h = (int(v) for v in rng.integers(48, 160, size=2))
        name = f"{image_id:012d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        annotations.append({"id": image_id, "image_id": image_id, "iscrowd": 0,
                            "category_id": CATEGORIES[image_id % 3]["id"],
                            "bbox": [x, y, w // 3, h // 3], "area": (w // 3) * (h // 3)})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": CATEGORIES}))
    return root, path


def _coco_eval(coco_set: tuple[Path, Path], out: Path, urls: list[str],
               protocol: str = "grpc") -> int:
    images, annotations = coco_set
    args = ["--images", str(images), "--annotations", str(annotations), "--output", str(out),
            "--concurrency", "4", "--score-threshold", "0.0", "--protocol", protocol,
            "--no-progress"]
    return coco_eval([*args, *(a for url in urls for a in ("--url", url))])


def _journal(out: Path) -> dict[int, list[dict]]:
    """Detections by image id; every image must be in the journal exactly once."""
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    counts = Counter(r["image_id"] for r in records)
    assert counts == Counter(range(1, N_IMAGES + 1)), counts
    return {r["image_id"]: r["detections"] for r in records}


def _assert_same(got: dict[int, list[dict]], want: dict[int, list[dict]]) -> None:
    assert got.keys() == want.keys()
    assert sum(map(len, want.values())) > 0  # two empty answers would prove little
    for image_id, dets in want.items():
        other = got[image_id]
        assert [d["category_id"] for d in other] == [d["category_id"] for d in dets]
        np.testing.assert_allclose([d["bbox"] for d in other], [d["bbox"] for d in dets],
                                   rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose([d["score"] for d in other], [d["score"] for d in dets],
                                   rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def one_url(servers: list[Serve], coco_set: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    """The reference: coco-eval over server a alone."""
    out = tmp_path_factory.mktemp("one_url")
    before = servers[0].dart_requests()
    assert _coco_eval(coco_set, out, [servers[0].url()]) == 0
    assert servers[0].dart_requests() - before == N_IMAGES
    return _journal(out)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_coco_eval_over_two_servers_gives_what_one_gives(
    servers: list[Serve], coco_set: tuple[Path, Path], one_url: dict[int, list[dict]],
    tmp_path: Path, protocol: str,
) -> None:
    before = [s.dart_requests() for s in servers]
    urls = [s.url(protocol) for s in servers]
    assert _coco_eval(coco_set, tmp_path, urls, protocol) == 0
    _assert_same(_journal(tmp_path), one_url)
    served = [s.dart_requests() - b for s, b in zip(servers, before, strict=True)]
    assert served == [N_IMAGES // 2] * 2  # round robin, each image sent once
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["url"] == ",".join(urls)


@pytest.mark.server
def test_sigkill_of_one_serve_group_mid_run_loses_nothing(
    servers: list[Serve], coco_set: tuple[Path, Path], one_url: dict[int, list[dict]],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    victim, survivor = servers
    tritonserver = victim.tritonserver()
    before = survivor.dart_requests()
    journal = tmp_path / "detections.jsonl"
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(_coco_eval, coco_set, tmp_path, [s.url() for s in servers])
        deadline = time.monotonic() + 120
        while not journal.exists() or len(journal.read_bytes().splitlines()) < 4:
            assert not run.done(), run.result()
            assert time.monotonic() < deadline, "coco-eval made no progress"
            time.sleep(0.05)
        os.killpg(victim.proc.pid, signal.SIGKILL)  # the launcher's whole process group
        done_at_kill = len(journal.read_bytes().splitlines())
        assert run.result(timeout=180) == 0
    assert victim.proc.wait(10) == -signal.SIGKILL and done_at_kill < N_IMAGES
    _assert_same(_journal(tmp_path), one_url)
    # The survivor took over: it answered far more than its half.
    assert survivor.dart_requests() - before > N_IMAGES // 2 + 2
    # Its tritonserver, unsupervised, went down too (SIGTERM from the kernel when its
    # parent died): the victim's share really had to go elsewhere.
    gone = time.monotonic() + 60
    while _alive(tritonserver):
        assert time.monotonic() < gone, "the killed launcher's tritonserver lives on"
        time.sleep(0.2)

    # A new run with the dead server still listed: named once, then simply avoided.
    capsys.readouterr()
    assert _coco_eval(coco_set, tmp_path / "again", [s.url() for s in servers]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and victim.url() in warnings[0]
    _assert_same(_journal(tmp_path / "again"), one_url)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_coco_eval_refuses_an_empty_url_in_one_line(coco_set: tuple[Path, Path],
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = _coco_eval(coco_set, tmp_path, ["127.0.0.1:9", ""])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "coco-eval: --url: an empty Triton address in " \
        "['127.0.0.1:9', '']", err
