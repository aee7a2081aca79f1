"""The tritonserver launcher, `dart-triton serve` and perf_analyzer, against a real server.

The models are throwaway python-backend models written to a temporary repository:
`echo` imports numpy, torch and dart_triton.contract.specs (so loading it proves the stub runs
in this environment and sees the project), echoes IMAGE and counts CLASSES.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dart_triton.benchmarks.perf_analyzer import (
    PerfAnalyzerError,
    PerfAnalyzerUnstable,
    find_perf_analyzer,
    parse_csv,
    run_perf_analyzer,
    write_input_data,
)
from dart_triton.serving import binaries as server_module
from dart_triton.serving.binaries import TritonServerError, find_tritonserver, stub_python_bin
from dart_triton.serving.logs import failure_reasons
from dart_triton.serving.processes import free_port, group_members, shm_regions
from dart_triton.serving.serve import serve_main as serve
from dart_triton.serving.server import TritonServer

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BOOM = "checkpoint missing: boom-5791"

ECHO_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }},
  {{ name: "CLASSES" data_type: TYPE_STRING dims: [ -1 ] }}
]
output [
  {{ name: "IMAGE_OUT" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }},
  {{ name: "NUM_CLASSES" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

ECHO_MODEL = """\
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from dart_triton.contract import specs


class TritonPythonModel:
    def initialize(self, args):
        self.info = json.dumps({"torch": torch.__version__, "specs": specs.__file__})

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, specs.IMAGE).as_numpy()
            classes = pb_utils.get_input_tensor_by_name(request, specs.CLASSES).as_numpy()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("IMAGE_OUT", image),
                pb_utils.Tensor("NUM_CLASSES", np.array([classes.size], np.int32)),
                pb_utils.Tensor("INFO", np.array([self.info.encode()], dtype=np.object_)),
            ]))
        return responses
