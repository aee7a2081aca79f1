"""`build --backbone student:DIR` (issue 11) on a real tritonserver, tiny variant d.

The student is a real `dart-triton distill` run (a timm trunk with an FPN adapter, one
epoch on scikit-image's photographs). The served `dart` and `dart_ensemble` return the
in-process pipeline's detections with the same student; the torch backend's rebuilt
student agrees too.
"""

from __future__ import annotations

import os

import pytest
import torch

from dart_triton.contract import specs
from tests.parity import EVERY_QUERY, NAMES, assert_served_same
from tests.server.backbone_serving import (  # the served check is collected here too
    build,
    check_served_features,
    dart_backbone_parameter,
    test_served_equals_in_process,  # noqa: F401
    torch_backend_detections,
)

if not os.environ.get("CI"):  # CI installs timm (scripts/setup.sh): there it must run
    pytest.importorskip("timm", reason="timm students need timm + torchvision")

STUDENT = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def student_dir(tiny_checkpoint_d, photo_dir, tmp_path_factory):
    from dart_triton.cli import main as cli

    out = tmp_path_factory.mktemp("student") / "student"
    assert cli(["distill", "--teacher", str(tiny_checkpoint_d), "--student", f"timm:{STUDENT}",
                "--images", str(photo_dir), "--epochs", "1", "--batch-size", "3",
                "--lr", "0.1", "--pretrained", "none", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def spec(student_dir) -> str:  # the --backbone value this module serves
    return "student:" + str(student_dir)


@pytest.mark.server
def test_backbone_serves_the_student(backbone_server, backbone_reference, student_dir):
    _, parts = backbone_reference
    got = check_served_features(backbone_server, parts)
    assert got.shape == (1, parts.dims.fpn_dim, parts.dims.feat_hw, parts.dims.feat_hw)
    assert dart_backbone_parameter(backbone_server) == (
        f"student:{student_dir.resolve()} (timm {STUDENT})")


def test_torch_backend_serves_the_student(tiny_checkpoint_d, spec, backbone_reference, photo,
                                          tmp_path):
    from dart_triton.backbones.students import TimmStudent
    from dart_triton.graphs.torch_graphs import load_graph_module, weights_dir

    pipeline, parts = backbone_reference
    build(tiny_checkpoint_d, tmp_path, spec, backend="torch")
    module, _ = load_graph_module(weights_dir(tmp_path, specs.BACKBONE), specs.BACKBONE)
    assert isinstance(module, TimmStudent)
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], parts.backbone(x)[0], atol=1e-5, rtol=1e-5)
    got = torch_backend_detections(tmp_path, parts, photo, 3)
    assert_served_same(got, pipeline.detect(photo, NAMES[:3], **EVERY_QUERY))
