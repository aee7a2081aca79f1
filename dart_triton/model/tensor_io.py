"""A module's tensors to and from safetensors files, without pickle.

Shared by the torch backend's graph weights (`graphs.torch_graphs`) and the student
backbones (`backbones.students`): both rebuild a module with its parameters on the meta
device and then put every saved tensor in place by name.
"""

from __future__ import annotations

import torch
from torch import nn


class TensorsMismatch(ValueError):
    """Saved tensors that do not fit the module (missing, unexpected or misshapen)."""


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, non-persistent buffers included: the
    precomputed tables are part of what the module computes, not state to rebuild."""
    out = {name: p.detach() for name, p in module.named_parameters()}
    out.update({name: b.detach() for name, b in module.named_buffers()})
    return out


def storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses that)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    return out


def assign_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put every saved tensor in place (by name); refuse missing or unexpected ones."""
    wanted = module_tensors(module)
    missing, unexpected = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise TensorsMismatch(f"weights do not fit the module: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for full, value in tensors.items():
        owner_name, _, leaf = full.rpartition(".")
        owner = module.get_submodule(owner_name)
        if wanted[full].shape != value.shape:
            raise TensorsMismatch(f"{full}: saved shape {tuple(value.shape)}, module "
                                  f"expects {tuple(wanted[full].shape)}")
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
    left = [n for n, t in module_tensors(module).items() if t.is_meta]
    if left:
        raise TensorsMismatch(f"tensors left unset: {left[:3]}")
