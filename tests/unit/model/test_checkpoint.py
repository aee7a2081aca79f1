import json

import pytest
import torch

from dart_triton.cli import main as cli
from dart_triton.model.checkpoint import (
    CheckpointError,
    load_sam3,
    load_tokenizer,
    validate_checkpoint_dir,
    write_tiny_checkpoint,
)


def test_tokenizer_is_real_clip_bpe(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    ids = tok("person", padding="max_length", max_length=32)["input_ids"]
    assert ids[:3] == [49406, 2533, 49407] and len(ids) == 32


def test_same_seed_same_weights(tmp_path, tiny_checkpoint):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0, variant="a")
    a, b = load_sam3(tiny_checkpoint).state_dict(), load_sam3(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_sam3(write_tiny_checkpoint(tmp_path / "other", seed=5)).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_cli_writes_checkpoint(tmp_path):
    assert cli(["tiny-checkpoint", str(tmp_path / "ck"), "--seed", "3", "--variant", "b"]) == 0
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "sam3"


def test_cli_variant_c_detects_off_stride_14(tmp_path):
    """Variant c keeps Sam3Model's other valid FPN scales, and the parts follow them."""
    from dart_triton.model.parts import load_parts

    assert cli(["tiny-checkpoint", str(tmp_path / "ck"), "--variant", "c"]) == 0
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["vision_config"]["scale_factors"] == [4.0, 2.0, 1.0]
    dims = load_parts(tmp_path / "ck").dims
    assert (dims.imgsz, dims.detection_level, dims.detection_stride, dims.feat_hw) == (
        126, 1, 7.0, 18)


@pytest.mark.parametrize("break_it, message", [
    (lambda d: None, "checkpoint directory not found"),
    (lambda d: d.mkdir(), "config.json is missing"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "bert"}')), "not SAM3"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "not valid JSON"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "sam3"}')),
     "has no weights"),
])
def test_bad_directories_get_one_clear_error(tmp_path, break_it, message):
    d = tmp_path / "ck"
    break_it(d)
    with pytest.raises(CheckpointError, match=message) as err:
        validate_checkpoint_dir(d)
    assert "\n" not in str(err.value)


def test_missing_tokenizer(tmp_path, tiny_checkpoint):
    d = tmp_path / "ck"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        (d / name).write_bytes((tiny_checkpoint / name).read_bytes())
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_sam3(d)
