"""The product, end to end: a real tritonserver on loopback, real tritonclient calls.

Served detections must equal the in-process naive SAM3 reference (transformers'
Sam3Model once per prompt, same random weights).
"""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from dart_triton.client import DartClient
from dart_triton.contract import specs
from dart_triton.contract.metrics import STEP_CALLS as CALLS
from dart_triton.contract.metrics import STEP_SECONDS as SECONDS
from dart_triton.contract.metrics import STEPS
from tests.conftest import TEST_MAX_CLASSES
from tests.helpers import metric_total
from tests.parity import NAMES, assert_same, raw_inputs

pytestmark = pytest.mark.server

@pytest.fixture(scope="module")
def client(triton_server):
    with DartClient(triton_server.grpc_url, protocol="grpc") as c:
        yield c


@pytest.mark.parametrize("model", ["dart", "dart_ensemble"])
@pytest.mark.parametrize("n", [1, 3, TEST_MAX_CLASSES])
def test_served_equals_naive_reference(triton_server, naive, photo, model, n):
    with DartClient(triton_server.grpc_url, model=model) as c:
        served = c.detect(photo, NAMES[:n])
    assert_same(served, naive.detect(photo, NAMES[:n]))


def test_dart_chunks_three_times_max(client, naive, photo):
    classes = NAMES[: 3 * TEST_MAX_CLASSES]
    served = client.detect(photo, classes)
    assert len(served) > 0
    assert_same(served, naive.detect(photo, classes))


@pytest.mark.parametrize("model", ["dart", "dart_ensemble"])
def test_every_query_of_every_class(triton_server, naive, parts, photo, model):
    kw = dict(score_threshold=0.0, nms_iou=1.0, max_detections=100_000)
    with DartClient(triton_server.http_url, protocol="http", model=model) as c:
        served = c.detect(photo, NAMES[:3], **kw)
    assert len(served) == 3 * parts.dims.num_queries
    assert_same(served, naive.detect(photo, NAMES[:3], **kw))


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_repeated_class_set_comes_from_text_cache(triton_server, client, photo):
    classes = ["a class name never seen before", "another fresh one"]
    hits0 = _metric(triton_server, "dart_text_cache_hits_total")
    misses0 = _metric(triton_server, "dart_text_cache_misses_total")
    first = client.detect(photo, classes)
    assert _metric(triton_server, "dart_text_cache_misses_total") == misses0 + 2
    second = client.detect(photo, classes)
    assert _metric(triton_server, "dart_text_cache_hits_total") == hits0 + 2
    assert _metric(triton_server, "dart_text_cache_misses_total") == misses0 + 2
    assert_same(second, first)


def test_dart_times_its_steps(triton_server, client, photo):
    """dart_step_seconds_total / dart_step_calls_total: every step of every request, and
    enc_dec once per pass."""
    url = triton_server.metrics_url
    before = {s: metric_total(url, CALLS, step=s) for s in STEPS}
    seconds = {s: metric_total(url, SECONDS, step=s) for s in STEPS}
    for _ in range(2):
        client.detect(photo, NAMES[: 2 * TEST_MAX_CLASSES + 1])  # three enc_dec passes
    for step in STEPS:
        want = {specs.ENC_DEC: 6, specs.MASK_DECODER: 0}.get(step, 2)
        assert metric_total(url, CALLS, step=step) == before[step] + want, step
        if want:
            assert metric_total(url, SECONDS, step=step) > seconds[step], step


def test_coco_vocabulary_is_warm(triton_server, client, photo):
    misses0 = _metric(triton_server, "dart_text_cache_misses_total")
    client.detect(photo, ["person", "traffic light", "toothbrush"])  # from coco80.txt
    assert _metric(triton_server, "dart_text_cache_misses_total") == misses0


def test_concurrent_clients_match_serial(triton_server, photo):
    image = np.ascontiguousarray(photo[::4, ::4])  # 128x128: the load is the point here
    sets = [NAMES[:1], NAMES[1:4], NAMES[2:8], NAMES[:TEST_MAX_CLASSES + 1]]
    with DartClient(triton_server.grpc_url) as c:
        serial = [c.detect(image, s) for s in sets]

    def worker(k: int) -> list[tuple[int, object]]:
        out = []
        grpc = k % 2 == 1
        url = triton_server.grpc_url if grpc else triton_server.http_url
        with DartClient(url, protocol="grpc" if grpc else "http") as c:
            for i in range(50):
                j = (k + i) % len(sets)
                out.append((j, c.detect(image, sets[j])))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(worker, range(8)) for r in rs]
    assert len(results) == 400
    for j, dets in results:
        assert_same(dets, serial[j], side=128)


# Bad input ------------------------------------------------------------------------------


