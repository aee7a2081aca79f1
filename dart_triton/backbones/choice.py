"""`--backbone {vit|pruned:PLAN.json:K|student:DIR}`: which module serves `backbone`.

Every choice keeps the contract ``pixel_values -> fpn_features`` (and the mask levels
when asked), so the same `enc_dec` and text encoder serve it:

* ``vit``: SAM3's restructured ViT (`dart_triton.model.backbone`);
* ``pruned:PLAN.json:K``: the same ViT without the first K units of a pruning plan
  (`dart_triton.compression.pruning`), training-free;
* ``student:DIR``: a distilled student directory (`dart_triton.backbones.students`): a timm trunk
  with an FPN adapter, or a pruned ViT whose remaining blocks were distilled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a module is built: parsing stays fast
    from torch import nn

KINDS = ("vit", "pruned", "student")


@dataclass(frozen=True)
class BackboneChoice:
    kind: str = "vit"
    path: Path | None = None
    k: int = 0

    @classmethod
    def parse(cls, text: str | None) -> BackboneChoice:
        text = (text or "vit").strip()
        if text == "vit":
            return cls()
        kind, _, rest = text.partition(":")
        if kind == "pruned":
            path, sep, k = rest.rpartition(":")
            if not sep or not path or not k.isdigit():
                raise ValueError(f"--backbone pruned:PLAN.json:K takes a plan file and a "
                                 f"count, got {text!r}")
            return cls("pruned", Path(path), int(k))
        if kind == "student" and rest:
            return cls("student", Path(rest))
        raise ValueError(f"--backbone must be vit, pruned:PLAN.json:K or student:DIR, "
                         f"got {text!r}")

    def __str__(self) -> str:
        if self.kind == "vit":
            return "vit"
        if self.kind == "pruned":
            return f"pruned:{self.path}:{self.k}"
        return f"student:{self.path}"

    def describe(self) -> str:
        """What a repository's `dart` config says about its backbone (absolute paths)."""
        if self.kind == "vit":
            return "vit"
        resolved = replace(self, path=self.path.resolve())
        if self.kind == "pruned":
            from dart_triton.backbones.pruned import PruningPlan

            unit = PruningPlan.load(self.path).unit
            return f"{resolved} ({unit})"
        from dart_triton.backbones.students import read_record

        record = read_record(self.path)
        what = f"timm {record['timm']}" if record["kind"] == "timm" else (
            f"pruned ViT, {len(record['removed'])} sub-blocks removed")
        return f"{resolved} ({what})"


def served_backbone(choice: BackboneChoice | str, parts) -> nn.Module:
    """The module that serves `backbone` for this choice, returning the levels
    `parts.dims.backbone_levels` names (detection first)."""
    from dart_triton.backbones.pruned import load_plan, prune, vit_weights, weights_fingerprint
    from dart_triton.backbones.students import StudentError, check_fits, load_student, select_levels

    choice = choice if isinstance(choice, BackboneChoice) else BackboneChoice.parse(choice)
    if choice.kind == "vit":
        return parts.backbone
    if choice.kind == "pruned":
        plan, k = load_plan(f"{choice.path}:{choice.k}")
        plan.check_backbone(parts.backbone)
        return prune(parts.backbone, plan.first(k)).eval()
    module, record = load_student(choice.path)
    check_fits(record, parts.dims, f"student {choice.path}")
    teacher = record.get("teacher", {}).get("weights_sha256")
    if teacher and teacher != weights_fingerprint(vit_weights(parts.backbone)):
        raise StudentError(f"student {choice.path} was distilled from other weights "
                           f"({record['teacher'].get('path')}) than this checkpoint's")
    return select_levels(module, parts.dims.backbone_levels).eval()


def with_backbone(parts, choice: BackboneChoice | str | None):
    """`Sam3Parts` whose backbone is the chosen one (the same parts for vit)."""
    choice = choice if isinstance(choice, BackboneChoice) else BackboneChoice.parse(choice)
    if choice.kind == "vit":
        return parts
    return replace(parts, backbone=served_backbone(choice, parts))
