"""FLOPs of the restructured backbone for one frame, counted on the meta device.

No weights and no compute: the module is built with its parameters on the meta device and
`torch.utils.flop_counter` counts the matrix products of one forward pass. With a
measured time it gives the achieved rate (RESULTS.md, the H200 goals):

    python -m dart_triton.benchmarks.flops [--checkpoint DIR] [--imgsz 1008]
"""

from __future__ import annotations

import argparse


def backbone_flops(sam3_config, imgsz: int | None = None) -> tuple[int, int]:
    """(image size, FLOPs of one backbone forward at batch 1)."""
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
        dims = graph_dims(sam3)
        backbone = RestructuredBackbone(sam3.vision_encoder, dims.imgsz,
                                        list(dims.backbone_levels))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(torch.empty(1, 3, dims.imgsz, dims.imgsz, device="meta"))
    return dims.imgsz, counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dart_triton.benchmarks.flops",
                                description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None,
                   help="a SAM3 checkpoint directory (its config.json; default: Sam3Config())")
    p.add_argument("--imgsz", type=int, default=None, help="image size (default: the config's)")
    args = p.parse_args(argv)
    from transformers import Sam3Config

    config = Sam3Config.from_pretrained(args.checkpoint) if args.checkpoint else Sam3Config()
    size, flops = backbone_flops(config, args.imgsz)
    print(f"backbone at {size} px: {flops / 1e9:.0f} GFLOP per frame")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
