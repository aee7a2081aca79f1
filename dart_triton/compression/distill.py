"""`dart-triton distill`: train a student backbone against the teacher's FPN features.

    dart-triton distill --teacher DIR --student {timm:NAME|pruned:PLAN.json:K} --images DIR
                        --epochs E --output STUDENT_DIR [--batch-size B] [--lr LR]
                        [--resume] [--device D] [--amp]

* ``timm:NAME``: adapter distillation (DART §4.6). The timm trunk is frozen; only the FPN
  adapter trains (`dart_triton.backbones.students.TimmStudent`).
* ``pruned:PLAN.json:K``: the teacher's ViT without the first K units of a pruning plan;
  its remaining blocks train (self-distillation, as in the authors' pruned models).

Both minimise the per-level MSE to the teacher's FPN levels (fine -> coarse, weighted
0.15/0.2/0.65 with SAM3's scales), computed on the fly from the teacher (frozen), with
AdamW (weight decay 0.01) and a cosine schedule over all steps down to 1% of the rate.
The encoder-decoder is never touched. Images are augmented (random resized crop, flip,
brightness/contrast) and then preprocessed exactly as served.

Every random choice (image order, augmentation) is drawn from generators seeded by
(seed, epoch, image), never from global state, so a run that is interrupted and resumed
ends with the same weights as one that is not. The state (weights, optimizer, schedule,
position) is saved at the end of every epoch, and on Ctrl-C at the end of the current
step; ``--resume`` continues from it. No pickle anywhere: safetensors and JSON.

STUDENT_DIR then holds ``config.json`` + ``model.safetensors`` (the student, served
with ``build --backbone student:STUDENT_DIR``), ``train_state.{json,safetensors}``,
``log.csv`` (one row per step) and ``loss.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dart_triton.contract.specs import GraphDims

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
LOG_CSV = "log.csv"
LOSS_PLOT = "loss.png"
MIN_LR_RATIO = 0.01  # the cosine schedule ends at 1% of --lr


class Interrupted(Exception):
    """Ctrl-C arrived; the state was saved at the end of the step it interrupted."""


# Data ----------------------------------------------------------------------------------


def _seeded(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(tuple(keys)) & 0x7FFF_FFFF_FFFF)


def augment(image: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """Random resized crop (35-100% of the area, aspect 3:4 to 4:3), horizontal flip,
    brightness and contrast within +-20%: UINT8 HxWx3 in and out."""
    h, w = image.shape[:2]
    u = torch.rand(7, generator=gen).tolist()
    area = h * w * (0.35 + 0.65 * u[0])
    aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
    ch = max(8, min(h, round(math.sqrt(area / aspect))))
    cw = max(8, min(w, round(math.sqrt(area * aspect))))
    top, left = round((h - ch) * u[2]), round((w - cw) * u[3])
    out = image[top:top + ch, left:left + cw].astype(np.float32)
    if u[4] < 0.5:
        out = out[:, ::-1]
    brightness, contrast = 0.8 + 0.4 * u[5], 0.8 + 0.4 * u[6]
    mean = out.mean()
    out = (out - mean) * contrast + mean * brightness
    return np.clip(out.round(), 0, 255).astype(np.uint8)


class ImageSet:
    """The training images, decoded once; batches preprocessed as served."""

    def __init__(self, files: list[Path], imgsz: int, seed: int, augmented: bool = True):
        from PIL import Image

        self.files, self.imgsz, self.seed, self.augmented = files, imgsz, seed, augmented
        self.images = []
        for path in files:
            with Image.open(path) as img:
                self.images.append(np.asarray(img.convert("RGB")))

    def __len__(self) -> int:
        return len(self.images)

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(len(self), generator=_seeded(self.seed, epoch)).tolist()

    def batch(self, indices: list[int], epoch: int) -> torch.Tensor:
        from dart_triton.model.preprocess import preprocess

        out = []
        for i in indices:
            image = self.images[i]
            if self.augmented:
                image = augment(image, _seeded(self.seed, epoch, i, 1))
            out.append(torch.from_numpy(preprocess(image, self.imgsz)[0]))
        return torch.cat(out)


# Models --------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """What a run was started with; --resume refuses a different one."""

    teacher: str
    student: str
    images: list[str]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    imgsz: int
    augment: bool
    amp: bool
    pretrained: str


def level_outputs(student: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every teacher level the student is trained on, fine -> coarse."""
    from dart_triton.backbones.students import TimmStudent

    if isinstance(student, TimmStudent):
        return student.features(pixels, student.train_levels)
    return list(student(pixels))


