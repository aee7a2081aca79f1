"""`build --backbone pruned:PLAN.json:K` (issue 11) on a real tritonserver, tiny variant d.

The served `dart` and `dart_ensemble` return the detections of the in-process pipeline
with the same pruned backbone; the backbone model serves the pruned features; `dart`'s
config names the backbone. The torch backend's rebuilt modules agree too.
"""

from __future__ import annotations

import pytest

from dart_triton.contract import specs
from tests.parity import EVERY_QUERY, NAMES, assert_served_same
from tests.server.backbone_serving import (  # the served check is collected here too
    build,
    check_served_features,
    dart_backbone_parameter,
    test_served_equals_in_process,  # noqa: F401
    torch_backend_detections,
)

K = 4


@pytest.fixture(scope="module")
def plan(tiny_checkpoint_d, photo_dir, tmp_path_factory):
    from dart_triton.cli import main as cli

    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert cli(["prune", "--checkpoint", str(tiny_checkpoint_d), "--images", str(photo_dir),
                "--remove", str(K), "--calibration", "2", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def spec(plan) -> str:
    return f"pruned:{plan}:{K}"


@pytest.mark.server
def test_backbone_serves_the_pruned_features(backbone_server, backbone_reference, plan):
    check_served_features(backbone_server, backbone_reference[1])
    assert dart_backbone_parameter(backbone_server) == f"pruned:{plan.resolve()}:{K} (sub-block)"


def test_torch_backend_serves_the_pruned_backbone(tiny_checkpoint_d, spec, backbone_reference,
                                                  photo, tmp_path):
    from dart_triton.backbones.pruned import removed_parts
    from dart_triton.graphs.torch_graphs import load_graph_module, weights_dir

    pipeline, parts = backbone_reference
    build(tiny_checkpoint_d, tmp_path, spec, backend="torch")
    module, _ = load_graph_module(weights_dir(tmp_path, specs.BACKBONE), specs.BACKBONE)
    assert removed_parts(module) == removed_parts(parts.backbone) and len(
        removed_parts(module)) == K
    got = torch_backend_detections(tmp_path, parts, photo, 3)
    assert_served_same(got, pipeline.detect(photo, NAMES[:3], **EVERY_QUERY))


@pytest.mark.parametrize("backbone, message", [
    ("resnet", "--backbone must be vit, pruned:PLAN.json:K or student:DIR"),
    ("pruned:plan.json", "--backbone pruned:PLAN.json:K takes a plan file and a count"),
    ("pruned:/nonexistent/plan.json:3", "pruning plan not found"),
    ("student:/nonexistent", "is not a student directory"),
])
def test_build_refuses_a_bad_backbone_in_one_line(tiny_checkpoint_d, tmp_path, capsys,
                                                  backbone, message):
    from dart_triton.cli import main as cli

    assert cli(["build", "--checkpoint", str(tiny_checkpoint_d), "--output",
                str(tmp_path / "repo"), "--backbone", backbone]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_build_refuses_k_beyond_the_plan(tiny_checkpoint_d, plan, tmp_path, capsys):
    from dart_triton.cli import main as cli

    assert cli(["build", "--checkpoint", str(tiny_checkpoint_d), "--output",
                str(tmp_path / "repo"), "--backbone", f"pruned:{plan}:{K + 1}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"at most {K} sub-blocks" in err[0], err
