"""benchmarks/flops.py: the backbone's FLOPs counted on the meta device (no weights)."""

from __future__ import annotations

from transformers import Sam3Config

from dart_triton.benchmarks import flops


def test_backbone_flops_grow_with_the_image(tiny_checkpoint, capsys):
    config = Sam3Config.from_pretrained(tiny_checkpoint)
    size, small = flops.backbone_flops(config)
    _, large = flops.backbone_flops(config, 2 * size)
    assert small > 0
    assert large >= 4 * small  # 4x the tokens; global attention grows faster still
    assert flops.main(["--checkpoint", str(tiny_checkpoint)]) == 0
    assert capsys.readouterr().out == f"backbone at {size} px: {small / 1e9:.0f} GFLOP per frame\n"