def build_models(args: argparse.Namespace, log) -> tuple[nn.Module, nn.Module, dict, GraphDims]:
    """(teacher, student, the student's config record, dims) for the command line."""
    from dart_triton.backbones.pruned import load_plan, vit_weights, weights_fingerprint
    from dart_triton.backbones.students import (
        TimmStudent,
        dims_record,
        level_weights,
        pruned_student,
        teacher_levels,
    )
    from dart_triton.model.backbone import RestructuredBackbone
    from dart_triton.model.checkpoint import load_sam3
    from dart_triton.model.parts import graph_dims

    model = load_sam3(args.teacher, imgsz=args.imgsz)
    dims = graph_dims(model)
    levels = teacher_levels(dims)
    teacher = RestructuredBackbone(model.vision_encoder, dims.imgsz, levels).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    record = {"dims": dims_record(dims), "levels": levels,
              "level_weights": level_weights(len(levels)),
              "teacher": {"path": str(Path(args.teacher).resolve()),
                          "weights_sha256": weights_fingerprint(vit_weights(teacher))}}
    kind, _, rest = args.student.partition(":")
    torch.manual_seed(args.seed)  # the adapter's initial weights
    if kind == "timm" and rest:
        student = TimmStudent(rest, dims, pretrained=args.pretrained).eval()
        record.update(student.record())
    elif kind == "pruned" and rest:
        plan, k = load_plan(rest)
        plan.check_backbone(teacher)
        removed = plan.first(k)
        student = pruned_student(model.vision_encoder, dims, removed)
        for p in student.parameters():
            p.requires_grad_(False)
        for p in student.blocks.parameters():  # the remaining blocks train
            p.requires_grad_(True)
        record.update({"kind": "pruned", "removed": [list(r) for r in removed],
                       "sam3_config": json.loads(model.config.to_json_string()),
                       "plan": {"path": str(Path(plan_path(rest)).resolve()), "k": k,
                                "unit": plan.unit}})
    else:
        raise ValueError(f"--student must be timm:NAME or pruned:PLAN.json:K, "
                         f"got {args.student!r}")
    log(f"distill: teacher {args.teacher} ({dims.imgsz}px, levels {levels}), student "
        f"{args.student}: {sum(p.numel() for p in trainable(student)):,} trainable parameters")
    return teacher, student, record, dims


def plan_path(spec: str) -> str:
    return spec.rpartition(":")[0]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                      weights: list[float]) -> tuple[torch.Tensor, list[float]]:
    per_level = [nn.functional.mse_loss(s.float(), t) for s, t in zip(student, teacher,
                                                                       strict=True)]
    total = sum(w * loss for w, loss in zip(weights, per_level, strict=True))
    return total, [float(x.detach()) for x in per_level]


# State (no pickle) ---------------------------------------------------------------------


