"""Sub-block pruning (SBP, DART §3.6) and whole-block pruning of the ViT backbone.

Each ViT block is ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``: two residual
branches, each removable on its own (a removed branch leaves ``x`` as it is). The search
is greedy, as in BlockPruner and the paper's Algorithm 1: at every step it removes the
candidate whose removal, on top of the ones already removed, gives the lowest MSE
between the pruned and the unpruned trunk output on calibration images. Global-attention
blocks (the config's ``global_attn_indexes``) are never candidates: they carry the only
information flow between windows.

Where the loss is measured: the trunk output, i.e. after the last block. The authors
measure after the last global-attention block; in SAM3 that is the last block (31 of
32), so the two coincide. Measured earlier, every block after it would cost nothing to
remove and would go first.

Cost: a candidate in block b changes nothing before b, so the search keeps the
activations entering every block (for the removals made so far) and runs only blocks
b..L-1 per candidate; after a removal in block b, only the cache from b on is refreshed.
With L blocks that is about half of the K x 2L x L block evaluations of a plain search.
The cache holds N x L activations (N calibration images; at 1008 px, 26.5 MB each for
ViT-H in FP32).

`dart-triton prune --checkpoint DIR --images DIR --remove K --output PLAN.json` writes
the removal order; any k <= K is read from it (`pruned:PLAN.json:k` for `build` and
`distill`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dart_triton.backbones.pruned import (
    PARTS,
    PlanError,
    PruningPlan,
    Removal,
    vit_weights,
    weights_fingerprint,
)

UNITS = ("sub-block", "block")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


# Calibration images -----------------------------------------------------------------------


def image_files(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files


def spread(files: Sequence[Path], count: int | None) -> list[Path]:
    """`count` files evenly spaced over the sorted list (all of them for None)."""
    if count is None or count >= len(files):
        return list(files)
    if count < 1:
        raise ValueError(f"--calibration must be at least 1, got {count}")
    picks = np.linspace(0, len(files) - 1, count).round().astype(int)
    return [files[i] for i in picks]


def load_pixels(files: Sequence[Path], imgsz: int) -> torch.Tensor:
    """[N, 3, S, S] pixel values, preprocessed exactly as served (`model.preprocess`)."""
    from PIL import Image

    from dart_triton.model.preprocess import preprocess

    out = []
    for path in files:
        with Image.open(path) as img:
            out.append(torch.from_numpy(preprocess(np.asarray(img.convert("RGB")), imgsz)[0]))
    return torch.cat(out)


# The search -----------------------------------------------------------------------------


def candidates(num_blocks: int, protected: Iterable[int],
               unit: str) -> list[tuple[tuple[int, str], ...]]:
    """Every removable unit: one (block, part) for sub-blocks, both parts for blocks."""
    if unit not in UNITS:
        raise ValueError(f"--unit must be one of {', '.join(UNITS)}, got {unit!r}")
    keep = set(protected)
    blocks = [b for b in range(num_blocks) if b not in keep]
    if unit == "block":
        return [tuple((b, p) for p in PARTS) for b in blocks]
    return [((b, p),) for b in blocks for p in PARTS]


def _block(block: nn.Module, x: torch.Tensor, skip: set[str]) -> torch.Tensor:
    """One ViT block with some of its branches skipped (without changing the module)."""
    if "attention" not in skip and block.attn is not None:
        x = x + block.attention_branch(x)
    if "mlp" not in skip and block.mlp is not None:
        x = x + block.mlp(block.norm2(x))
    return x


@dataclass
class Trunk:
    """The backbone's ViT trunk on a calibration set, in chunks, counting block runs."""

    backbone: nn.Module
    batch_size: int = 4
    evaluations: int = 0  # blocks run over the whole calibration set (the cost unit)
    on_block: Callable[[], None] | None = field(default=None, repr=False)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        out = []
        for chunk in pixels.split(self.batch_size):
            x = bb.patch_embed(chunk).permute(0, 2, 3, 1) + bb.pos_embed
            out.append(bb.pre_norm(x))
        return torch.cat(out)

    def run(self, index: int, x: torch.Tensor, skip: set[str] = frozenset()) -> torch.Tensor:
        self.evaluations += 1
        block = self.backbone.blocks[index]
        out = torch.cat([_block(block, chunk, skip) for chunk in x.split(self.batch_size)])
        if self.on_block is not None:
            self.on_block()
        return out


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


