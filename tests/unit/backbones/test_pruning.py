"""Sub-block / block pruning of the ViT backbone (issue 11) on tiny variant d.

Variant d: 6 blocks, global attention in blocks 2 and 5 (protected). Calibration images
are scikit-image's photographs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dart_triton.backbones.pruned import PlanError, PruningPlan, prune, removed_parts
from dart_triton.compression.pruning import candidates, greedy_search, image_files, load_pixels

GLOBAL = (2, 5)
NUM_BLOCKS = 6


@pytest.fixture(scope="module")
def parts_d(tiny_checkpoint_d):
    from dart_triton.model.parts import load_parts

    return load_parts(tiny_checkpoint_d, max_classes=4)


@pytest.fixture(scope="module")
def pixels(parts_d, photo_dir):
    return load_pixels(image_files(photo_dir)[:4], parts_d.dims.imgsz)


def trunk_output(backbone: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The trunk through each block's own forward (not the search's code path)."""
    with torch.no_grad():
        x = backbone.patch_embed(pixels).permute(0, 2, 3, 1) + backbone.pos_embed
        x = backbone.pre_norm(x)
        for block in backbone.blocks:
            x = block(x)
    return x


def mse(a, b) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


@pytest.fixture(scope="module")
def plan_file(tiny_checkpoint_d, photo_dir, tmp_path_factory):
    """A real `dart-triton prune` run: 5 sub-blocks, calibration on 4 photographs."""
    from dart_triton.cli import main as cli

    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert cli(["prune", "--checkpoint", str(tiny_checkpoint_d), "--images", str(photo_dir),
                "--remove", "5", "--calibration", "4", "--output", str(out)]) == 0
    return out


def test_variant_d_has_two_global_blocks(parts_d):
    cfg = parts_d.model.vision_encoder.backbone.config
    assert len(parts_d.backbone.blocks) == NUM_BLOCKS
    assert tuple(cfg.global_attn_indexes) == GLOBAL


def test_plan_file_records_order_checkpoint_and_calibration(plan_file, parts_d, photo_dir):
    raw = json.loads(plan_file.read_text())
    assert raw["unit"] == "sub-block" and len(raw["removed"]) == 5
    for entry in raw["removed"]:
        assert set(entry) == {"block", "part", "loss"}
        assert entry["part"] in ("attention", "mlp") and entry["block"] not in GLOBAL
    losses = [e["loss"] for e in raw["removed"]]
    assert all(x > 0 for x in losses)
    assert len({(e["block"], e["part"]) for e in raw["removed"]}) == 5  # no repeats
    assert len(raw["checkpoint"]["weights_sha256"]) == 64
    cal = raw["calibration"]
    assert cal["count"] == 4 and cal["resolution"] == parts_d.dims.imgsz
    assert all((photo_dir / f).is_file() for f in cal["files"])


def test_plan_losses_are_the_pruned_trunks_error(plan_file, parts_d, photo_dir):
    """Each entry's loss is the MSE of the trunk with it and all earlier removals applied,
    recomputed here through the pruned module's own forward."""
    plan = PruningPlan.load(plan_file)
    calib = load_pixels([photo_dir / f for f in plan.calibration["files"]], parts_d.dims.imgsz)
    ref = trunk_output(parts_d.backbone, calib)
    for k in range(1, plan.size + 1):
        got = mse(trunk_output(prune(parts_d.backbone, plan.first(k)), calib), ref)
        assert got == pytest.approx(plan.removed[k - 1].loss, rel=1e-6)


def test_k1_equals_brute_force(parts_d, pixels):
    bb = parts_d.backbone
    order, _ = greedy_search(bb, pixels, 1, GLOBAL)
    ref = trunk_output(bb, pixels)
    brute = {c[0]: mse(trunk_output(prune(bb, c), pixels), ref)
             for c in candidates(NUM_BLOCKS, GLOBAL, "sub-block")}
    best = min(brute, key=brute.get)
    assert (order[0].block, order[0].part) == best
    assert order[0].loss == pytest.approx(brute[best], rel=1e-6)


def test_protected_blocks_are_never_removed(parts_d, pixels):
    protected = (*GLOBAL, 0)
    every = len(candidates(NUM_BLOCKS, protected, "sub-block"))
    assert every == 2 * (NUM_BLOCKS - 3)
    order, _ = greedy_search(parts_d.backbone, pixels, every, protected)
    assert len(order) == every
    assert not {r.block for r in order} & set(protected)
    with pytest.raises(ValueError, match="more than the 6 sub-blocks"):
        greedy_search(parts_d.backbone, pixels, every + 1, protected)


def test_activation_cache_saves_block_evaluations(parts_d, pixels):
    """Count block runs: the search runs only blocks b..L-1 for a candidate in block b,
    from cached activations, far fewer than remove x candidates x L full passes."""
    k = 3
    order, evaluations = greedy_search(parts_d.backbone, pixels, k, GLOBAL)
    # what the cached search must cost: the initial pass, per step the suffix of every
    # remaining candidate, then the cache refresh from the removed block on
    cands = [c[0] for c in candidates(NUM_BLOCKS, GLOBAL, "sub-block")]
    expected = NUM_BLOCKS
    for r in order:
        expected += sum(NUM_BLOCKS - b for b, _ in cands) + (NUM_BLOCKS - r.block)
        cands.remove((r.block, r.part))
    assert evaluations == expected
    # a plain greedy search: every remaining candidate through all L blocks, per step
    plain = NUM_BLOCKS + sum((len(cands) + k - s) * NUM_BLOCKS for s in range(k))
    assert evaluations < plain
    # the yardstick, K x 2L full passes: the cache (and the protected blocks) halve it
    assert evaluations < 0.5 * k * 2 * NUM_BLOCKS * NUM_BLOCKS