def save_state(out: Path, student: nn.Module, optimizer, scheduler, run: RunConfig,
               epoch: int, step: int, global_step: int) -> None:
    """Student weights, optimizer moments, schedule and position: written atomically
    (tensors first, then the JSON that points at them)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().clone()
               for k, v in student.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).contiguous().clone()
    tmp = out / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out / STATE_TENSORS)
    meta = {"run": asdict(run), "epoch": epoch, "step": step, "global_step": global_step,
            "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
    tmp = out / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / STATE_JSON)


def load_state(out: Path, student: nn.Module, optimizer, scheduler,
               run: RunConfig) -> tuple[int, int, int]:
    from safetensors.torch import load_file

    meta = json.loads((out / STATE_JSON).read_text())
    if meta["run"] != json.loads(json.dumps(asdict(run))):
        saved = meta["run"]
        diff = [k for k in saved if saved[k] != asdict(run).get(k)]
        raise ValueError(f"--resume: {out} holds a run with other settings ({', '.join(diff)} "
                         "differ)")
    tensors = load_file(str(out / STATE_TENSORS))
    student.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta["epoch"], meta["step"], meta["global_step"]


# Logging -------------------------------------------------------------------------------


def _log_rows(path: Path, upto: int) -> None:
    """Keep the rows of steps up to `upto` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if int(r[2]) <= upto]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(keep)


