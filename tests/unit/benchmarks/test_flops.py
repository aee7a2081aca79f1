"""benchmarks/flops.py: FLOPs counted on the meta device (no weights)."""

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
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"backbone at {size} px: {small / 1e9:.0f} GFLOP per frame"
    _, with_masks = flops.backbone_flops(config, masks=True)
    assert with_masks > small  # the finer FPN levels cost something
    assert lines[1].startswith("backbone with the mask levels (build --masks): ")
    assert lines[2].startswith(f"enc_dec at {size} px: ")


def test_enc_dec_shares_its_prompt_independent_work(tiny_checkpoint):
    """A pass of N prompts costs less than N passes of one: the first encoder layer's
    self-attention (and the first decoder layer's) run once per pass."""
    config = Sam3Config.from_pretrained(tiny_checkpoint)
    _, one, eight = flops.enc_dec_flops(config, prompts=8)
    per_prompt = (eight - one) / 7
    assert 0 < per_prompt < one
    shared = one - per_prompt
    # The encoder self-attention over h*w image tokens is the bulk of what is shared.
    assert shared > 0.05 * one and eight < 8 * one