def test_block_unit_removes_both_parts_together(parts_d, pixels):
    order, _ = greedy_search(parts_d.backbone, pixels, 2, GLOBAL, unit="block")
    assert len(order) == 4
    for first, second in (order[0:2], order[2:4]):
        assert first.block == second.block and {first.part, second.part} == {"attention", "mlp"}
        assert first.loss == second.loss
    # whole-block k = 1 equals the brute force over blocks
    ref = trunk_output(parts_d.backbone, pixels)
    brute = {b: mse(trunk_output(prune(parts_d.backbone, [(b, "attention"), (b, "mlp")]),
                                 pixels), ref)
             for b in range(NUM_BLOCKS) if b not in GLOBAL}
    assert order[0].block == min(brute, key=brute.get)


def test_k0_reproduces_the_unpruned_backbone(parts_d, plan_file):
    from dart_triton.backbones.choice import served_backbone

    x = torch.randn(1, 3, parts_d.dims.imgsz, parts_d.dims.imgsz)
    same = served_backbone(f"pruned:{plan_file}:0", parts_d)
    assert removed_parts(same) == []
    with torch.no_grad():
        assert torch.equal(same(x)[0], parts_d.backbone(x)[0])


class _Zero(nn.Module):
    """A removed residual branch in transformers' layer: adds nothing."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        zero = torch.zeros_like(hidden_states)
        return (zero, None) if self.returns_tuple else zero


def test_pruned_equals_transformers_with_the_same_branches_skipped(parts_d, plan_file,
                                                                   tiny_checkpoint_d):
    from dart_triton.backbones.choice import served_backbone
    from dart_triton.model.checkpoint import load_sam3

    k = 4
    plan = PruningPlan.load(plan_file)
    ours = served_backbone(f"pruned:{plan_file}:{k}", parts_d)
    assert sorted(removed_parts(ours)) == sorted(plan.first(k))
    reference = load_sam3(tiny_checkpoint_d).vision_encoder
    for block, part in plan.first(k):
        layer = reference.backbone.layers[block]
        if part == "attention":
            layer.attention = _Zero(returns_tuple=True)
        else:
            layer.mlp = _Zero(returns_tuple=False)
    x = torch.randn(1, 3, parts_d.dims.imgsz, parts_d.dims.imgsz,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference(x).fpn_hidden_states[parts_d.dims.detection_level]
        got = ours(x)[0]
        unpruned = parts_d.backbone(x)[0]
    assert (got - ref).abs().max().item() <= 1e-4
    assert (unpruned - ref).abs().max().item() > 1e-2  # the removals do change the output


def test_pruned_onnx_equals_pruned_pytorch(tiny_checkpoint_d, plan_file, tmp_path):
    import onnx

    from dart_triton.export.onnx_export import MIN_COSINE, export_graphs

    _, full = export_graphs(tiny_checkpoint_d, tmp_path / "full", max_classes=2,
                            log=lambda *_: None)
    meta, agreements = export_graphs(tiny_checkpoint_d, tmp_path / "pruned", max_classes=2,
                                     backbone=f"pruned:{plan_file}:4", log=lambda *_: None)
    assert meta["backbone"].startswith(f"pruned:{plan_file.resolve()}:4")
    bb = next(a for a in agreements if a.tensor == "fpn_features")
    assert bb.cosine >= MIN_COSINE
    assert all(a.ok for a in agreements)

    def matmuls(path) -> int:
        return sum(n.op_type == "MatMul" for n in onnx.load(str(path)).graph.node)

    # 4 removed branches: their weights and work are gone from the graph
    assert matmuls(tmp_path / "pruned" / "backbone.onnx") < matmuls(tmp_path / "full" /
                                                                     "backbone.onnx")


def test_plan_refuses_other_weights(plan_file, tiny_checkpoint_d, tmp_path):
    from dart_triton.backbones.choice import served_backbone
    from dart_triton.model.checkpoint import write_tiny_checkpoint
    from dart_triton.model.parts import load_parts

    other = load_parts(write_tiny_checkpoint(tmp_path / "other", seed=9, variant="d"))
    with pytest.raises(PlanError, match="other weights"):
        served_backbone(f"pruned:{plan_file}:2", other)
    with pytest.raises(PlanError, match="at most 5"):
        served_backbone(f"pruned:{plan_file}:6", load_parts(tiny_checkpoint_d))


@pytest.mark.parametrize("args, message", [
    (["--remove", "99"], "more than the 8 sub-blocks"),
    (["--remove", "1", "--protect", "7"], "--protect 7: the backbone has blocks 0 to 5"),
    (["--remove", "1", "--images", "/nonexistent"], "image directory not found"),
])
def test_prune_cli_errors_in_one_line(tiny_checkpoint_d, photo_dir, tmp_path, capsys, args,
                                      message):
    from dart_triton.cli import main as cli

    base = ["prune", "--checkpoint", str(tiny_checkpoint_d), "--images", str(photo_dir),
            "--calibration", "1", "--output", str(tmp_path / "p.json")]
    assert cli(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "p.json").exists()


def test_pixels_match_served_preprocessing(parts_d, photo_dir):
    from PIL import Image

    from dart_triton.model.preprocess import preprocess

    path = image_files(photo_dir)[0]
    want = preprocess(np.asarray(Image.open(path).convert("RGB")), parts_d.dims.imgsz)[0]
    assert np.array_equal(load_pixels([path], parts_d.dims.imgsz).numpy(), want)