def plot_loss(log_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["global_step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    epochs: dict[int, list[float]] = {}
    for r in rows:
        epochs.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.8, alpha=0.6, label="step")
    per_epoch = [(max(int(r["global_step"]) for r in rows if int(r["epoch"]) == e), np.mean(v))
                 for e, v in sorted(epochs.items())]
    ax.plot(*zip(*per_epoch, strict=True), "o-", label="epoch mean")
    ax.set(xlabel="step", ylabel="weighted FPN MSE", yscale="log",
           title="distillation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def sigint_flag() -> Iterator[dict]:
    """The first Ctrl-C sets a flag (the loop saves and stops); a second one aborts."""
    flag = {"set": False}

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C is not ours to handle
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# The run -------------------------------------------------------------------------------


def run_distill(args: argparse.Namespace, log=print) -> Path:
    # Training needs autograd whatever the caller's grad mode (a benchmark or a server
    # thread may have turned it off).
    with torch.enable_grad():
        return _run_distill(args, log)


def _run_distill(args: argparse.Namespace, log=print) -> Path:
    from tqdm.auto import tqdm

    from dart_triton.backbones.students import save_student
    from dart_triton.compression.pruning import image_files, spread

    out = Path(args.output)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ValueError("--epochs and --batch-size must be at least 1, --lr positive")
    if (out / STATE_JSON).is_file() and not args.resume:
        raise ValueError(f"{out} already holds a run: add --resume to continue it, or "
                         "choose another --output")
    if args.resume and not (out / STATE_JSON).is_file():
        raise ValueError(f"--resume: no run to resume in {out}")
    files = spread(image_files(args.images), args.limit)
    device = torch.device(args.device)
    teacher, student, record, dims = build_models(args, log)
    teacher.to(device)
    student.to(device)
    run = RunConfig(str(Path(args.teacher).resolve()), args.student,
                    [str(p.resolve()) for p in files], args.epochs, args.batch_size, args.lr,
                    args.weight_decay, args.seed, dims.imgsz, not args.no_augment, args.amp,
                    str(args.pretrained))
    data = ImageSet(files, dims.imgsz, args.seed, augmented=not args.no_augment)
    per_epoch = math.ceil(len(data) / args.batch_size)
    total = per_epoch * args.epochs
    optimizer = torch.optim.AdamW(trainable(student), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: MIN_LR_RATIO + (
        1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    out.mkdir(parents=True, exist_ok=True)
    epoch = step = global_step = 0
    if args.resume:
        epoch, step, global_step = load_state(out, student, optimizer, scheduler, run)
        log(f"distill: resuming at epoch {epoch + 1}, step {step + 1} of {per_epoch}")
    _log_rows(out / LOG_CSV, global_step)
    weights = record["level_weights"]
    header = ["epoch", "step", "global_step", "loss",
              *[f"level_{lv}" for lv in record["levels"]], "lr", "seconds"]
    new_log = not (out / LOG_CSV).is_file()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    bar = tqdm(total=total, initial=global_step, desc="distill", unit="step")
    last_loss = None  # of the latest step (None: none run since resuming at an epoch end)
    with sigint_flag() as interrupted, open(out / LOG_CSV, "a", newline="") as log_file:
        writer = csv.writer(log_file)
        if new_log:
            writer.writerow(header)
        while epoch < args.epochs:
            order = data.order(epoch)
            while step < per_epoch:
                started = time.perf_counter()
                batch = order[step * args.batch_size:(step + 1) * args.batch_size]
                pixels = data.batch(batch, epoch).to(device)
                with torch.no_grad():
                    target = list(teacher(pixels))
                with autocast:
                    predicted = level_outputs(student, pixels)
                loss, per_level = distillation_loss(predicted, target, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last_loss = float(loss.detach())
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                global_step += 1
                writer.writerow([epoch, step, global_step, f"{last_loss:.8g}",
                                 *(f"{x:.8g}" for x in per_level), f"{lr:.6g}",
                                 f"{time.perf_counter() - started:.3f}"])
                log_file.flush()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{last_loss:.4g}")
                if interrupted["set"]:
                    save_state(out, student, optimizer, scheduler, run, epoch, step,
                               global_step)
                    bar.close()
                    raise Interrupted(f"interrupted at epoch {epoch + 1}, step {step}: state "
                                      f"saved in {out}; continue with --resume")
            epoch, step = epoch + 1, 0
            save_state(out, student, optimizer, scheduler, run, epoch, step, global_step)
            record["training"] = {"epochs": epoch, "steps": global_step, "images": len(data),
                                  "batch_size": args.batch_size, "lr": args.lr,
                                  "seed": args.seed, "last_loss": last_loss}
            save_student(out, student.cpu(), record)
            student.to(device)
            log_file.flush()
            plot_loss(out / LOG_CSV, out / LOSS_PLOT)
    bar.close()
    if not (out / "model.safetensors").is_file():  # resumed a finished run
        raise ValueError(f"--resume: the run in {out} has no student saved")
    log(f"distill: {args.epochs} epochs done -> {out} (serve it with "
        f"--backbone student:{out})")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dart-triton distill",
                                description="Distil a student backbone from the teacher's "
                                            "FPN features (the encoder-decoder stays frozen).")
    p.add_argument("--teacher", required=True, help="SAM3 checkpoint directory (the teacher)")
    p.add_argument("--student", required=True, metavar="{timm:NAME|pruned:PLAN.json:K}",
                   help="a timm model with an FPN adapter (e.g. timm:repvit_m2_3), or the "
                        "teacher without the first K units of a pruning plan")
    p.add_argument("--images", required=True, help="directory of training images (unlabeled)")
    p.add_argument("--epochs", type=int, required=True, help="passes over the images")
    p.add_argument("--output", required=True, metavar="STUDENT_DIR",
                   help="directory for the student, its training state, log and plot")
    p.add_argument("--batch-size", type=int, default=1, help="images per step (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay (default 0.01)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --output (after Ctrl-C or a crash)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--amp", action="store_true", help="student forward in bfloat16 autocast")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the image order, augmentation and adapter init (default 0)")
    p.add_argument("--imgsz", type=int, default=None,
                   help="training resolution, a multiple of 14 (default: the teacher's)")
    p.add_argument("--pretrained", default="hub", metavar="{hub|none|FILE}",
                   help="timm trunk weights: from the Hugging Face cache/hub (default), none "
                        "(random), or a local file")
    p.add_argument("--limit", type=int, default=None,
                   help="use N images, evenly spaced over the sorted directory")
    p.add_argument("--no-augment", action="store_true",
                   help="train on the images as they are (resized only)")
    return p


def main(argv: list[str] | None = None) -> int:
    from dart_triton.model.checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    try:
        run_distill(args)
    except Interrupted as exc:
        print(f"dart-triton distill: {exc}", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"dart-triton distill: error: {exc}", file=sys.stderr)
        return 2
    return 0
