"""FLOPs of the restructured backbone (one frame) and of the batched encoder-decoder (per
prompt), counted on the meta device.

No weights and no compute: the modules are built with their parameters on the meta device
and `torch.utils.flop_counter` counts the matrix products of one forward pass. With a
measured time they give the achieved rate (RESULTS.md, the H200 goals). The encoder-
decoder shares its prompt-independent work across a pass (`model.detection_head`), so
its cost is `shared + N x per_prompt`; both are reported, from passes of 1 and N prompts.

    python -m dart_triton.benchmarks.flops [--checkpoint DIR] [--imgsz 1008] [--prompts 16]

Also the backbone of a `build --masks` repository, which returns the finer FPN levels too.
"""

from __future__ import annotations

import argparse


def backbone_flops(sam3_config, imgsz: int | None = None,
                   masks: bool = False) -> tuple[int, int]:
    """(image size, FLOPs of one backbone forward at batch 1); `masks`: with the finer FPN
    levels a `build --masks` backbone also returns."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Sam3Model

    from dart_triton.model.backbone import RestructuredBackbone
    from dart_triton.model.checkpoint import set_image_size
    from dart_triton.model.parts import graph_dims

    if imgsz is not None:
        set_image_size(sam3_config, imgsz)
    with torch.device("meta"):
        sam3 = Sam3Model(sam3_config)
        dims = graph_dims(sam3, masks=masks)
        backbone = RestructuredBackbone(sam3.vision_encoder, dims.imgsz,
                                        list(dims.backbone_levels))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(torch.empty(1, 3, dims.imgsz, dims.imgsz, device="meta"))
    return dims.imgsz, counter.get_total_flops()


def enc_dec_flops(sam3_config, imgsz: int | None = None,
                  prompts: int = 16) -> tuple[int, int, int]:
    """(image size, FLOPs of one pass of 1 prompt, FLOPs of one pass of `prompts`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Sam3Model

    from dart_triton.model.checkpoint import set_image_size
    from dart_triton.model.detection_head import BatchedDetectionHead
    from dart_triton.model.parts import graph_dims

    if imgsz is not None:
        set_image_size(sam3_config, imgsz)
    with torch.device("meta"):
        sam3 = Sam3Model(sam3_config)
        dims = graph_dims(sam3)
        head = BatchedDetectionHead(sam3, dims, "sdpa").to_empty(device="meta")
    counts = []
    for n in (1, prompts):
        feats = torch.empty(1, dims.fpn_dim, dims.feat_hw, dims.feat_hw, device="meta")
        text = torch.empty(n, dims.text_len, dims.text_dim, device="meta")
        mask = torch.ones(n, dims.text_len, dtype=torch.int64, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            head(feats, text, mask)
        counts.append(counter.get_total_flops())
    return dims.imgsz, counts[0], counts[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dart_triton.benchmarks.flops",
                                description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None,
                   help="a SAM3 checkpoint directory (its config.json; default: Sam3Config())")
    p.add_argument("--imgsz", type=int, default=None, help="image size (default: the config's)")
    p.add_argument("--prompts", type=int, default=16,
                   help="prompts in the pass the per-prompt cost is read from (default: 16)")
    args = p.parse_args(argv)
    if args.prompts < 2:
        p.error("--prompts must be at least 2 (the per-prompt cost is a difference)")
    from transformers import Sam3Config

    config = Sam3Config.from_pretrained(args.checkpoint) if args.checkpoint else Sam3Config()
    size, flops = backbone_flops(config, args.imgsz)
    print(f"backbone at {size} px: {flops / 1e9:.0f} GFLOP per frame")
    _, with_masks = backbone_flops(config, args.imgsz, masks=True)
    print(f"backbone with the mask levels (build --masks): {with_masks / 1e9:.0f} GFLOP per "
          f"frame (+{(with_masks - flops) / 1e9:.0f}, +{100 * (with_masks / flops - 1):.1f}%)")
    size, one, many = enc_dec_flops(config, args.imgsz, args.prompts)
    per_prompt = (many - one) / (args.prompts - 1)
    print(f"enc_dec at {size} px: {per_prompt / 1e9:.1f} GFLOP per prompt + "
          f"{(one - per_prompt) / 1e9:.1f} GFLOP per pass shared by its prompts "
          f"({one / 1e9:.1f} for a pass of 1 prompt, {many / args.prompts / 1e9:.1f} per "
          f"prompt in a pass of {args.prompts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
