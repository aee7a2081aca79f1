"""Small helpers shared by test modules: running a command's entry point in process,
waiting for a server process to answer readiness, and reading what the product wrote
(CSV files, process command lines, ONNX graphs)."""

from __future__ import annotations

import csv
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The checkout's root (tests/ is one level down).
REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(main: Callable, argv, capsys) -> tuple[int, str, list[str]]:
    """(exit status, stdout, non-blank stderr lines) of a command-line entry point."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def wait_http_ready(proc: subprocess.Popen, http_port: int, timeout: float,
                    output: Callable[[], str]) -> None:
    """Until 127.0.0.1:`http_port` answers /v2/health/ready; fails (quoting `output()`)
    when `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n"
                                 f"{output()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready",
                                        timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout:.0f} s:\n{output()[-4000:]}")


def read_csv(path: Path) -> list[dict[str, Any]]:
    """A CSV written by `benchmarks.common.write_csv`, numbers parsed back."""
    def parse(v: str) -> Any:
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def process_args(pid: int) -> list[str]:
    """The command line of ``pid`` ([] when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def conv_gelu_pairs(path: str | Path) -> int:
    """How many Conv outputs of an ONNX graph feed a GELU directly."""
    import onnx

    from dart_triton.export.conv_gelu import feeds_gelu

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return sum(node.op_type == "Conv" and feeds_gelu(node.output[0], consumers)
               for node in graph.node)


def mask_levels(vision_model) -> list[int]:
    """Neck indices for detection first, then the finer levels the mask head reads."""
    from dart_triton.model.backbone import neck_dims

    return list(neck_dims(vision_model, masks=True).backbone_levels)


def metric_total(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's values over the lines whose labels include
    `labels` (0 when none), read from a tritonserver's metrics endpoint."""
    import re

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total
