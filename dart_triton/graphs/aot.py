"""Graph modules compiled ahead of time (AOTInductor), shipped in the repository.

`dart-triton build --backend torch --compile MODE` exports each graph module
(`torch.export`, enc_dec with a dynamic prompt count 1..max_classes) and compiles it with
AOTInductor into ``<model>/1/weights/<model>.pt2``, on the device it will serve on. At
load the served model opens that package (a shared library: no tracing, no compiling),
so start-to-ready is reading weights and capturing CUDA graphs; without a package it
compiles with `torch.compile` at load, as before.

A package holds machine code for one machine kind: the torch version, the device (the
GPU's name and compute capability, or the CPU's vector instruction set: code built for
AVX-512 dies with SIGILL on an AVX2 CPU) and the CUDA version. `machine_key` names that;
the key is written beside the package, `check-repository` reports a package made for
another machine as stale (the container entrypoint then rebuilds), and the served model
refuses one in one line rather than running it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dart_triton.contract import specs
from dart_triton.contract.specs import GraphDims

KEY_SUFFIX = ".aot.json"
PACKAGE_SUFFIX = ".pt2"


class AotMismatch(ValueError):
    """A package compiled for another machine kind than this one."""


def machine_key(device: torch.device | str) -> dict[str, str]:
    """What compiled code depends on, for `device` on this machine."""
    device = torch.device(device)
    key = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        key.update(gpu=torch.cuda.get_device_name(index), capability=f"{major}.{minor}",
                   cuda=str(torch.version.cuda))
    else:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        key["cpu_isa"] = str(pick_vec_isa()) or "none"
    return key


def package_path(weights: str | Path, name: str) -> Path:
    return Path(weights) / f"{name}{PACKAGE_SUFFIX}"


def key_path(weights: str | Path, name: str) -> Path:
    return Path(weights) / f"{name}{KEY_SUFFIX}"


def read_key(weights: str | Path, name: str) -> dict | None:
    """The recorded key of the package of `name` in `weights`; None without a package."""
    if not package_path(weights, name).is_file():
        return None
    try:
        return json.loads(key_path(weights, name).read_text())
    except (OSError, ValueError):
        return {}  # a package without a readable key matches nothing


def mismatch(recorded: dict, device: torch.device | str) -> str | None:
    """Why a package with key `recorded` cannot run on `device` here; None when it can."""
    here = machine_key(device)
    differ = [f"{k} {recorded.get(k)!r} (here {here[k]!r})" for k in here
              if recorded.get(k) != here[k]]
    return ", ".join(differ) or None


class ServedModule(nn.Module):
    """What the served model computes: inputs cast to the graph's precision, FP32 out."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast = [t.to(self.dtype) if t.is_floating_point() else t for t in inputs]
        out = self.module(*cast)
        return tuple(t.float() for t in ((out,) if isinstance(out, torch.Tensor) else out))


def compile_package(name: str, module: nn.Module, dims: GraphDims, device: torch.device | str,
                    dtype: torch.dtype, mode: str, weights: str | Path,
                    example: Callable[..., tuple[torch.Tensor, ...]],
                    max_batch: int = 1) -> Path:
    """Export `module` (already on `device` in `dtype`) and compile it into the package
    of `name` in `weights`, with its key. `example(n)` gives inputs for n prompts
    (enc_dec) or frames (backbone: 1..max_batch of them); `example(n, f)`, enc_dec's
    inputs for n prompts of f frames (shared passes: enc_dec with max_batch > 1)."""
    served = ServedModule(module, dtype).eval()
    if name == specs.ENC_DEC:
        n = max(2, dims.max_classes)  # an example of 1 would be specialised to 1
        prompts = torch.export.Dim("prompts", min=1, max=max(2, dims.max_classes))
        dynamic = (({}, {0: prompts}, {0: prompts}),)  # forward(*inputs): one packed argument
        args = example(n)
        if max_batch > 1:  # shared passes: 1..max_batch frames and a row -> frame index
            frames = torch.export.Dim("pass_frames", min=1, max=max_batch)
            dynamic = (({0: frames}, {0: prompts}, {0: prompts}, {0: prompts}),)
            args = example(n, 2)
    elif max_batch > 1:
        frames = torch.export.Dim("frames", min=1, max=max_batch)
        dynamic, args = (({0: frames},),), example(2)
    else:
        dynamic, args = None, example(1)
    with torch.no_grad():
        program = torch.export.export(served, args, dynamic_shapes=dynamic, strict=False)
    configs = {"max_autotune": True} if mode == "max-autotune" else {}
    path = package_path(weights, name)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                              inductor_configs=configs)
    key_path(weights, name).write_text(json.dumps(machine_key(device), indent=2))
    return path


def load_package(weights: str | Path, name: str, device: torch.device | str) -> Callable | None:
    """The compiled package of `name`, ready to call; None when the repository has none.
    Raises `AotMismatch` (one line) for a package made for another machine kind."""
    recorded = read_key(weights, name)
    if recorded is None:
        return None
    if why := mismatch(recorded, device):
        raise AotMismatch(f"{package_path(weights, name)} was compiled for another machine "
                          f"({why}): rebuild the repository with `dart-triton build` on "
                          "this machine kind")
    device = torch.device(device)
    index = device.index if device.index is not None else -1
    # Single-threaded runner: no locking of its own, which CUDA graph capture needs.
    model = torch._inductor.aoti_load_package(str(package_path(weights, name)),
                                              run_single_threaded=True, device_index=index)
    return lambda *inputs: tuple(model(*inputs))
