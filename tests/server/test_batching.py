"""Many cameras, one server (--max-batch): concurrent requests share backbone calls and
enc_dec passes.

A real tritonserver per backend (python, torch), a repository built with --max-batch 4:
8 clients at once, each with its own image size (64x48 .. 640x480) and class list (1 ..
3 x max classes), get what the same request gets alone; Triton's statistics show
backbone and enc_dec ran fewer executions than inferences (batches formed: frames shared
a backbone call, and the prompts of several frames a pass); bad requests in the burst
get INVALID_ARGUMENT and the others are answered.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dart_triton.client import DartClient
from dart_triton.contract import specs
from tests.conftest import TEST_MAX_CLASSES
from tests.parity import NAMES, assert_same, assert_same_masks, raw_inputs
from tests.tolerances import BATCHED_SCORE_ATOL

pytestmark = pytest.mark.server

MAX_BATCH = 4
SIZES = [(48, 64), (480, 640), (97, 131), (240, 320), (64, 64), (300, 180), (128, 256),
         (77, 501)]  # (height, width)
CLASS_LISTS = [NAMES[:1], NAMES[1:4], NAMES[:TEST_MAX_CLASSES], NAMES[:3 * TEST_MAX_CLASSES],
               NAMES[5:7], NAMES[2:TEST_MAX_CLASSES + 3], NAMES[7:8], NAMES[3:12]]


@pytest.fixture(scope="module", params=["python", "torch"])
def batched_server(request, tiny_checkpoint, tmp_path_factory):
    from dart_triton.export.options import parse_instances
    from dart_triton.export.repository import build_repository
    from dart_triton.serving.server import TritonServer

    repo = tmp_path_factory.mktemp(f"repo_batched_{request.param}")
    masks = request.param == "torch"  # masks through shared passes; python: refused
    # 50 ms of queue delay: frames of requests that arrive together wait for each other,
    # so batches form even on two busy cores.
    build_repository(tiny_checkpoint, repo, backend=request.param,
                     max_classes=TEST_MAX_CLASSES, max_batch=MAX_BATCH, batch_delay_us=50_000,
                     instances=parse_instances(f"dart={MAX_BATCH},preprocess=1,postprocess=1"),
                     masks=masks, log=lambda *_: None)
    for model in (specs.BACKBONE, specs.ENC_DEC):
        config = (repo / model / "config.pbtxt").read_text()
        assert f"max_batch_size: {MAX_BATCH}" in config and "dynamic_batching" in config
    with TritonServer(repo, startup_timeout=240, extra_args=["--exit-timeout-secs=5"]) as server:
        server.masks = masks
        yield server


def at_once(count: int, call) -> dict[int, object]:
    """`call(k, ready)` for k in 0..count-1, each in its own thread; every call's `ready()`
    returns when all have called it, so the requests after it arrive together. k -> result."""
    start, results = threading.Barrier(count), {}

    def run(k: int) -> None:
        results[k] = call(k, start.wait)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(count))
    return results


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def graph_counts(url: str) -> tuple[int, ...]:
    """(inferences, executions) of backbone, then of enc_dec, so far (as the streams
    benchmark reads them)."""
    from dart_triton.benchmarks.streams import graph_counts as read

    with grpcclient.InferenceServerClient(url) as client:
        return read(client)


def test_concurrent_requests_share_backbone_calls(batched_server):
    url, frames = batched_server.grpc_url, images()
    with DartClient(url) as client:
        alone = [client.detect(f, c) for f, c in zip(frames, CLASS_LISTS, strict=True)]
    before = graph_counts(url)
    rounds = 3

    def camera(k: int, ready) -> list:
        with DartClient(url) as client:
            ready()
            return [client.detect(frames[k], CLASS_LISTS[k]) for _ in range(rounds)]

    answers = at_once(len(frames), camera)
    for k, got in answers.items():
        for detections in got:
            assert_same(detections, alone[k], max(SIZES[k]), BATCHED_SCORE_ATOL)
    inferences, executions, passes, pass_executions = (
        a - b for a, b in zip(graph_counts(url), before, strict=True))
    assert inferences == len(frames) * rounds
    assert executions < inferences, (executions, inferences)  # batches formed
    # one enc_dec request per pass of each frame (classes in passes of at most max)
    per_round = sum(-(-len(c) // TEST_MAX_CLASSES) for c in CLASS_LISTS)
    assert passes == per_round * rounds
    assert pass_executions < passes, (pass_executions, passes)  # passes shared
    with DartClient(url, model=specs.DART_ENSEMBLE) as client:  # the ensemble too
        for k in (0, 1, 2):  # class lists within one pass: what the ensemble takes
            assert_same(client.detect(frames[k], CLASS_LISTS[k]), alone[k], max(SIZES[k]),
                        BATCHED_SCORE_ATOL)


def test_a_bad_request_in_a_burst_fails_alone(batched_server):
    """Requests arriving together, some bad: each bad one gets INVALID_ARGUMENT naming
    its problem, every good one its detections."""
    url, frames = batched_server.grpc_url, images()
    with DartClient(url) as client:
        alone = [client.detect(frames[k], CLASS_LISTS[k]) for k in range(4)]
    bad = {1: ((specs.NMS_IOU, 2.0, "FP32"), "NMS_IOU"),
           5: ((specs.MAX_DETECTIONS, 0, "INT32"), "MAX_DETECTIONS")}
    def send(k: int, ready) -> object:
        with grpcclient.InferenceServerClient(url) as client:
            good = k % 4
            extra = [bad[k][0]] if k in bad else []
            inputs = raw_inputs(frames[good], CLASS_LISTS[good], extra)
            ready()
            try:
                return client.infer(specs.DART, inputs)
            except InferenceServerException as exc:
                return exc

    results = at_once(8, send)
    for k, result in results.items():
        if k in bad:
            assert isinstance(result, InferenceServerException), k
            assert result.status() == "StatusCode.INVALID_ARGUMENT", result
            assert bad[k][1] in result.message()
        else:
            assert not isinstance(result, Exception), result
            assert len(result.as_numpy(specs.SCORES)) == len(alone[k % 4])
    with DartClient(url) as client:  # still serving
        assert_same(client.detect(frames[0], CLASS_LISTS[0]), alone[0], max(SIZES[0]),
                    BATCHED_SCORE_ATOL)


def test_masks_from_a_repository_built_without_them_are_refused(batched_server):
    """RETURN_MASKS to a repository built without --masks: one line saying how to build
    one; a request without it is still answered."""
    from dart_triton.client import DartClientError

    if batched_server.masks:
        pytest.skip("this backend's batched repository is built with masks")
    image = images()[1]
    with DartClient(batched_server.grpc_url) as client:
        with pytest.raises(DartClientError) as err:
            client.detect(image, CLASS_LISTS[1], masks=True)
        assert err.value.status == "StatusCode.INVALID_ARGUMENT"
        assert "built without masks" in err.value.message
        assert "dart-triton build --masks" in err.value.message
        assert client.detect(image, CLASS_LISTS[1]).masks is None


def test_masks_of_concurrent_requests_are_those_of_each_alone(batched_server, photo):
    """Masks through shared passes (the torch repository is built with --masks): four
    clients at once, each its own crop and classes, get the masks it gets alone."""
    if not batched_server.masks:
        pytest.skip("this backend's batched repository is built without masks")
    crops = [photo[:400, 60:], photo[100:, :300], photo[::2, ::2], photo[50:350, 200:]]
    classes = [NAMES[:3], NAMES[1:2], NAMES[:TEST_MAX_CLASSES + 2], NAMES[2:5]]
    url = batched_server.grpc_url
    with DartClient(url) as client:
        alone = [client.detect(c, k, masks=True) for c, k in zip(crops, classes, strict=True)]
    def camera(k: int, ready):
        with DartClient(url) as client:
            ready()
            return client.detect(crops[k], classes[k], masks=True)

    answers = at_once(len(crops), camera)
    for k, got in answers.items():
        assert_same_masks(got, alone[k], max(crops[k].shape), BATCHED_SCORE_ATOL)
