"""Student backbones (issue 11): timm trunk + FPN adapter, pruned-and-distilled ViTs.

Tiny teacher: variant d (84 px; FPN levels 24, 12, 6). timm students are created with
random weights (pretrained=False / `--pretrained none`) at that size; real photographs
from scikit-image are the training images.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import conv_gelu_pairs, read_csv

if not os.environ.get("CI"):  # CI installs timm (scripts/setup.sh): there it must run
    pytest.importorskip("timm", reason="timm students need timm + torchvision")

# Smallest timm trunk with three feature stages (0.27M parameters): fast on 2 cores.
SMALL = "mobilenetv3_small_050"
# A trunk with Conv -> GELU pairs (RepViT's conv MLPs), for the TensorRT workaround.
WITH_GELU = "repvit_m0_9"
EPOCHS = 6
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def parts_d(tiny_checkpoint_d):
    from dart_triton.model.parts import load_parts

    return load_parts(tiny_checkpoint_d, max_classes=4)


def teacher_sizes(dims) -> list[int]:
    from dart_triton.backbones.students import teacher_levels

    return [dims.level_hw(dims.scale_factors[lv]) for lv in teacher_levels(dims)]


def test_adapter_student_matches_the_teacher_levels(parts_d):
    from dart_triton.backbones.students import TimmStudent

    d = parts_d.dims
    student = TimmStudent(SMALL, d, pretrained="none").eval()
    x = torch.randn(1, 3, d.imgsz, d.imgsz)
    with torch.no_grad():
        every = student.features(x, student.train_levels)
        served = student(x)
        teacher = parts_d.backbone(x)
    assert [t.shape[-1] for t in every] == teacher_sizes(d) == [24, 12, 6]
    assert all(t.shape[1] == d.fpn_dim for t in every)
    # served: the detection level only, the same tensor the coarsest adapter gives
    assert len(served) == 1 and served[0].shape == teacher[0].shape
    assert torch.equal(served[0], every[-1])
    # only the adapter trains
    assert {id(p) for p in student.trainable()} == {
        id(p) for p in student.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in student.trunk.parameters())


def test_student_renormalises_sam3_pixels_for_the_trunk(parts_d):
    """Served pixels are (p - 0.5) / 0.5; the trunk must see (p - mean) / std."""
    from dart_triton.backbones.students import TimmStudent

    student = TimmStudent(SMALL, parts_d.dims, pretrained="none")
    p = torch.rand(1, 3, 8, 8)
    mean = torch.tensor(student.trunk.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(student.trunk.pretrained_cfg["std"]).view(1, 3, 1, 1)
    got = ((p - 0.5) / 0.5) * student.in_scale + student.in_shift
    assert torch.allclose(got, (p - mean) / std, atol=1e-6)


def test_pretrained_weights_from_a_local_file(parts_d, tmp_path):
    import timm
    from safetensors.torch import save_file

    from dart_triton.backbones.students import StudentError, TimmStudent

    full = timm.create_model(SMALL, pretrained=False)
    file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(file))
    student = TimmStudent(SMALL, parts_d.dims, pretrained=str(file))
    saved = full.state_dict()
    trunk = student.trunk.state_dict()
    # features_only renames stages.N -> stages_N
    matched = {k: v for k, v in trunk.items() if k.replace("stages_", "stages.", 1) in saved}
    assert len(matched) == len(trunk)
    assert all(torch.equal(v, saved[k.replace("stages_", "stages.", 1)])
               for k, v in matched.items())
    with pytest.raises(StudentError, match="not found"):
        TimmStudent(SMALL, parts_d.dims, pretrained=str(tmp_path / "missing.safetensors"))


def test_student_onnx_has_no_conv_gelu_pair_and_matches_pytorch(parts_d, tmp_path):
    """TensorRT 10 cannot build FP16 Conv+GELU: an Identity separates them; ONNX Runtime
    still computes what PyTorch does."""
    from dart_triton.backbones.choice import with_backbone
    from dart_triton.backbones.students import TimmStudent, save_student
    from dart_triton.export.conv_gelu import separate_conv_gelu
    from dart_triton.export.onnx_export import MIN_COSINE, cosine, export_backbone
    from dart_triton.graphs.runtime import OrtGraph

    student = TimmStudent(WITH_GELU, parts_d.dims, pretrained="none").eval()
    save_student(tmp_path / "student", student,
                 {"kind": "timm", "timm": WITH_GELU, "out_indices": [0, 1, 2],
                  "dims": {"imgsz": 84, "fpn_dim": 16, "scale_factors": [4, 2, 1, 0.5]},
                  "levels": [0, 1, 2]})
    parts = with_backbone(parts_d, f"student:{tmp_path / 'student'}")
    path = export_backbone(parts, tmp_path)
    before = conv_gelu_pairs(path)
    assert before > 0
    assert separate_conv_gelu(path) == before
    assert conv_gelu_pairs(path) == 0
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 84, 84)).astype(np.float32)
    with torch.no_grad():
        ref = parts.backbone(torch.from_numpy(x))[0].numpy()
    assert cosine(OrtGraph(path)(pixel_values=x)[0], ref) >= MIN_COSINE


def _distill(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dart_triton.cli", "distill", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def _epoch_means(log: Path) -> list[float]:
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    epochs: dict[int, list[float]] = {}
    for r in rows:
        epochs.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    return [float(np.mean(v)) for _, v in sorted(epochs.items())]


def _args(ckpt, photos, out, epochs, student=f"timm:{SMALL}"):
    return ["--teacher", str(ckpt), "--student", student, "--images", str(photos),
            "--epochs", str(epochs), "--output", str(out), "--batch-size", "2",
            "--lr", "0.3", "--seed", "7", "--pretrained", "none"]


@pytest.fixture(scope="module")
def distilled(tiny_checkpoint_d, photo_dir, tmp_path_factory):
    """An uninterrupted 6-epoch run (3 steps an epoch: 6 photographs, batch 2). The tiny
    teacher's random FPN features are ~200 in magnitude, hence the high learning rate."""
    out = tmp_path_factory.mktemp("student") / "run"
    proc = _distill(_args(tiny_checkpoint_d, photo_dir, out, EPOCHS))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def test_distillation_lowers_the_loss(distilled):
    means = _epoch_means(distilled / "log.csv")
    assert len(means) == EPOCHS
    assert means[-1] < 0.85 * means[0], means
    assert (distilled / "loss.png").stat().st_size > 0
    record = json.loads((distilled / "config.json").read_text())
    assert record["kind"] == "timm" and record["timm"] == SMALL
    assert record["level_weights"] == pytest.approx([0.15, 0.2, 0.65])
    assert record["training"]["epochs"] == EPOCHS
    # safetensors and JSON only: nothing to unpickle
    assert not [p for p in distilled.iterdir() if p.suffix in {".pt", ".pth", ".pkl", ".bin"}]


