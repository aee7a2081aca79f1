"""Drive Triton's perf_analyzer: find it, write its ``--input-data`` JSON, parse its CSV.

perf_analyzer comes from the tritonclient 2.49.0 wheel (later wheels dropped it) and
lives in ``.tools/`` (scripts/install_triton_tools.sh), or on PATH in an NGC SDK image.

Input-data JSON, one entry per request in ``"data"`` (perf_analyzer cycles through them):
numeric tensors as ``{"content": {"b64": <little-endian C-order bytes>}, "shape": [...]}``
(a 1008x1008x3 image is 4 MB of base64 instead of 12 MB of JSON numbers), strings as
``{"content": ["cat", "dog"], "shape": [2]}``. Giving ``shape`` per tensor is what lets
perf_analyzer drive inputs with dynamic dims (``[-1, -1, 3]``) without ``--shape``.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dart_triton.serving.binaries import tools_dir


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed; the text quotes its output."""


class PerfAnalyzerUnstable(PerfAnalyzerError):
    """perf_analyzer ran but found no window within ``--stability-percentage``.

    On a shared, noisy machine this is the load, not the server: callers may rerun with
    a wider percentage and say so next to the number.
    """


def find_perf_analyzer() -> Path:
    """``perf_analyzer`` on PATH, else the one scripts/install_triton_tools.sh put in .tools."""
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return Path(on_path)
    local = tools_dir() / "bin" / "perf_analyzer"
    if local.is_file():
        return local
    raise FileNotFoundError(
        f"perf_analyzer not found on PATH nor at {local}: run scripts/install_triton_tools.sh"
    )


# Input data ---------------------------------------------------------------------------


def _is_string_array(array: np.ndarray) -> bool:
    return array.dtype.kind in "OSU"


def _string_entry(array: np.ndarray) -> dict[str, Any]:
    items = [x.item() if isinstance(x, np.generic) else x for x in array.reshape(-1)]
    try:
        content: Any = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in items]
    except UnicodeDecodeError:
        # Not text: send Triton's BYTES serialisation (uint32 length + bytes per element).
        raw = b"".join(struct.pack("<I", len(x)) + x for x in items)
        content = {"b64": base64.b64encode(raw).decode("ascii")}
    return {"content": content, "shape": list(array.shape)}


def _numeric_entry(array: np.ndarray) -> dict[str, Any]:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {
        "content": {"b64": base64.b64encode(little.tobytes()).decode("ascii")},
        "shape": list(array.shape),
    }


def input_data_entry(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """One request's tensors in perf_analyzer's JSON form (arrays, lists or strings)."""
    entry = {}
    for name, value in tensors.items():
        array = np.asarray(value)  # a list of str becomes a "<U" array: a string tensor
        entry[name] = _string_entry(array) if _is_string_array(array) else _numeric_entry(array)
    return entry


def write_input_data(
    path: str | Path,
    tensors: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> Path:
    """Write an ``--input-data`` JSON file: one request, or a list of requests to cycle."""
    requests = [tensors] if isinstance(tensors, Mapping) else list(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": [input_data_entry(t) for t in requests]}))
    return path


# Running and parsing ------------------------------------------------------------------

# perf_analyzer's CSV header -> our key. Times are microseconds.
_COLUMNS = {
    "Concurrency": "concurrency",
    "Request Rate": "request_rate",
    "Inferences/Second": "throughput_infer_per_sec",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_send_recv_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_latency_us",
    "p90 latency": "p90_latency_us",
    "p95 latency": "p95_latency_us",
    "p99 latency": "p99_latency_us",
    "Avg latency": "avg_latency_us",
    "request/response": "request_response_us",
    "response wait": "response_wait_us",
}


def _key(header: str) -> str:
    return _COLUMNS.get(header) or re.sub(r"[^0-9a-z]+", "_", header.lower()).strip("_")


def _value(text: str | None) -> int | float | str | None:
    text = (text or "").strip()
    for kind in (int, float):
        try:
            return kind(text) if text else None
        except ValueError:
            pass
    return text


def parse_csv(path: str | Path) -> list[dict[str, Any]]:
    """perf_analyzer's ``-f`` CSV as dicts with numeric values, ordered by load level.

    Rows come back in perf_analyzer's order, which is not always the load order.
    """
    with open(path, newline="") as f:
        rows = [{_key(k): _value(v) for k, v in r.items()} for r in csv.DictReader(f)]
    load = "concurrency" if rows and "concurrency" in rows[0] else "request_rate"
    return sorted(rows, key=lambda r: r.get(load) or 0)


def _range(value: int | str | Sequence[int]) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    return ":".join(str(v) for v in value)


def run_perf_analyzer(
    model: str,
    url: str,
    input_data: str | Path | None = None,
    concurrency_range: int | str | Sequence[int] = 1,
    measurement_interval_ms: int = 5000,
    protocol: str = "http",
    extra_args: Sequence[str] = (),
    *,
    csv_path: str | Path | None = None,
    stability_percentage: float | None = None,
    max_trials: int | None = None,
    metrics_url: str | None = None,
    timeout: float | None = None,
    binary: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run perf_analyzer once and return one dict per load level (see ``parse_csv``).

    ``url`` is ``host:port`` (``TritonServer.http_url`` / ``grpc_url``). ``input_data`` is a
    JSON file from ``write_input_data`` or "random"/"zero". Each level takes at least
    three ``measurement_interval_ms`` windows; ``stability_percentage`` (default 10) and
    ``max_trials`` (default 10) bound how long it hunts for a stable one. The console
    output is kept next to the CSV (``.log``). Raises ``PerfAnalyzerError`` on failure,
    ``PerfAnalyzerUnstable`` when no window was stable.
    """
    exe = Path(binary) if binary else find_perf_analyzer()
    workdir = None
    if csv_path is None:
        workdir = tempfile.TemporaryDirectory(prefix="dart-triton-pa-")
        csv_path = Path(workdir.name) / "perf.csv"
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(exe), "-m", model, "-u", url, "-i", protocol.lower(),
        "--concurrency-range", _range(concurrency_range),
        "--measurement-interval", str(measurement_interval_ms),
        "-f", str(csv_path), "--verbose-csv",
    ]  # fmt: skip
    if input_data is not None:
        cmd += ["--input-data", str(input_data)]
    if stability_percentage is not None:
        cmd += ["--stability-percentage", str(stability_percentage)]
    if max_trials is not None:
        cmd += ["--max-trials", str(max_trials)]
    if metrics_url is not None:
        cmd += ["--collect-metrics", "--metrics-url", metrics_url]
    cmd += list(extra_args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        csv_path.with_suffix(".log").write_text(output)
        if proc.returncode != 0 or not csv_path.is_file():
            tail = "\n".join(output.splitlines()[-30:])
            error = (PerfAnalyzerUnstable if "Failed to obtain stable measurement" in output
                     else PerfAnalyzerError)
            raise error(
                f"perf_analyzer exited with code {proc.returncode}: {' '.join(cmd)}\n{tail}"
            )
        return parse_csv(csv_path)
    except subprocess.TimeoutExpired as err:
        raise PerfAnalyzerError(f"perf_analyzer ran past {timeout} s: {' '.join(cmd)}") from err
    finally:
        if workdir is not None:
            workdir.cleanup()
