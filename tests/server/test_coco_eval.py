"""coco-eval against the real server (tiny checkpoint): end to end, then a resume that
sends nothing for finished images."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from dart_triton.benchmarks.coco_eval import main as coco_eval
from tests.unit.benchmarks.test_coco_eval import IMAGES, coco  # noqa: F401 - the synthetic dataset fixture

pytestmark = pytest.mark.server


def _dart_requests(server) -> int:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    match = re.search(r'^nv_inference_request_success\{model="dart",version="1"\} (\d+)$',
                      text, re.M)
    return int(match.group(1)) if match else 0


def test_coco_eval_through_server_and_resume(triton_server, coco, tmp_path):  # noqa: F811
    images_dir, annotations = coco
    out = tmp_path / "run"
    args = ["--images", str(images_dir), "--annotations", str(annotations), "--output",
            str(out), "--url", triton_server.grpc_url, "--concurrency", "2", "--no-progress"]
    before = _dart_requests(triton_server)
    assert coco_eval(args) == 0
    assert _dart_requests(triton_server) - before == len(IMAGES)
    results = json.loads((out / "results.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"AP", "AP50", "AP75", "APS", "APM", "APL"} <= set(metrics)
    assert all(r["image_id"] in IMAGES for r in results)
    lines = (out / "detections.jsonl").read_text().splitlines()
    assert len(lines) == len(IMAGES)

    # A second run finds every image done: no request reaches the server.
    before = _dart_requests(triton_server)
    assert coco_eval(args) == 0
    assert _dart_requests(triton_server) == before
    assert json.loads((out / "results.json").read_text()) == results