@torch.no_grad()
def greedy_search(backbone: nn.Module, pixels: torch.Tensor, remove: int,
                  protected: Iterable[int], unit: str = "sub-block", batch_size: int = 4,
                  progress: bool = False) -> tuple[list[Removal], int]:
    """Greedy removal order -> ([Removal, ...] in order, block evaluations it took).

    With ``unit="block"`` each step removes a whole block: two entries, same loss."""
    from tqdm.auto import tqdm

    cands = candidates(len(backbone.blocks), protected, unit)
    if remove > len(cands):
        raise ValueError(f"--remove {remove} is more than the {len(cands)} {unit}s that "
                         "can be removed (global-attention and --protect blocks stay)")
    num = len(backbone.blocks)
    removed: dict[int, set[str]] = {}
    # The bar counts block runs; each step's total is known when the step starts.
    bar = tqdm(total=0, disable=not progress, unit="block", desc="prune")
    trunk = Trunk(backbone, batch_size, on_block=lambda: bar.update(1))

    # cache[i]: activations entering block i with the removals so far; cache[num]: output
    cache = [trunk.embed(pixels)]
    bar.total += num
    for i in range(num):
        cache.append(trunk.run(i, cache[i]))
    reference = cache[num]
    order: list[Removal] = []
    remaining = list(cands)
    for step in range(remove):
        bar.total += sum(num - c[0][0] for c in remaining)
        bar.set_postfix(step=f"{step + 1}/{remove}")
        best: tuple[float, tuple] | None = None
        for cand in remaining:
            start = cand[0][0]
            x = cache[start]
            for i in range(start, num):
                skip = removed.get(i, set()) | {p for b, p in cand if b == i}
                x = trunk.run(i, x, skip)
            loss = _mse(x, reference)
            if best is None or loss < best[0]:
                best = (loss, cand)
        loss, chosen = best
        remaining.remove(chosen)
        for block, part in chosen:
            removed.setdefault(block, set()).add(part)
            order.append(Removal(block, part, loss))
        start = chosen[0][0]
        bar.total += num - start
        for i in range(start, num):
            cache[i + 1] = trunk.run(i, cache[i], removed.get(i, set()))
        bar.set_postfix(step=f"{step + 1}/{remove}", loss=f"{loss:.4g}")
    bar.close()
    return order, trunk.evaluations


# Command line ---------------------------------------------------------------------------


def _protect(text: str | None, num_blocks: int) -> list[int]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not all(t.isdigit() for t in items):
        raise ValueError(f"--protect takes block indices like 3,4, got {text!r}")
    out = sorted({int(t) for t in items})
    bad = [b for b in out if b >= num_blocks]
    if bad:
        raise ValueError(f"--protect {bad[0]}: the backbone has blocks 0 to {num_blocks - 1}")
    return out


def run_prune(args: argparse.Namespace, log=print) -> PruningPlan:
    from dart_triton.model.backbone import RestructuredBackbone
    from dart_triton.model.checkpoint import load_sam3
    from dart_triton.model.parts import image_size_of

    if args.remove < 0:
        raise ValueError(f"--remove must be at least 0, got {args.remove}")
    device = torch.device(args.device)
    files = spread(image_files(args.images), args.calibration)
    model = load_sam3(args.checkpoint, imgsz=args.imgsz)
    imgsz = image_size_of(model)
    backbone = RestructuredBackbone(model.vision_encoder, imgsz).eval().to(device)
    vit_cfg = model.vision_encoder.backbone.config
    num = len(backbone.blocks)
    protected = sorted(set(vit_cfg.global_attn_indexes) | set(_protect(args.protect, num)))
    pixels = load_pixels(files, imgsz).to(device)
    log(f"prune: {num} blocks, protected {protected}, {len(files)} calibration images at "
        f"{imgsz}px, removing {args.remove} {args.unit}s on {device}")
    order, evaluations = greedy_search(backbone, pixels, args.remove, protected, args.unit,
                                       args.batch_size, progress=True)
    plan = PruningPlan(order, args.unit, protected, num,
                       {"path": str(Path(args.checkpoint).resolve()),
                        "weights_sha256": weights_fingerprint(vit_weights(backbone))},
                       {"images": str(Path(args.images).resolve()), "count": len(files),
                        "resolution": imgsz, "files": [p.name for p in files]})
    plan.save(args.output)
    for i, r in enumerate(order):
        log(f"  {i + 1:>3}. block {r.block:>2} {r.part:<9} loss {r.loss:.6g}")
    log(f"{len(order)} removals in {evaluations} block evaluations -> {args.output}")
    return plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dart-triton prune",
        description="Greedy sub-block (or block) pruning search of the ViT backbone: writes "
                    "the removal order; any k <= K is then `--backbone pruned:PLAN.json:k`.")
    p.add_argument("--checkpoint", required=True, help="local facebook/sam3-layout directory")
    p.add_argument("--images", required=True, help="directory of calibration images")
    p.add_argument("--remove", type=int, required=True, metavar="K",
                   help="how many sub-blocks (or blocks, with --unit block) to remove")
    p.add_argument("--calibration", type=int, default=32, metavar="N",
                   help="calibration images, evenly spaced over the sorted directory "
                        "(default: %(default)s)")
    p.add_argument("--unit", choices=UNITS, default="sub-block",
                   help="remove attention/MLP sub-blocks, or whole blocks (default: %(default)s)")
    p.add_argument("--protect", default=None, metavar="I,J",
                   help="blocks never removed, besides the global-attention ones (always kept)")
    p.add_argument("--imgsz", type=int, default=None,
                   help="calibration resolution, a multiple of 14 (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="calibration images per forward chunk (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--output", required=True, metavar="PLAN.json", help="plan file to write")
    return p


def main(argv: list[str] | None = None) -> int:
    from dart_triton.model.checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    try:
        run_prune(args)
    except (CheckpointError, PlanError, ValueError, FileNotFoundError) as exc:
        print(f"dart-triton prune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dart-triton prune: interrupted (no plan written)", file=sys.stderr)
        return 130
    return 0
