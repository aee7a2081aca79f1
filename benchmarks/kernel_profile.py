"""Where the served torch modules spend their time, per kernel: the PyTorch profiler on a
`--backend torch` repository's backbone and enc_dec.

The modules run as the repository serves them (its precision and compile mode) but
without CUDA graphs, so that each kernel is seen and the launch cost shows as the gap
between wall time and device time. Kernels are grouped by kind (matrix products,
attention, normalisation, pointwise, copies); the FLOPs of each call, counted on the
module itself, give the achieved rate. On a CPU the operators' own times stand in for
kernels.

    python -m dart_triton.benchmarks.kernel_profile --repo REPO [--classes 4] [--iters 5]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dart_triton.benchmarks import common
from dart_triton.contract import specs

STUDY = "kernel_profile"
TOP = 8

# First match wins: attention before matmul (flash kernels mention gemm-like tiles),
# copies before pointwise. Names are CUDA kernels (cuBLAS/CUTLASS, ATen, Triton from
# torch.compile) or, on a CPU, ATen operators. "matmul" includes the patch embedding's
# convolution; "overhead" is the CPU's shape-only operators (no kernel on a GPU).
KINDS: list[tuple[str, re.Pattern]] = [
    ("attention", re.compile(r"flash|fmha|attention|scaled_dot_product|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|cublas|triton_tem_fused_(?:add)?mm|"
                          r"^aten::(?:mm|addmm|bmm|baddbmm|matmul|linear|_linear)$|"
                          r"splitk|nvjet|\bmm_|convolution|convolve|conv2d", re.I)),
    ("overhead", re.compile(r"^aten::(?:view|_unsafe_view|as_strided|reshape|expand|permute|"
                            r"transpose|t|slice|select|unsqueeze|squeeze|empty|empty_like|"
                            r"split|chunk|unbind|narrow|detach|alias|lift_fresh|"
                            r"result_type)$")),
    ("copy", re.compile(r"memcpy|memset|^aten::(?:copy_|to|_to_copy|contiguous|clone|cat)$",
                        re.I)),
    ("normalisation", re.compile(r"norm|softmax|triton_(?:red|per)_|reduce|^aten::(?:sum|"
                                 r"mean|var|std|amax|max)$", re.I)),
    ("pointwise", re.compile(r"elementwise|vectorized|unrolled|triton_poi_|^aten::", re.I)),
]
KIND_NAMES = [k for k, _ in KINDS] + ["other"]


def kind_of(name: str) -> str:
    """The kind of one kernel (or CPU operator) from its name."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


@dataclass
class Kernel:
    name: str
    ms: float  # summed over the profiled calls
    calls: int


def device_kernels(prof, device: str) -> list[Kernel]:
    """What ran on the device: CUDA kernels (and copies) on a GPU; on a CPU, the operators'
    own times (self time: a parent's total would count its children twice)."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.key_averages():
        if device == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:  # torch < 2.4 named it after CUDA
                us = e.self_cuda_time_total
        else:
            if e.device_type != DeviceType.CPU or not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            out.append(Kernel(e.key, us / 1e3, e.count))
    return out


def by_kind(kernels: Iterable[Kernel]) -> dict[str, float]:
    ms: dict[str, float] = defaultdict(float)
    for k in kernels:
        ms[kind_of(k.name)] += k.ms
    return {kind: ms.get(kind, 0.0) for kind in KIND_NAMES}


def call_flops(module, inputs) -> int:
    """FLOPs of one eager call (matrix products and attention), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


