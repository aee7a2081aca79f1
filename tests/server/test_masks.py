"""Masks on demand through a real tritonserver: `dart` answers RETURN_MASKS with the masks
SAM3 makes for the kept queries, a request without it makes exactly the calls it made
before, bad mask requests fail alone, and the commands (`detect --masks --json`, `label
--masks`, `coco-eval --iou-type segm`) write files that pycocotools and the YOLO format
accept.

Backend x variant, 1, 3 and 3 x max classes each: python/a (the session's server, here),
python/c (stride 7, `test_detection_level.py`), torch/a (`test_torch_graphs.py`), and
torch/c, torch/b and python/b here (one server each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from dart_triton.client import DartClient
from dart_triton.contract import specs
from dart_triton.contract.metrics import STEP_CALLS
from tests.conftest import TEST_MAX_CLASSES
from tests.helpers import metric_total, run_cli
from tests.parity import NAMES, assert_same_masks, raw_inputs

pytestmark = pytest.mark.server
COUNTS = [1, 3, 3 * TEST_MAX_CLASSES]


@pytest.fixture(scope="module", params=[("torch", "c"), ("torch", "b"), ("python", "b")],
                ids=lambda p: "-".join(p))
def other_server(request, tmp_path_factory):
    """(server, naive reference) for a --masks repository of a backend and a variant."""
    from dart_triton.export.options import parse_instances
    from dart_triton.export.repository import build_repository
    from dart_triton.model.parts import load_parts
    from dart_triton.pipeline.detectors import NaivePipeline
    from dart_triton.serving.server import TritonServer

    backend, variant = request.param
    checkpoint = request.getfixturevalue(f"tiny_checkpoint_{variant}")
    repo = tmp_path_factory.mktemp(f"repo_{backend}_masks_{variant}")
    build_repository(checkpoint, repo, backend=backend, max_classes=TEST_MAX_CLASSES,
                     masks=True, instances=parse_instances("preprocess=1,postprocess=1"),
                     log=lambda *_: None)
    parts = load_parts(checkpoint, max_classes=TEST_MAX_CLASSES)
    with TritonServer(repo, startup_timeout=240, extra_args=["--exit-timeout-secs=5"]) as server:
        yield server, NaivePipeline(parts.model, parts.tokenizer)


@pytest.mark.parametrize("n", COUNTS)
def test_python_backend_serves_sam3s_masks(triton_server, naive, photo, n):
    image = photo[:400, 60:]
    with DartClient(triton_server.grpc_url) as client:
        served = client.detect(image, NAMES[:n], masks=True)
    assert_same_masks(served, naive.detect(image, NAMES[:n], masks=True), max(image.shape))


@pytest.mark.parametrize("n", COUNTS)
def test_other_backends_and_variants_serve_sam3s_masks(other_server, photo, n):
    server, naive = other_server
    with DartClient(server.http_url, protocol="http") as client:
        served = client.detect(photo, NAMES[:n], masks=True, mask_threshold=0.4)
    assert_same_masks(served, naive.detect(photo, NAMES[:n], masks=True, mask_threshold=0.4))


def _model_counts(url: str, model: str) -> tuple[int, int]:
    stats = httpclient.InferenceServerClient(url).get_inference_statistics(model)
    entry = stats["model_stats"][0]
    return int(entry["inference_count"]), int(entry["execution_count"])


def test_without_return_masks_the_calls_are_as_before(triton_server, photo):
    """No mask_decoder call, one backbone call, three enc_dec passes; MASKS is [0]; the
    boxes are those of the same request with masks."""
    url, metrics = triton_server.http_url, triton_server.metrics_url
    before = {m: _model_counts(url, m) for m in (specs.BACKBONE, specs.ENC_DEC,
                                                 specs.MASK_DECODER)}
    mask_steps = metric_total(metrics, STEP_CALLS, step=specs.MASK_DECODER)
    names = NAMES[:2 * TEST_MAX_CLASSES + 1]
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    result = client.infer(specs.DART, raw_inputs(photo, names))
    assert result.as_numpy(specs.MASKS).shape == (0,)
    after = {m: _model_counts(url, m) for m in before}
    assert after[specs.MASK_DECODER] == before[specs.MASK_DECODER]
    assert after[specs.BACKBONE][0] == before[specs.BACKBONE][0] + 1
    assert after[specs.ENC_DEC][0] == before[specs.ENC_DEC][0] + 3
    assert metric_total(metrics, STEP_CALLS, step=specs.MASK_DECODER) == mask_steps
    with DartClient(triton_server.grpc_url) as c:
        with_masks = c.detect(photo, names, masks=True)
    np.testing.assert_array_equal(result.as_numpy(specs.BOXES), with_masks.boxes)
    np.testing.assert_array_equal(result.as_numpy(specs.CLASS_IDS), with_masks.class_ids)
    assert _model_counts(url, specs.MASK_DECODER)[0] > after[specs.MASK_DECODER][0]


def _mask_inputs(return_masks: bool, threshold: float | None = None) -> list:
    inputs = []
    flag = grpcclient.InferInput(specs.RETURN_MASKS, [1], "BOOL")
    flag.set_data_from_numpy(np.array([return_masks]))
    inputs.append(flag)
    if threshold is not None:
        t = grpcclient.InferInput(specs.MASK_THRESHOLD, [1], "FP32")
        t.set_data_from_numpy(np.array([threshold], dtype=np.float32))
        inputs.append(t)
    return inputs


@pytest.mark.parametrize("model, flag, threshold, message", [
    (specs.DART_ENSEMBLE, True, None, "send RETURN_MASKS to the `dart` model"),
    (specs.DART, True, 0.0, "MASK_THRESHOLD must be in (0, 1), got 0.0"),
    (specs.DART, True, 1.0, "MASK_THRESHOLD must be in (0, 1), got 1.0"),
    (specs.DART, False, -2.0, "MASK_THRESHOLD must be in (0, 1), got -2.0"),
])
def test_bad_mask_requests_fail_alone(triton_server, photo, model, flag, threshold, message):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [*raw_inputs(photo, NAMES[:2]), *_mask_inputs(flag, threshold)])
    assert "INVALID_ARG" in str(err.value.status()) and message in err.value.message()
    assert "Traceback" not in err.value.message()
    ok = client.infer(model, [*raw_inputs(photo, NAMES[:2]), *_mask_inputs(False)])
    assert ok.as_numpy(specs.BOXES).shape[1] == 4  # the server keeps serving


def test_detect_label_and_coco_eval_with_masks(triton_server, photo_dir, tmp_path, capsys):
    """The commands on real photographs: COCO results and datasets pycocotools loads, YOLO
    segmentation labels in the format's shape, mask AP from faster-coco-eval."""
    from pycocotools.coco import COCO

    from dart_triton.benchmarks.coco_eval import main as coco_eval
    from dart_triton.client.cli import detect_main
    from dart_triton.client.label import label_main

    url = triton_server.grpc_url
    photos = sorted(photo_dir.glob("*.png"))[:3]
    classes = ["person", "cat", "cup"]
    out = tmp_path / "dets.json"
    code, _, err = run_cli(detect_main, [*photos, "--classes", *classes, "--masks", "--json",
                                         out, "--score-threshold", "0.2", "--url", url], capsys)
    assert code == 0, err
    results = [d for r in json.loads(out.read_text()) for d in r["detections"]]
    assert results and all("segmentation" in d for d in results)

    dataset = tmp_path / "dataset"
    common = [photo_dir, "--classes", *classes, "--masks", "--score-threshold", "0.2",
              "--url", url, "--no-progress"]
    code, _, err = run_cli(label_main, [*common, "--out", dataset, "--format", "coco"], capsys)
    assert code == 0, err
    gt = dataset / "annotations" / "instances.json"
    coco = COCO(str(gt))
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and all(coco.annToMask(a).sum() == a["area"] for a in anns)
    code, _, err = run_cli(label_main, [*common, "--out", tmp_path / "yolo", "--format", "yolo"],
                           capsys)
    assert code == 0, err
    rows = [line.split() for p in (tmp_path / "yolo" / "labels").glob("*.txt")
            for line in p.read_text().splitlines()]
    assert rows
    for cls, *coords in rows:
        assert int(cls) in range(len(classes)) and len(coords) % 2 == 0 and len(coords) >= 6
        assert all(0.0 <= float(v) <= 1.0 for v in coords)

    # The server's own masks as ground truth: mask AP of the same request is perfect.
    run = tmp_path / "eval"
    code, _, err = run_cli(coco_eval, [
        "--images", photo_dir, "--annotations", gt, "--output", run, "--url", url,
        "--iou-type", "bbox", "segm", "--score-threshold", "0.2", "--no-progress"], capsys)
    assert code == 0, err
    by_type = json.loads((run / "metrics.json").read_text())["metrics_by_iou_type"]
    assert by_type["segm"]["AP"] > 0.99 and by_type["bbox"]["AP"] > 0.99