"""

BAD_MODEL = f'''\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("{BOOM}")
'''


def _add_model(repo: Path, name: str, source: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(ECHO_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(source)


def _need(find) -> None:
    try:
        find()
    except FileNotFoundError as err:
        # CI must have run scripts/install_triton_tools.sh: a skip there would hide it.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(str(err))


@pytest.fixture(scope="session")
def echo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("echo_repo")
    _add_model(repo, "echo", ECHO_MODEL)
    return repo


@pytest.fixture(scope="session")
def bad_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("bad_repo")
    _add_model(repo, "broken", BAD_MODEL)
    return repo


@pytest.fixture(scope="session")
def server(echo_repo: Path):
    _need(find_tritonserver)
    # A short exit timeout: shutdown otherwise waits up to 30 s for idle keep-alives.
    with TritonServer(echo_repo, env=OFFLINE, extra_args=["--exit-timeout-secs=5"]) as srv:
        yield srv


def _inputs(module, image: np.ndarray, classes: list[str]):
    image_in = module.InferInput("IMAGE", list(image.shape), "UINT8")
    image_in.set_data_from_numpy(image)
    classes_in = module.InferInput("CLASSES", [len(classes)], "BYTES")
    classes_in.set_data_from_numpy(np.array([c.encode() for c in classes], dtype=np.object_))
    return [image_in, classes_in]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_echo_over_http_and_grpc(server: TritonServer, protocol: str) -> None:
    if protocol == "http":
        import tritonclient.http as module

        client = module.InferenceServerClient(server.http_url)
    else:
        import tritonclient.grpc as module

        client = module.InferenceServerClient(server.grpc_url)
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    classes = ["person", "traffic light", "chaise longue ü"]
    try:
        result = client.infer("echo", _inputs(module, image, classes))
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("IMAGE_OUT"), image)
    assert result.as_numpy("NUM_CLASSES").tolist() == [3]
    info = json.loads(result.as_numpy("INFO")[0])
    import torch

    import dart_triton.contract.specs

    assert info == {"torch": torch.__version__, "specs": dart_triton.contract.specs.__file__}


@pytest.mark.server
def test_binds_loopback_and_serves_metrics(server: TritonServer) -> None:
    assert server.http_url.startswith("127.0.0.1:")
    assert server.grpc_url.startswith("127.0.0.1:")
    with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
        assert b"nv_inference_request_success" in resp.read()
    assert "Started HTTPService at 127.0.0.1:" in server.log_text()


@pytest.mark.server
def test_failed_model_error_quotes_the_exception(bad_repo: Path, tmp_path: Path) -> None:
    _need(find_tritonserver)
    log = tmp_path / "triton.log"  # a failed start keeps its log: keep it out of /tmp
    server = TritonServer(bad_repo, env=OFFLINE, log_path=log)
    with pytest.raises(TritonServerError) as info:
        server.start()
    server.close()
    message = str(info.value)
    assert f"(full log: {log})" in message and log.is_file()
    assert BOOM in message
    assert "failed to load 'broken'" in message
    assert "CudaDriverHelper" not in message  # CPU-only noise is filtered out


@pytest.mark.server
def test_serve_exits_nonzero_with_the_reason(
    bad_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _need(find_tritonserver)
    ports = [f"--{n}-port={free_port()}" for n in ("http", "grpc", "metrics")]
    code = serve(["--model-repository", str(bad_repo), "--log-file", str(tmp_path / "log"), *ports])
    err = capsys.readouterr().err
    assert code == 1
    assert BOOM in err and "--exit-on-error=false" in err


@pytest.mark.server
def test_serve_runs_in_foreground_until_sigint(echo_repo: Path, tmp_path: Path) -> None:
    _need(find_tritonserver)
    http = free_port()
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable, "-m", "dart_triton.cli", "serve", "--model-repository", str(echo_repo),
        f"--http-port={http}", f"--grpc-port={free_port()}", f"--metrics-port={free_port()}",
        "--exit-timeout-secs=5",  # passed through to tritonserver
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE}
        )
        try:
            # The ready line comes after serve's own /v2/health/ready check passed.
            deadline = time.monotonic() + 60
            while "dart-triton serve: ready" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready") as resp:
                assert resp.status == 200
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 0, text
    assert "successfully loaded 'echo'" in text  # the server log is echoed to stdout
    assert "Signal (2) received" in text  # forwarded to tritonserver, which shut down
    # No `dart` here: supervised for crashes only; the summary ends the output.
    assert "no model 'dart' is ready: deep health checks are off" in text
    assert "exit summary: stopped by SIGINT after" in text and "0 restart(s)" in text


@pytest.mark.server
def test_crash_reason_cleanup_and_restart_on_the_same_ports(echo_repo: Path) -> None:
    _need(find_tritonserver)
    with TritonServer(echo_repo, env=OFFLINE, extra_args=["--exit-timeout-secs=5"]) as srv:
        assert srv.process is not None
        first, ports = srv.process.pid, dict(srv.ports)
        group = srv.group_pids()
        assert first in group and len(group) == 2  # tritonserver and the echo stub
        assert len(shm_regions(srv.shm_prefix)) == 1  # the stub's region, named by our prefix
        os.kill(first, signal.SIGSEGV)
        srv.process.wait(30)
        assert srv.death_reason() == "tritonserver was killed by SIGSEGV: Signal (11) received."
        srv.stop()
        assert group_members(first) == [] and shm_regions(srv.shm_prefix) == []

        srv.start()  # again, on the same ports; the log is appended to
        assert srv.process.pid != first and srv.ports == ports
        assert "Signal (11)" not in srv.log_text()  # this run's log only
        assert "Signal (11) received." in srv.log_path.read_text()
        with urllib.request.urlopen(f"http://{srv.http_url}/v2/health/ready") as resp:
            assert resp.status == 200
        second = srv.process.pid
    assert group_members(second) == [] and shm_regions(srv.shm_prefix) == []


def _real_image() -> np.ndarray:
    try:
        from skimage import data  # dev extra; the image ships inside the wheel

        return data.astronaut()[::2, ::2]
    except ImportError:
        y, x = np.mgrid[0:256, 0:256]
        return np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)


@pytest.mark.server
def test_perf_analyzer_drives_the_echo_model(server: TritonServer, tmp_path: Path) -> None:
    _need(find_perf_analyzer)
    image = _real_image()
    classes = ["person", "rocket", "flag"]
    data = write_input_data(tmp_path / "input.json", {"IMAGE": image, "CLASSES": classes})
    spec = json.loads(data.read_text())["data"][0]
    assert spec["CLASSES"] == {"content": classes, "shape": [3]}
    assert spec["IMAGE"]["shape"] == list(image.shape)

    rows = run_perf_analyzer(
        "echo", server.http_url, data, concurrency_range=1, measurement_interval_ms=1000,
        stability_percentage=1000, max_trials=3, csv_path=tmp_path / "perf.csv", timeout=60,
    )  # fmt: skip
    assert len(rows) == 1
    row = rows[0]
    assert row["concurrency"] == 1
    assert row["throughput_infer_per_sec"] > 0
    assert row["p99_latency_us"] >= row["p50_latency_us"] > 0
    assert row["server_compute_infer_us"] > 0
    log = (tmp_path / "perf.log").read_text()
    assert "error" not in log.lower(), log


# Without a server ---------------------------------------------------------------------


def test_failure_reasons_picks_the_model_error_and_the_bad_flag() -> None:
    log = "\n".join(
        [
            'E1125 10:23:10.218538 5939 a.cc:1] "CudaDriverHelper has not been initialized."',
            'E1125 10:23:11.815636 5939 backend_model.cc:692] "ERROR: Failed to create instance: '
            'RuntimeError: x\\n\\nAt:\\n  model.py(3): initialize\\n"',
            "E1125 10:23:11.815752 5939 model_lifecycle.cc:642] \"failed to load 'm' version 1: "
            'Internal: RuntimeError: x\\n\\nAt:\\n  model.py(3): initialize\\n"',
            "error: creating server: Internal - failed to load all models",
        ]
    )
    assert failure_reasons(log) == (
        "failed to load 'm' version 1: Internal: RuntimeError: x\n\nAt:\n  model.py(3): initialize"
        "\nerror: creating server: Internal - failed to load all models"
    )
    usage = "tritonserver: unrecognized option '--nope'\nUsage: tritonserver [options]\n"
    usage += "  --help\n\tPrint usage\n\nServer:\n  --id <string>\n"
    assert failure_reasons(usage) == "tritonserver: unrecognized option '--nope'"


def test_stub_python_prefers_the_overlay_and_refuses_numpy2_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if server_module.bundled_tritonserver_dir() is None:
        pytest.skip("nvidia-pytriton is not installed")
    monkeypatch.setenv("DART_TRITON_TOOLS", str(tmp_path))
    monkeypatch.setattr(server_module.importlib.metadata, "version", lambda _: "2.1.0")
    with pytest.raises(TritonServerError, match=r"numpy 2\.1\.0"):
        stub_python_bin()
    monkeypatch.setattr(server_module.importlib.metadata, "version", lambda _: "1.26.4")
    assert stub_python_bin() == Path(sys.executable).parent
    overlay = tmp_path / "triton-python"
    overlay.mkdir()
    py = f"py{sys.version_info[0]}.{sys.version_info[1]}"
    (overlay / "FOR_PREFIX").write_text(f"{sys.prefix} numpy==1.26.4 {py}\n")
    assert stub_python_bin() == overlay / "bin"
    (overlay / "FOR_PREFIX").write_text(f"/some/other/venv numpy==1.26.4 {py}\n")
    assert stub_python_bin() == Path(sys.executable).parent
    (overlay / "FOR_PREFIX").write_text(f"{sys.prefix} numpy==1.26.4 py2.7\n")
    assert stub_python_bin() == Path(sys.executable).parent


def test_input_data_json_format(tmp_path: Path) -> None:
    path = write_input_data(tmp_path / "in.json", [
        {"IMAGE": np.arange(6, dtype=np.uint8).reshape(1, 2, 3), "CLASSES": ["a", "b"]},
        {"X": np.array([1.5], ">f4"), "RAW": np.array([b"\xff"], dtype=np.object_)},
    ])  # fmt: skip
    first, second = json.loads(path.read_text())["data"]
    assert first["IMAGE"] == {"content": {"b64": "AAECAwQF"}, "shape": [1, 2, 3]}
    assert first["CLASSES"] == {"content": ["a", "b"], "shape": [2]}
    assert second["X"]["content"] == {"b64": "AADAPw=="}  # little-endian 1.5
    # Non-UTF-8 bytes: Triton's serialisation, a uint32 length before each element.
    assert second["RAW"] == {"content": {"b64": "AQAAAP8="}, "shape": [1]}


def test_parse_csv_names_columns_and_orders_by_load(tmp_path: Path) -> None:
    csv_path = tmp_path / "out.csv"
    csv_path.write_text(
        "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
        "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
        "p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,"
        "response wait,Avg GPU Utilization\n"
        "2,866.409,26,1248,334,53,199,420,1,1958,3180,4729,10481,2283,27,2136,\n"
        "1,899.439,17,561,22,31,136,320,1,748,1159,3368,6259,1091,18,914,\n"
    )
    rows = parse_csv(csv_path)
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert rows[0]["throughput_infer_per_sec"] == pytest.approx(899.439)
    assert rows[0]["p99_latency_us"] == 6259
    assert rows[0]["server_queue_us"] == 22
    assert rows[0]["server_compute_infer_us"] == 136
    assert rows[0]["avg_gpu_utilization"] is None


def _fake_perf_analyzer(tmp_path: Path, message: str) -> Path:
    exe = tmp_path / "perf_analyzer"
    exe.write_text(f"#!/bin/sh\necho 'Request concurrency: 2'\necho '{message}'\nexit 2\n")
    exe.chmod(0o755)
    return exe


def test_unstable_measurement_is_told_apart_from_other_failures(tmp_path: Path) -> None:
    unstable = _fake_perf_analyzer(tmp_path, "Failed to obtain stable measurement.")
    with pytest.raises(PerfAnalyzerUnstable, match="stable measurement"):
        run_perf_analyzer("m", "127.0.0.1:1", binary=unstable, csv_path=tmp_path / "a.csv")
    (tmp_path / "perf_analyzer").unlink()
    broken = _fake_perf_analyzer(tmp_path, "error: failed to get model metadata")
    with pytest.raises(PerfAnalyzerError, match="model metadata") as err:
        run_perf_analyzer("m", "127.0.0.1:1", binary=broken, csv_path=tmp_path / "b.csv")
    assert not isinstance(err.value, PerfAnalyzerUnstable)
    assert "exited with code 2" in str(err.value)


def test_sweep_orphans_of_a_dead_launcher(tmp_path):
    """A SIGKILLed launcher cannot clean up: tritonserver goes (parent-death signal), its
    stubs ignore SIGTERM and stay, with their /dev/shm regions. The next start removes
    them, and leaves alone what belongs to a live launcher."""
    from dart_triton.serving.processes import SHM_DIR, sweep_orphans

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the dead launcher
    dead, live = f"dart_triton_{gone.pid}_abcd1234_", f"dart_triton_{os.getpid()}_abcd1234_"
    stubs = {prefix: subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "triton_python_backend_stub",
         f"{prefix}0d461d8f"]) for prefix in (dead, live)}
    regions = {prefix: SHM_DIR / f"{prefix}region" for prefix in (dead, live)}
    for path in regions.values():
        path.write_bytes(b"x")
    try:
        killed, removed = sweep_orphans()
        assert stubs[dead].wait(timeout=10) == -signal.SIGKILL
        assert not regions[dead].exists()
        assert stubs[live].poll() is None and regions[live].exists()
        assert killed >= 1 and removed >= 1
    finally:
        stubs[live].kill()
        stubs[live].wait()
        regions[live].unlink(missing_ok=True)
