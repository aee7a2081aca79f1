"""A checkpoint whose detection level is not at stride 14, in process and served.

Tiny variant c has FPN scales [4, 2, 1] (valid for Sam3Model, not SAM3's default
[4, 2, 1, 0.5]): Sam3Model then feeds its enc-dec the 2x level, 18x18 at 126 px, where
imgsz / 14 would be 9x9. Every result must still equal Sam3Model run once per prompt.
"""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient

from dart_triton.client import DartClient
from dart_triton.contract import specs
from tests.conftest import TEST_MAX_CLASSES
from tests.parity import EVERY_QUERY, NAMES, assert_same, assert_same_masks, assert_served_same


@pytest.fixture(scope="module")
def parts_c(tiny_checkpoint_c):
    from dart_triton.model.parts import load_parts

    return load_parts(tiny_checkpoint_c, max_classes=TEST_MAX_CLASSES)


@pytest.fixture(scope="module")
def naive_c(parts_c):
    from dart_triton.pipeline.detectors import NaivePipeline

    return NaivePipeline(parts_c.model, parts_c.tokenizer)


def test_variant_c_detects_at_stride_7(parts_c):
    d = parts_c.dims
    assert d.scale_factors == (4.0, 2.0, 1.0)
    assert (d.imgsz, d.detection_stride, d.feat_hw) == (126, 7.0, 18)
    assert specs.enc_dec_spec(d).input(specs.FPN_FEATURES).dims == (1, d.fpn_dim, 18, 18)


@pytest.mark.parametrize("n", [1, 3, 2 * TEST_MAX_CLASSES + 1])
def test_in_process_pipeline_equals_naive(parts_c, naive_c, photo, n):
    from dart_triton.pipeline.detectors import DartPipeline

    ours = DartPipeline.from_parts(parts_c)
    assert_same(ours.detect(photo, NAMES[:n]), naive_c.detect(photo, NAMES[:n]))
    every = ours.detect(photo, NAMES[:n], **EVERY_QUERY)
    assert len(every) == n * parts_c.dims.num_queries
    assert_same(every, naive_c.detect(photo, NAMES[:n], **EVERY_QUERY))


@pytest.fixture(scope="module")
def server_c(tiny_checkpoint_c, tmp_path_factory):
    from dart_triton.export.repository import build_repository
    from dart_triton.serving.server import TritonServer

    repo = tmp_path_factory.mktemp("repo_python_c")
    build_repository(tiny_checkpoint_c, repo, backend="python", max_classes=TEST_MAX_CLASSES,
                     masks=True, log=lambda *_: None)
    with TritonServer(repo, startup_timeout=180,
                      extra_args=["--exit-timeout-secs=5"]) as server:
        yield server


@pytest.mark.server
def test_served_graphs_use_the_2x_level(server_c, parts_c):
    side = parts_c.dims.feat_hw
    with grpcclient.InferenceServerClient(server_c.grpc_url) as c:
        backbone = c.get_model_metadata(specs.BACKBONE, as_json=True)
        enc_dec = c.get_model_metadata(specs.ENC_DEC, as_json=True)
    fpn_out = next(t for t in backbone["outputs"] if t["name"] == specs.FPN_FEATURES)
    fpn_in = next(t for t in enc_dec["inputs"] if t["name"] == specs.FPN_FEATURES)
    want = ["1", str(parts_c.dims.fpn_dim), str(side), str(side)]
    assert fpn_out["shape"] == fpn_in["shape"] == want


@pytest.mark.server
@pytest.mark.parametrize("n", [1, 3, 3 * TEST_MAX_CLASSES])
def test_served_masks_equal_sam3s(server_c, naive_c, photo, n):
    """Masks at stride 7 (one finer level) from the python backend (`test_masks.py` has
    the other backend/variant pairs)."""
    with DartClient(server_c.grpc_url) as c:
        served = c.detect(photo, NAMES[:n], masks=True)
    assert_same_masks(served, naive_c.detect(photo, NAMES[:n], masks=True))


@pytest.mark.server
@pytest.mark.parametrize("model", [specs.DART, specs.DART_ENSEMBLE])
@pytest.mark.parametrize("n", [1, 3])
def test_served_equals_naive(server_c, naive_c, photo, model, n):
    with DartClient(server_c.grpc_url, model=model) as c:
        served = c.detect(photo, NAMES[:n])
        every = c.detect(photo, NAMES[:n], **EVERY_QUERY)
    ref = naive_c.detect(photo, NAMES[:n])
    assert len(ref) > 0  # the default threshold keeps something to compare
    assert_served_same(served, ref)
    assert len(every) == n * naive_c.model.config.detr_decoder_config.num_queries
    assert_served_same(every, naive_c.detect(photo, NAMES[:n], **EVERY_QUERY))