GOOD = np.zeros((32, 48, 3), np.uint8)
BAD_REQUESTS = {
    "zero classes": (GOOD, [], (), "CLASSES is empty"),
    "1025 classes": (GOOD, [b"x"] * 1025, (), "at most 1024"),
    "empty class name": (GOOD, [b"person", b""], (), r"CLASSES\[1\] is empty"),
    "non-UTF-8 name": (GOOD, [b"\xff\xfeperson"], (), r"CLASSES\[0\] is not valid UTF-8"),
    "4 channels": (np.zeros((32, 32, 4), np.uint8), [b"x"], (), "IMAGE"),
    "float image": (np.zeros((32, 32, 3), np.float32), [b"x"], (), "UINT8"),
    "0x0 image": (np.zeros((0, 0, 3), np.uint8), [b"x"], (), "at least 8 pixels"),
    "1x1 image": (np.zeros((1, 1, 3), np.uint8), [b"x"], (), "at least 8 pixels"),
    "huge image": (np.zeros((specs.MAX_IMAGE_SIDE + 1, 16, 3), np.uint8), [b"x"], (),
                   f"at most {specs.MAX_IMAGE_SIDE}"),
    "missing CLASSES": (GOOD, None, (), "CLASSES"),
    "threshold > 1": (GOOD, [b"x"], [(specs.SCORE_THRESHOLD, 1.5, "FP32")], "SCORE_THRESHOLD"),
    "threshold < 0": (GOOD, [b"x"], [(specs.SCORE_THRESHOLD, -0.1, "FP32")], "SCORE_THRESHOLD"),
    "nms iou 0": (GOOD, [b"x"], [(specs.NMS_IOU, 0.0, "FP32")], "NMS_IOU"),
    "nms iou > 1": (GOOD, [b"x"], [(specs.NMS_IOU, 1.2, "FP32")], "NMS_IOU"),
    "max detections 0": (GOOD, [b"x"], [(specs.MAX_DETECTIONS, 0, "INT32")], "MAX_DETECTIONS"),
}


@pytest.mark.parametrize("model", ["dart", "dart_ensemble"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_named_error_and_server_stays_ready(triton_server, model, case):
    image, classes, extra, message = BAD_REQUESTS[case]
    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(InferenceServerException, match=message):
        c.infer(model, raw_inputs(image, classes, extra), client_timeout=60)
    assert c.is_server_ready() and c.is_model_ready(model)
    good = c.infer(model, raw_inputs(GOOD, [b"person"]), client_timeout=60)
    assert good.as_numpy(specs.SCORES) is not None


@pytest.mark.parametrize("model", ["dart", "dart_ensemble"])
def test_zero_byte_images_among_good_requests_never_wedge_the_server(triton_server, model):
    """Regression: with preprocess ∥ text_encoder, a 0xW IMAGE failing in preprocess while
    text_encoder was still encoding hung tritonserver 2.51's ensemble within a few such
    requests, and every request after it. Now preprocess gates the ensemble."""
    shapes = [(0, 0, 3), (0, 5, 3), (5, 0, 3)]

    def one(k: int) -> str:
        c = grpcclient.InferenceServerClient(triton_server.grpc_url)
        if k % 3 == 2:
            out = c.infer(model, raw_inputs(GOOD, [b"person", b"dog"]), client_timeout=30)
            return "ok" if out.as_numpy(specs.SCORES) is not None else "no scores"
        try:
            # Unseen names: a cache miss keeps text_encoder busy while preprocess fails.
            names = [f"zero-byte probe {k} {i}".encode() for i in range(2)]
            c.infer(model, raw_inputs(np.zeros(shapes[k % 3], np.uint8), names),
                    client_timeout=30)
        except InferenceServerException as exc:
            return "rejected" if "at least 8 pixels" in str(exc) else str(exc)
        return "accepted a zero-byte image"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(60)))
    assert results.count("ok") == 20, results
    assert results.count("rejected") == 40, results
    assert grpcclient.InferenceServerClient(triton_server.grpc_url).is_server_ready()


def test_http_errors_too(triton_server):
    c = httpclient.InferenceServerClient(triton_server.http_url)
    t = httpclient.InferInput(specs.CLASSES, [1], "BYTES")
    t.set_data_from_numpy(np.array([b"   "], dtype=object))
    i = httpclient.InferInput(specs.IMAGE, [32, 32, 3], "UINT8")
    i.set_data_from_numpy(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="whitespace"):
        c.infer("dart", [i, t])


def test_model_config_exposes_build_parameters(triton_server):
    c = httpclient.InferenceServerClient(triton_server.http_url)
    cfg = c.get_model_config("dart")
    assert cfg["parameters"]["max_classes"]["string_value"] == str(TEST_MAX_CLASSES)
    assert json.loads(json.dumps(cfg))["input"][1]["name"] == specs.CLASSES


def test_perf_analyzer_against_dart(triton_server, photo, tmp_path):
    from dart_triton.benchmarks.perf_analyzer import (
        find_perf_analyzer,
        run_perf_analyzer,
        write_input_data,
    )

    try:
        find_perf_analyzer()
    except Exception as exc:
        pytest.fail(f"perf_analyzer must be installed by scripts/install_triton_tools.sh: {exc}")
    data = write_input_data(tmp_path / "input.json", {
        specs.IMAGE: photo, specs.CLASSES: np.array(["person", "rocket", "flag"], dtype=object)})
    rows = run_perf_analyzer("dart", triton_server.grpc_url, data, concurrency_range=2,
                             measurement_interval_ms=3400, protocol="grpc",
                             csv_path=tmp_path / "perf.csv", timeout=120,
                             # a shared 2-core CI box is never "stable" to 10 %: what is
                             # tested is that every request succeeds, not the figure
                             stability_percentage=999, max_trials=5)
    assert rows and rows[0]["throughput_infer_per_sec"] > 0
    log = (tmp_path / "perf.log").read_text() if (tmp_path / "perf.log").exists() else ""
    assert "error" not in log.lower()
