"""Input limits on the real server: requests that are legal, or were accepted, but could
take a server down: a 10 MB class name, SCORE_THRESHOLD 0 over 1024 classes, and more
classes than `dart_ensemble`'s one enc_dec pass takes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dart_triton.client import DartClient
from dart_triton.contract import specs
from tests.conftest import TEST_MAX_CLASSES
from tests.helpers import metric_total
from tests.parity import assert_same, raw_inputs

pytestmark = pytest.mark.server

TIMEOUT_S = 120  # a bound on a hung call (the test fails), not a speed claim


@pytest.fixture(scope="module")
def grpc(triton_server):
    return grpcclient.InferenceServerClient(triton_server.grpc_url)


def successes(client, model: str) -> int:
    """How many requests `model` has run to completion (Triton's own statistics)."""
    stats = client.get_inference_statistics(model_name=model)
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def refusal(client, model: str, inputs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, client_timeout=TIMEOUT_S)
    return info.value


@pytest.mark.parametrize("model", [specs.DART, specs.DART_ENSEMBLE])
def test_a_10_mb_class_name_is_refused_before_the_text_encoder(grpc, triton_server, naive,
                                                               photo, model):
    encoded = successes(grpc, specs.TEXT_ENCODER)
    huge = b"x" * (10 * 2**20)
    exc = refusal(grpc, model, raw_inputs(photo, [b"person", huge]))
    assert exc.status() == "StatusCode.INVALID_ARGUMENT"
    assert (f"CLASSES[1] is {len(huge)} bytes long; a class name is at most "
            f"{specs.MAX_CLASS_NAME_BYTES} bytes") in exc.message()
    assert successes(grpc, specs.TEXT_ENCODER) == encoded  # never tokenized
    assert grpc.is_server_ready() and grpc.is_model_ready(model)
    with DartClient(triton_server.grpc_url, model=model) as client:
        served = client.detect(photo, ["person", "rocket"])
    assert_same(served, naive.detect(photo, ["person", "rocket"]))


def test_score_threshold_zero_over_1024_classes(triton_server, parts, photo):
    """Every query of every class goes to NMS (1024 x the tiny model's queries; the in-process
    tests cover SAM3's 200 queries); the answer equals the in-process pipeline's."""
    from dart_triton.pipeline.detectors import DartPipeline

    names = [f"object {i}" for i in range(specs.MAX_REQUEST_CLASSES)]
    with DartClient(triton_server.grpc_url, timeout=TIMEOUT_S) as client:
        served = client.detect(photo, names, score_threshold=0.0)
    assert len(served) == specs.DEFAULT_MAX_DETECTIONS
    ref = DartPipeline.from_parts(parts).detect(photo, names, score_threshold=0.0)
    assert_same_up_to_ties(served, ref)


def test_small_requests_are_not_queued_behind_1024_classes(triton_server, photo):
    """Small requests sent while a request of 1024 classes (256 enc_dec passes of 4) runs
    are not queued behind all of its passes: they are answered before it is."""
    from dart_triton.contract.metrics import STEP_CALLS

    image = np.ascontiguousarray(photo[::4, ::4])
    big = [f"thing number {i}" for i in range(specs.MAX_REQUEST_CLASSES)]
    passes = lambda: metric_total(triton_server.metrics_url, STEP_CALLS,  # noqa: E731
                                  step=specs.ENC_DEC)
    finished: dict[str, float] = {}

    def send_big() -> None:
        with DartClient(triton_server.grpc_url, timeout=TIMEOUT_S) as client:
            client.detect(image, big)
        finished["big"] = time.monotonic()

    before = passes()
    sender = threading.Thread(target=send_big)
    sender.start()
    deadline = time.monotonic() + TIMEOUT_S
    while passes() < before + 8:  # its passes are running (after its text encoding)
        assert time.monotonic() < deadline and sender.is_alive()
        time.sleep(0.01)
    small = []
    with DartClient(triton_server.grpc_url, timeout=TIMEOUT_S) as client:
        for _ in range(3):
            client.detect(image, ["person"])
            small.append(time.monotonic())
    sender.join(TIMEOUT_S)
    assert "big" in finished
    assert max(small) < finished["big"], (small, finished)


def assert_same_up_to_ties(served, ref, atol: float = 5e-4, box_atol: float = 0.5) -> None:
    """`assert_same` for 1024 classes: the server's torch threads sum in another order, and
    over 7168 candidates that float noise reaches ~1e-4 in a score and ~0.1 px in a box
    (12 classes stay within 1e-5), reordering near-equal scores. So: sorted scores equal;
    each detection not tied with the cut-off is in the other list."""
    assert len(served) == len(ref)
    np.testing.assert_allclose(served.scores, ref.scores, atol=atol)
    unmatched = list(range(len(ref)))
    for box, score, cls in zip(served.boxes, served.scores, served.class_ids, strict=True):
        match = next((j for j in unmatched if ref.class_ids[j] == cls
                      and abs(ref.scores[j] - score) <= atol
                      and np.allclose(ref.boxes[j], box, atol=box_atol)), None)
        if match is not None:
            unmatched.remove(match)
        else:
            assert score <= ref.scores[-1] + atol, f"class {cls} {score} {box} not in reference"


def test_ensemble_refuses_more_classes_than_one_pass_first(grpc, photo):
    names = [f"ensemble limit probe {i}".encode() for i in range(TEST_MAX_CLASSES + 5)]
    before = {m: successes(grpc, m) for m in (specs.TEXT_ENCODER, specs.BACKBONE)}
    exc = refusal(grpc, specs.DART_ENSEMBLE, raw_inputs(photo, names))
    assert exc.status() == "StatusCode.INVALID_ARGUMENT"
    assert (f"dart_ensemble takes at most {TEST_MAX_CLASSES} classes per request (got "
            f"{len(names)}); send larger class lists to the `dart` model, which splits them "
            "into passes") in exc.message()
    # Before any other work: no name encoded, no backbone run.
    assert {m: successes(grpc, m) for m in before} == before
    out = grpc.infer(specs.DART, raw_inputs(photo, names), client_timeout=TIMEOUT_S)
    assert out.as_numpy(specs.SCORES) is not None  # what the message points at works
