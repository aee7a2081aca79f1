"""Student backbones: a timm trunk with an FPN adapter, or a pruned ViT, saved as a directory.

Adapter distillation (DART §4.6): a timm model (``features_only``, three stages, frozen)
feeds one adapter level per teacher FPN level: a 1x1 conv to the FPN width, a bilinear
resize to the teacher level's size (288/144/72 at 1008 px with SAM3's scales), a 3x3 conv.
The student takes the served ``pixel_values`` (SAM3's normalisation, mean = std = 0.5)
and re-normalises them to the trunk's own (ImageNet) statistics inside the graph.

What the served student computes: the trunk through its last used stage and only the
adapter of the level detection reads (the coarsest), unless the mask levels are asked
for. With the trunk frozen, the finer adapter levels do not touch the coarsest level's
output at all: they are trained (the distillation loss weighs all three) but serving them
would only add work (at 1008 px the finest adapter's 3x3 conv alone is ~49 GFLOPs).

A student directory holds ``config.json`` (what the module is, what it was distilled
from, the graph dims it fits) and ``model.safetensors`` (every tensor; no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from dart_triton.contract.specs import GraphDims
from dart_triton.model.tensor_io import TensorsMismatch, assign_tensors, module_tensors, storable

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STUDENT_FORMAT = 1
# The paper's students (timm 1.0 names; all with `feature_info`).
PAPER_STUDENTS = ("repvit_m2_3", "tiny_vit_21m_224", "efficientvit_l1", "efficientvit_l2")
# Distillation loss weights of the three levels, fine -> coarse (the coarsest feeds
# detection).
LEVEL_WEIGHTS = (0.15, 0.2, 0.65)


class StudentError(ValueError):
    """A student directory or name that cannot be used."""


def teacher_levels(dims: GraphDims) -> list[int]:
    """Neck indices a student is distilled on, fine -> coarse: the detection level and the
    finer levels before it (at 1008 px with SAM3's scales: 288, 144, 72)."""
    return list(range(dims.detection_level + 1))


def level_weights(count: int) -> list[float]:
    """The paper's 0.15/0.2/0.65 for three levels; otherwise the coarsest levels' share of
    it, renormalised (two levels: 0.24/0.76)."""
    if count <= len(LEVEL_WEIGHTS):
        w = LEVEL_WEIGHTS[-count:]
    else:
        w = (LEVEL_WEIGHTS[0],) * (count - len(LEVEL_WEIGHTS)) + LEVEL_WEIGHTS
    total = sum(w)
    return [x / total for x in w]


def dims_record(dims: GraphDims) -> dict:
    return {"imgsz": dims.imgsz, "fpn_dim": dims.fpn_dim,
            "scale_factors": list(dims.scale_factors)}


# The adapter student --------------------------------------------------------------------


class AdapterLevel(nn.Module):
    """Trunk stage -> one teacher FPN level: 1x1 conv, bilinear resize, 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.refine = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        return self.refine(x)


def _pretrained_kwargs(pretrained: str | None) -> dict:
    """timm weights: none (random), 'hub' (the HF cache, or the network where allowed),
    or a local file."""
    if pretrained in (None, "", "none"):
        return {"pretrained": False}
    if pretrained == "hub":
        return {"pretrained": True}
    path = Path(pretrained)
    if not path.is_file():
        raise StudentError(f"pretrained weights file not found: {path}")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


class TimmStudent(nn.Module):
    """pixel_values -> the served FPN levels (detection first), like `RestructuredBackbone`."""

    def __init__(self, name: str, dims: GraphDims, out_indices: tuple[int, ...] | None = None,
                 pretrained: str | None = None):
        super().__init__()
        try:
            import timm
        except ImportError as exc:
            raise StudentError(f"timm students need timm and torchvision ({exc}): "
                               "pip install 'dart-triton[students]'") from None
        self.train_levels = teacher_levels(dims)
        count = len(self.train_levels)
        out_indices = tuple(out_indices or range(max(3, count))[-count:])
        if len(out_indices) != count:
            raise StudentError(f"{count} teacher levels need {count} trunk stages, got "
                               f"out_indices {list(out_indices)}")
        try:
            self.trunk = timm.create_model(name, features_only=True, out_indices=out_indices,
                                           **_pretrained_kwargs(pretrained))
        except (RuntimeError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StudentError(f"cannot create timm model {name!r}: {first}") from None
        self.name, self.out_indices = name, out_indices
        cfg = self.trunk.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        # SAM3 pixels are (p - 0.5) / 0.5; the trunk wants (p - mean) / std.
        self.register_buffer("in_scale", (0.5 / std).view(1, 3, 1, 1))
        self.register_buffer("in_shift", ((0.5 - mean) / std).view(1, 3, 1, 1))
        channels = self.trunk.feature_info.channels()
        self.adapters = nn.ModuleList(
            AdapterLevel(c, dims.fpn_dim, dims.level_hw(dims.scale_factors[level]))
            for c, level in zip(channels, self.train_levels, strict=True))
        self.levels = list(dims.backbone_levels)  # what forward returns (served)
        for p in self.trunk.parameters():
            p.requires_grad_(False)

    def features(self, pixel_values: torch.Tensor, levels: list[int]) -> list[torch.Tensor]:
        feats = self.trunk(pixel_values * self.in_scale + self.in_shift)
        return [self.adapters[level](feats[level]) for level in levels]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.features(pixel_values, self.levels))

    def trainable(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def record(self) -> dict:
        return {"kind": "timm", "timm": self.name, "out_indices": list(self.out_indices)}


# Pruned ViT students --------------------------------------------------------------------


def pruned_student(vision_model, dims: GraphDims, removed: list[tuple[int, str]]) -> nn.Module:
    """The teacher's restructured backbone with these branches removed, returning every
    teacher level (fine -> coarse) for distillation."""
    from dart_triton.backbones.pruned import prune
    from dart_triton.model.backbone import RestructuredBackbone

    full = RestructuredBackbone(vision_model, dims.imgsz, teacher_levels(dims))
    return prune(full, removed).eval()


def _pruned_skeleton(record: dict) -> nn.Module:
    """A pruned student's module with parameters on the meta device (filled from the file)."""
    from transformers import Sam3Config, Sam3Model

    from dart_triton.backbones.pruned import prune
    from dart_triton.model.backbone import RestructuredBackbone

    config = Sam3Config.from_dict(record["sam3_config"])
    with torch.device("meta"):
        sam3 = Sam3Model(config)
        module = RestructuredBackbone(sam3.vision_encoder, int(record["dims"]["imgsz"]),
                                      list(record["levels"]))
        return prune(module, [(int(b), p) for b, p in record["removed"]])


# Serving: which levels come out ---------------------------------------------------------


def select_levels(module: nn.Module, levels: list[int] | tuple[int, ...]) -> nn.Module:
    """Make `module` return these neck levels (detection first) and nothing else."""
    levels = list(levels)
    if isinstance(module, TimmStudent):
        missing = set(levels) - set(module.train_levels)
        if missing:
            raise StudentError(f"the student has no level {sorted(missing)[0]}")
        module.levels = levels
        return module
    have = dict(zip(module.levels, module.fpn, strict=True))
    if set(levels) - set(have):
        raise StudentError(f"the student has no FPN level {sorted(set(levels) - set(have))[0]}")
    module.levels = levels
    module.fpn = nn.ModuleList(have[level] for level in levels)
    return module


def served_record(module: nn.Module) -> dict | None:
    """How to rebuild a served backbone module (torch backend): None for SAM3's ViT as it
    is, the removed branches for a pruned ViT, the timm model for an adapter student."""
    from dart_triton.backbones.pruned import removed_parts

    if isinstance(module, TimmStudent):
        return module.record()
    removed = removed_parts(module)
    return {"kind": "pruned", "removed": [list(r) for r in removed]} if removed else None


def served_skeleton(record: dict, dims: GraphDims) -> nn.Module:
    """An adapter student returning `dims.backbone_levels` (tensors loaded afterwards)."""
    module = TimmStudent(record["timm"], dims, tuple(record["out_indices"]), pretrained="none")
    return select_levels(module, dims.backbone_levels)


# The directory --------------------------------------------------------------------------


def save_student(out_dir: str | Path, module: nn.Module, record: dict) -> Path:
    """config.json + model.safetensors (every parameter and buffer), written atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(storable(module_tensors(module)), str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    cfg_tmp = out / (CONFIG_FILE + ".tmp")
    cfg_tmp.write_text(json.dumps({"format": STUDENT_FORMAT, **record}, indent=2))
    cfg_tmp.replace(out / CONFIG_FILE)
    return out


def read_record(student_dir: str | Path) -> dict:
    root = Path(student_dir)
    try:
        record = json.loads((root / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise StudentError(f"{root} is not a student directory: {CONFIG_FILE} is missing") \
            from None
    except ValueError as exc:
        raise StudentError(f"{root / CONFIG_FILE} is not valid JSON: {exc}") from None
    if record.get("format") != STUDENT_FORMAT or record.get("kind") not in ("timm", "pruned"):
        raise StudentError(f"{root / CONFIG_FILE} is not a student config (format "
                           f"{record.get('format')!r}, kind {record.get('kind')!r})")
    if not (root / WEIGHTS_FILE).is_file():
        raise StudentError(f"{root} has no {WEIGHTS_FILE}")
    return record


def student_dims(record: dict, template: GraphDims | None = None) -> GraphDims:
    """The dims a student was made for (mask levels off unless the template asks)."""
    d = record["dims"]
    base = template or GraphDims()
    return GraphDims(imgsz=int(d["imgsz"]), fpn_dim=int(d["fpn_dim"]),
                     scale_factors=tuple(d["scale_factors"]), text_len=base.text_len,
                     text_dim=base.text_dim, num_queries=base.num_queries,
                     max_classes=base.max_classes, masks=base.masks)


def skeleton(record: dict) -> nn.Module:
    """The student's module before its tensors are loaded."""
    if record["kind"] == "timm":
        return TimmStudent(record["timm"], student_dims(record),
                           tuple(record["out_indices"]), pretrained="none")
    return _pruned_skeleton(record)


def load_student(student_dir: str | Path) -> tuple[nn.Module, dict]:
    """(module in eval mode on the CPU, its config record) from a student directory."""
    from safetensors.torch import load_file

    root = Path(student_dir)
    record = read_record(root)
    module = skeleton(record)
    try:
        assign_tensors(module, load_file(str(root / WEIGHTS_FILE)))
    except TensorsMismatch as exc:
        raise StudentError(f"{root / WEIGHTS_FILE} does not fit its config: {exc}") from None
    return module.eval(), record


def check_fits(record: dict, dims: GraphDims, where: str) -> None:
    """Refuse a student made for other sizes than the repository's (one line)."""
    want = dims_record(dims)
    got = {k: record["dims"][k] for k in want}
    got["scale_factors"] = [float(s) for s in got["scale_factors"]]
    if got != want:
        raise StudentError(f"{where} was distilled for {got}, the checkpoint serves {want}")
