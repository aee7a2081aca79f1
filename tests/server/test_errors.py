"""Error codes and failure counts on a real tritonserver, with a real dead sub-model.

A private, unsupervised server: the test SIGKILLs its `backbone` stub, which the 2.51
python backend never restarts (that is the supervisor's job, tests/server/test_supervision.py).
"""

from __future__ import annotations

import re
import signal
import time
import urllib.request

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dart_triton.client import DartClient
from dart_triton.contract import specs

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(python_repository):
    from dart_triton.serving.server import TritonServer

    with TritonServer(python_repository, startup_timeout=180,
                      extra_args=["--exit-timeout-secs=5"]) as s:
        yield s


def metric(server, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def raw_infer(server, model: str, image: np.ndarray, classes: list[bytes]):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = [grpcclient.InferInput(specs.IMAGE, list(image.shape), "UINT8"),
              grpcclient.InferInput(specs.CLASSES, [len(classes)], "BYTES")]
    inputs[0].set_data_from_numpy(image)
    inputs[1].set_data_from_numpy(np.array(classes, dtype=object))
    return client.infer(model, inputs)


def stub_of(server, model: str) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    stubs = [p for p in children if "triton_python_backend_stub" in " ".join(p.cmdline())
             and any(a.startswith(f"{model}_") for a in p.cmdline())]
    assert len(stubs) == 1, [p.cmdline() for p in children]
    return stubs[0]


def test_bad_requests_are_invalid_argument_and_counted(server, photo):
    before = metric(server, "dart_request_failures_total", code="INVALID_ARG")
    with pytest.raises(InferenceServerException) as err:
        raw_infer(server, specs.DART, photo, [b""])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "CLASSES[0] is empty" in err.value.message()
    assert metric(server, "dart_request_failures_total", code="INVALID_ARG") == before + 1
    # The ensemble's failures are counted by Triton itself (2.51 counts one failed ensemble
    # request under more than one failure reason, hence >=).
    before = metric(server, "nv_inference_request_failure", model=specs.DART_ENSEMBLE)
    with pytest.raises(InferenceServerException) as err:
        raw_infer(server, specs.DART_ENSEMBLE, photo, [b""])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert metric(server, "nv_inference_request_failure",
                  model=specs.DART_ENSEMBLE) >= before + 1


def test_dead_backbone_is_a_server_error_naming_it(server, photo):
    """Runs last in this module: it leaves the server without a backbone."""
    with DartClient(server.grpc_url) as client:
        assert len(client.detect(photo, ["person"], score_threshold=0.0)) > 0
    stub = stub_of(server, specs.BACKBONE)
    stub.send_signal(signal.SIGKILL)
    # tritonserver does not reap its stubs: a killed one lingers as a zombie.
    deadline = time.monotonic() + 30
    while stub.is_running() and stub.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the stub survived SIGKILL"
        time.sleep(0.1)
    before = metric(server, "dart_request_failures_total")
    with pytest.raises(InferenceServerException) as err:
        raw_infer(server, specs.DART, photo, [b"person"])
    # Not the client's fault: never INVALID_ARGUMENT. A dead stub is UNAVAILABLE (the
    # supervising `dart-triton serve` restarts the server, so retrying helps).
    assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
    assert "model 'backbone' failed" in err.value.message()
    assert metric(server, "dart_request_failures_total", code="UNAVAILABLE") >= 1
    assert metric(server, "dart_request_failures_total") == before + 1