def test_interrupted_run_resumes_to_the_same_weights(distilled, tiny_checkpoint_d, photo_dir,
                                                     tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = _distill(_args(tiny_checkpoint_d, photo_dir, out, EPOCHS))
    deadline = time.monotonic() + 300
    log = out / "log.csv"
    # Ctrl-C in the middle of epoch 3 (after global step 7 of 18)
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().strip().splitlines()) - 1 >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err
    state = json.loads((out / "train_state.json").read_text())
    assert 7 <= state["global_step"] < 3 * EPOCHS

    again = _distill(_args(tiny_checkpoint_d, photo_dir, out, EPOCHS))  # without --resume
    _, err = again.communicate(timeout=300)
    assert again.returncode == 2 and "--resume" in err.strip().splitlines()[-1]

    resumed = _distill([*_args(tiny_checkpoint_d, photo_dir, out, EPOCHS), "--resume"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    want, got = load_file(str(distilled / "model.safetensors")), load_file(
        str(out / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == list(range(1, 3 * EPOCHS + 1))


def test_pruned_student_distils_its_remaining_blocks(tiny_checkpoint_d, photo_dir, parts_d,
                                                     tmp_path):
    from dart_triton.backbones.choice import served_backbone
    from dart_triton.backbones.pruned import removed_parts
    from dart_triton.cli import main as cli

    plan = tmp_path / "plan.json"
    assert cli(["prune", "--checkpoint", str(tiny_checkpoint_d), "--images", str(photo_dir),
                "--remove", "3", "--calibration", "2", "--output", str(plan)]) == 0
    out = tmp_path / "pruned"
    proc = _distill([*_args(tiny_checkpoint_d, photo_dir, out, 2, f"pruned:{plan}:3"),
                     "--lr", "1e-3"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    means = _epoch_means(out / "log.csv")
    assert means[-1] < means[0], means
    student = served_backbone(f"student:{out}", parts_d)
    training_free = served_backbone(f"pruned:{plan}:3", parts_d)
    assert removed_parts(student) == removed_parts(training_free) and len(
        removed_parts(student)) == 3
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        assert student(x)[0].shape == parts_d.backbone(x)[0].shape
        # the remaining blocks were trained: not the training-free pruned backbone
        assert not torch.equal(student(x)[0], training_free(x)[0])


def test_student_refuses_another_checkpoint(distilled, tmp_path):
    from dart_triton.backbones.choice import served_backbone
    from dart_triton.backbones.students import StudentError
    from dart_triton.model.checkpoint import write_tiny_checkpoint
    from dart_triton.model.parts import load_parts

    other_d = load_parts(write_tiny_checkpoint(tmp_path / "d", seed=5, variant="d"))
    with pytest.raises(StudentError, match="other weights"):
        served_backbone(f"student:{distilled}", other_d)
    variant_a = load_parts(write_tiny_checkpoint(tmp_path / "a", seed=0, variant="a"))
    with pytest.raises(StudentError, match="was distilled for"):
        served_backbone(f"student:{distilled}", variant_a)


@pytest.mark.parametrize("args, message", [
    (["--student", "resnet"], "--student must be timm:NAME or pruned:PLAN.json:K"),
    (["--student", "timm:no_such_model"], "cannot create timm model 'no_such_model'"),
    (["--epochs", "0"], "--epochs and --batch-size must be at least 1"),
    (["--resume"], "no run to resume"),
])
def test_distill_cli_errors_in_one_line(tiny_checkpoint_d, photo_dir, tmp_path, capsys, args,
                                        message):
    from dart_triton.cli import main as cli

    base = _args(tiny_checkpoint_d, photo_dir, tmp_path / "out", 1)
    for i in range(0, len(args), 2):  # override the defaults given in `args`
        if args[i] in base:
            j = base.index(args[i])
            base[j:j + 2] = args[i:i + 2]
        else:
            base += args[i:i + 2]
    assert cli(["distill", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_backbones_benchmark_smoke(tmp_path):
    """`benchmarks.backbones` end to end at the tiny size: every row timed, a section written."""
    from dart_triton.benchmarks import backbones

    results = tmp_path / "RESULTS.md"
    assert backbones.main(["--config", "tiny", "--iters", "1", "--warmup", "0", "--students",
                           SMALL, "--out", str(tmp_path), "--results", str(results)]) == 0
    rows = read_csv(tmp_path / "backbones.csv")
    labels = [r["backbone"] for r in rows]
    assert labels[:6] == ["ViT-H (vit)", "SBP-8", "SBP-16", "block-pruned-8",
                          "block-pruned-16", f"{SMALL} + adapter"]
    assert all(r["torch_ms"] > 0 for r in rows)
    assert all(r["ort_ms"] > 0 for r in rows[:6])
    # removals drop their weights (tiny d: SBP-8 and block-pruned-8 both empty its 4 windowed
    # blocks)
    assert rows[3]["params_m"] <= rows[1]["params_m"] < rows[0]["params_m"]
    assert "<!-- BEGIN backbones -->" in results.read_text()
    assert (tmp_path / "backbones.png").stat().st_size > 0