def profile_call(fn: Callable[[], object], device: str, iters: int,
                 warmup: int = 2) -> tuple[list[Kernel], float]:
    """The kernels of `iters` calls of fn, and the wall time per call (ms, synchronised)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):  # compilation and algorithm choice stay outside the profile
        fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    kernels = device_kernels(prof, device)
    for k in kernels:
        k.ms /= iters
        k.calls = max(1, round(k.calls / iters))
    return kernels, wall_ms


def profile_repository(repo: Path, classes: int, iters: int) -> tuple[list[dict], list[dict]]:
    """(one row per graph, its top kernels) for a torch repository on its own device."""
    import torch

    from dart_triton.benchmarks.gpu_check import repository_facts
    from dart_triton.graphs.torch_graphs import (
        TorchGraph,
        TorchSettings,
        example_inputs,
        weights_dir,
    )

    facts = repository_facts(repo)
    device = "cuda" if facts["gpu"] and torch.cuda.is_available() else "cpu"
    settings = TorchSettings(precision=facts["precision"], compile=facts["compile"],
                             cuda_graphs=False)
    rows, tops = [], []
    for name in specs.GRAPH_MODELS:
        graph = TorchGraph.from_weights(weights_dir(repo, name), name, device, settings)
        n = 1 if name == specs.BACKBONE else classes
        inputs = example_inputs(name, graph.dims, n, device)
        if name == specs.BACKBONE:  # a real photo's statistics, not zeros
            inputs = (torch.randn_like(inputs[0]),)
        cast = [t.to(graph.dtype) if t.is_floating_point() else t for t in inputs]
        flops = call_flops(graph.module, cast)
        kernels, wall_ms = profile_call(lambda g=graph, i=inputs: g(*i), device, iters)
        busy_ms = sum(k.ms for k in kernels)
        row = {"graph": name, "prompts": n if name == specs.ENC_DEC else "-",
               "wall_ms": wall_ms, "device_ms": busy_ms,
               "busy_pct": 100 * busy_ms / wall_ms if wall_ms else float("nan"),
               "gflop": flops / 1e9,
               "tflops": flops / (busy_ms * 1e9) if busy_ms else float("nan")}
        kinds = by_kind(kernels)
        row.update({f"{kind}_pct": 100 * ms / busy_ms if busy_ms else float("nan")
                    for kind, ms in kinds.items()})
        rows.append(row)
        for k in sorted(kernels, key=lambda k: k.ms, reverse=True)[:TOP]:
            tops.append({"graph": name, "kernel": _short(k.name), "kind": kind_of(k.name),
                         "ms": k.ms, "share_pct": 100 * k.ms / busy_ms, "calls": k.calls})
        del graph
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, [dict(t, device=device) for t in tops]


def _short(name: str, width: int = 70) -> str:
    """Kernel names run to hundreds of characters (templates): cut for the table."""
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m dart_triton.benchmarks.{STUDY}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, required=True, help="a --backend torch repository")
    p.add_argument("--classes", type=int, default=4, help="prompts per enc_dec call")
    p.add_argument("--iters", type=int, default=5, help="profiled calls per graph")
    p.add_argument("--stem", default=STUDY, help="RESULTS.md section key and CSV stem")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="CSV directory")
    p.add_argument("--results", type=Path, default=common.DEFAULT_RESULTS,
                   help="markdown results file")
    args = p.parse_args(argv)
    if args.classes < 1 or args.iters < 1:
        p.error("--classes and --iters must be at least 1")
    from dart_triton.benchmarks.gpu_check import repository_facts

    repo = args.repo.resolve()
    facts = repository_facts(repo)
    if args.classes > facts["max_classes"]:
        p.error(f"--classes {args.classes} is more than the repository's max "
                f"{facts['max_classes']} prompts per enc_dec call")
    rows, tops = profile_repository(repo, args.classes, args.iters)
    common.write_csv(rows, args.out / f"{args.stem}.csv")
    common.write_csv(tops, args.out / f"{args.stem}_kernels.csv")
    device = tops[0]["device"] if tops else "cpu"
    unit = "kernel" if device == "cuda" else "ATen operator (self time)"
    notes = (f"`--backend torch` repository at {facts['imgsz']} px, {facts['precision']}, "
             f"compile {facts['compile']}, run on {device} **without CUDA graphs** so that "
             f"each {unit} is seen; {args.iters} profiled calls per graph after 2 warm-up "
             "calls, figures per call. device_ms: the summed time of what ran on the device; "
             "busy_pct: device_ms over wall_ms (below 100: the device waits for launches, "
             "which CUDA graphs remove when served); gflop: matrix products and attention "
             "counted by `torch.utils.flop_counter` on the module; tflops: gflop over "
             "device_ms. The *_pct columns split device_ms by kind (kernel names matched in "
             "`benchmarks/kernel_profile.py`).")
    kind_cols = [f"{k}_pct" for k in KIND_NAMES]
    body = (common.section_header(f"Kernel profile, torch backend, {facts['imgsz']} px",
                                  common.command_line(f"dart_triton.benchmarks.{STUDY}", argv),
                                  json.dumps(facts), notes)
            + "\n" + common.markdown_table(rows, ["graph", "prompts", "wall_ms", "device_ms",
                                                  "busy_pct", "gflop", "tflops", *kind_cols],
                                           digits=2)
            + f"\n\nThe {TOP} longest per graph:\n\n"
            + common.markdown_table(tops, ["graph", "kernel", "kind", "ms", "share_pct",
                                           "calls"], digits=3) + "\n")
    common.update_section(args.results, args.stem, body)
    print(common.markdown_table(rows, ["graph", "wall_ms", "device_ms", "busy_pct", "tflops",
                                       *kind_cols], digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
