"""Shared checks for repositories built with `--backbone` (pruned:, student:).

A repository's backbone is served by tritonserver (python backend: ONNX Runtime), and
the in-process reference is `DartPipeline` over the same checkpoint with the same
backbone module in PyTorch. The torch backend is checked in process: its modules,
rebuilt from the repository's safetensors, against the same reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from dart_triton.client import DartClient
from dart_triton.contract import specs
from tests.parity import EVERY_QUERY, NAMES, assert_served_same

MAX_CLASSES = 4
# (model, N) of the served-vs-in-process check every backbone choice passes: one pass and
# two through dart, one and a full pass through the ensemble.
SERVED_CASES = [(specs.DART, 1), (specs.DART, MAX_CLASSES + 1), (specs.DART_ENSEMBLE, 1),
                (specs.DART_ENSEMBLE, MAX_CLASSES)]


@pytest.mark.server
@pytest.mark.parametrize("model, n", SERVED_CASES)
def test_served_equals_in_process(backbone_server, backbone_reference, photo, model, n):
    """Collected by each module that imports it, with that module's backbone (`spec`)."""
    check_served_detections(backbone_server, backbone_reference[0], photo, model, n)


def reference_pipeline(checkpoint, backbone: str):
    from dart_triton.backbones.choice import with_backbone
    from dart_triton.model.parts import load_parts
    from dart_triton.pipeline.detectors import DartPipeline

    parts = with_backbone(load_parts(checkpoint, max_classes=MAX_CLASSES), backbone)
    return DartPipeline.from_parts(parts), parts


def build(checkpoint, repo, backbone: str, backend: str = "python"):
    from dart_triton.export.repository import build_repository

    return build_repository(checkpoint, repo, backend=backend, max_classes=MAX_CLASSES,
                            backbone=backbone, log=lambda *_: None)


def check_served_detections(server, pipeline, photo, model: str, n: int) -> None:
    with DartClient(server.grpc_url, model=model) as c:
        served = c.detect(photo, NAMES[:n])
        every = c.detect(photo, NAMES[:n], **EVERY_QUERY)
    assert_served_same(served, pipeline.detect(photo, NAMES[:n]))
    ref_every = pipeline.detect(photo, NAMES[:n], **EVERY_QUERY)
    assert len(every) == len(ref_every) > 0
    assert_served_same(every, ref_every)


def check_served_features(server, parts) -> np.ndarray:
    """The served backbone's features for random pixels equal the in-process backbone's
    (`parts.backbone`); returns them."""
    import torch

    size = parts.dims.imgsz
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        inp = grpcclient.InferInput(specs.PIXEL_VALUES, list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        got = c.infer(specs.BACKBONE, [inp]).as_numpy(specs.FPN_FEATURES)
    with torch.no_grad():
        want = parts.backbone(torch.from_numpy(pixels))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
    return got


def dart_backbone_parameter(server) -> str:
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        config = c.get_model_config(specs.DART, as_json=True)["config"]
    return config["parameters"]["backbone"]["string_value"]


def torch_backend_detections(repo, parts, photo, n: int):
    """The torch backend's modules from `repo`, in process, through DartPipeline."""
    from dart_triton.graphs.torch_graphs import TorchGraphs
    from dart_triton.model.text_encoder import TextEncoder
    from dart_triton.pipeline.detectors import DartPipeline

    graphs = TorchGraphs.from_repository(repo)
    pipeline = DartPipeline(graphs, TextEncoder.from_sam3(parts.model, parts.tokenizer),
                            parts.dims.imgsz, MAX_CLASSES)
    return pipeline.detect(photo, NAMES[:n], **EVERY_QUERY)
