"""The pruned ViT backbone: a SAM3 trunk with some residual branches removed (DART §3.6).

Each ViT block is ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``: two residual
branches, each removable on its own (a removed branch leaves ``x`` as it is). A
`PruningPlan` (PLAN.json, written by `dart-triton prune`, see `compression.pruning`)
lists the removals in the order the search found them; `prune` applies the first k.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PARTS = ("attention", "mlp")
PLAN_FORMAT = 1


class PlanError(ValueError):
    """A pruning plan that cannot be read or does not fit the backbone."""


# Applying removals --------------------------------------------------------------------


def prune(backbone: nn.Module, removed: Iterable[tuple[int, str]]) -> nn.Module:
    """A copy of a `RestructuredBackbone` with these (block, part) residual branches gone.

    The removed sub-modules are dropped (not zeroed), so neither the weights nor the
    work are in an exported graph; a block with both parts removed is the identity."""
    pruned = copy.deepcopy(backbone)
    for block, part in removed:
        check_part(part)
        if not 0 <= block < len(pruned.blocks):
            raise PlanError(f"block {block} does not exist: the backbone has "
                            f"{len(pruned.blocks)} blocks")
        target = pruned.blocks[block]
        if part == "attention":
            target.attn, target.norm1 = None, None
        else:
            target.mlp, target.norm2 = None, None
    return pruned


def removed_parts(backbone: nn.Module) -> list[tuple[int, str]]:
    """The (block, part) branches a backbone lacks, in block order."""
    out = []
    for i, block in enumerate(backbone.blocks):
        out += [(i, "attention")] if block.attn is None else []
        out += [(i, "mlp")] if block.mlp is None else []
    return out


def check_part(part: str) -> str:
    if part not in PARTS:
        raise PlanError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    return part


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the module's tensors (names, shapes, dtypes, bytes), for a plan or a
    student to refuse a checkpoint other than the one it was made from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()



@dataclass(frozen=True)
class Removal:
    block: int
    part: str
    loss: float  # trunk-output MSE with this and every earlier removal applied

    def as_dict(self) -> dict:
        return {"block": self.block, "part": self.part, "loss": self.loss}


# The plan file ---------------------------------------------------------------------------


@dataclass
class PruningPlan:
    """PLAN.json: the removal order of one search and what it was searched on."""

    removed: list[Removal]
    unit: str = "sub-block"
    protected: list[int] = field(default_factory=list)
    num_blocks: int = 0
    checkpoint: dict = field(default_factory=dict)  # path, weights_sha256
    calibration: dict = field(default_factory=dict)  # images, count, resolution, files

    @property
    def per_unit(self) -> int:
        return 2 if self.unit == "block" else 1

    @property
    def size(self) -> int:
        """How many units (sub-blocks or blocks) the plan can remove."""
        return len(self.removed) // self.per_unit

    def first(self, k: int) -> list[tuple[int, str]]:
        """The (block, part) branches of the first k units (k <= size)."""
        if not 0 <= k <= self.size:
            raise PlanError(f"the plan removes at most {self.size} {self.unit}s, asked for {k}")
        return [(r.block, r.part) for r in self.removed[: k * self.per_unit]]

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "unit": self.unit, "protected": self.protected,
                "num_blocks": self.num_blocks,
                "removed": [r.as_dict() for r in self.removed],
                "checkpoint": self.checkpoint, "calibration": self.calibration,
                "loss": "MSE between pruned and unpruned trunk output (after the last "
                        "block) on the calibration images, with this and every earlier "
                        "removal applied"}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != PLAN_FORMAT:
                raise PlanError(f"{path}: plan format {raw.get('format')!r}, expected "
                                f"{PLAN_FORMAT}")
            removed = [Removal(int(r["block"]), check_part(r["part"]), float(r["loss"]))
                       for r in raw["removed"]]
            return cls(removed, raw["unit"], list(raw.get("protected", [])),
                       int(raw.get("num_blocks", 0)), raw.get("checkpoint", {}),
                       raw.get("calibration", {}))
        except FileNotFoundError:
            raise PlanError(f"pruning plan not found: {path}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"{path} is not a pruning plan: {exc}") from None

    def check_backbone(self, backbone: nn.Module) -> None:
        """Refuse a backbone other than the one searched (its weights fingerprint)."""
        want = self.checkpoint.get("weights_sha256")
        if want and want != weights_fingerprint(vit_weights(backbone)):
            raise PlanError(f"the plan was searched on other weights "
                            f"({self.checkpoint.get('path')}): its fingerprint differs")


def vit_weights(backbone: nn.Module) -> nn.Module:
    """What the fingerprint covers: the trunk (patch embedding and blocks), not the FPN
    levels a build happens to export."""
    return nn.ModuleDict({"patch_embed": backbone.patch_embed, "pre_norm": backbone.pre_norm,
                          "blocks": backbone.blocks})


def load_plan(spec: str) -> tuple[PruningPlan, int]:
    """'PLAN.json:K' -> (plan, K)."""
    path, sep, k = spec.rpartition(":")
    if not sep or not path or not k.isdigit():
        raise PlanError(f"expected PLAN.json:K (K removals from the plan), got {spec!r}")
    plan = PruningPlan.load(path)
    plan.first(int(k))  # in range
    return plan, int(k)


