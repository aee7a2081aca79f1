"""Backbones beyond ViT-H (issue 11): latency and parameters of every `--backbone` choice.

    python -m dart_triton.benchmarks.backbones [--config full] [--imgsz 322] [--iters 3]
                                               [--serve] [--students NAME ...]

Full-size, random-weight modules at the benchmark resolution (compute does not depend on
weight values): SAM3's ViT-H (`RestructuredBackbone`), SBP-8/16 (sub-blocks removed),
block-pruned 8/16 (whole blocks removed) and the paper's four timm students with their
FPN adapter, as served (the detection level only). Each is timed in PyTorch (FP32 eager,
the torch backend's path on a CPU) and in ONNX Runtime (what the python and onnxruntime
backends run), median of ``--iters`` after ``--warmup``.

Random weights cannot rank sub-blocks (the search needs the real model), so the pruned
rows use stand-in plans: every windowed ViT-H block costs the same, so latency depends
only on how many attention and MLP sub-blocks go. SBP-k removes k/2 of each (the rows
"one windowed attention / MLP sub-block" give the cost of any other mix); block-pruned-k
removes k whole windowed blocks. Global-attention blocks are never removed.

``--serve`` measures instead end-to-end frames/s through tritonserver (python backend,
ONNX Runtime graphs) at 4 classes for ViT-H, block-pruned-16 and each student, one
request at a time to `dart` (section ``backbones_served``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dart_triton.benchmarks import common

STUDY = "backbones"
PRUNED = (("SBP", "sub-block", 8), ("SBP", "sub-block", 16), ("block-pruned", "block", 8),
          ("block-pruned", "block", 16))


def vision_model(config: str, imgsz: int):
    """Sam3VisionModel at imgsz, random weights (the full config: ViT-H/14, 32 blocks)."""
    from transformers import Sam3Config, Sam3VisionModel

    from dart_triton.model.checkpoint import tiny_config

    cfg = Sam3Config() if config == "full" else tiny_config("d")
    cfg.vision_config.backbone_config.image_size = imgsz
    torch.manual_seed(0)
    return Sam3VisionModel(cfg.vision_config).eval()


def stand_in_removals(backbone, unit: str, k: int, protected: set[int]) -> list:
    windowed = [b for b in range(len(backbone.blocks)) if b not in protected]
    k = min(k, len(windowed) * (1 if unit == "block" else 2))  # the tiny config has few
    if unit == "block":
        return [(b, p) for b in windowed[:k] for p in ("attention", "mlp")]
    half = k // 2
    return ([(b, "mlp") for b in windowed[:k - half]]
            + [(b, "attention") for b in windowed[k - half:k]])


def params_m(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def served_params_m(module) -> float:
    """Parameters the served graph uses (a student's finer adapter levels are not)."""
    from dart_triton.backbones.students import TimmStudent

    if isinstance(module, TimmStudent):
        used = set(module.levels)
        adapters = sum(params_m(a) for i, a in enumerate(module.adapters) if i in used)
        return params_m(module.trunk) + adapters
    return params_m(module)


def _best(timing) -> tuple[float, float]:
    """(fastest, median) ms: on a shared CPU the fastest run is the least disturbed one."""
    return min(timing.samples_ms), timing.median_ms


def gflops(module, pixels: torch.Tensor) -> float:
    """FLOPs of one forward (matmuls and convolutions, counted by PyTorch): independent of
    how busy the machine is."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(pixels)
    return counter.get_total_flops() / 1e9


def paired(fn, baseline, args) -> tuple[list[float], list[float]]:
    """Samples (ms) of fn and of the ViT-H baseline, taken in turn: on a shared CPU both
    see the same load, so their ratio holds even when the absolute numbers drift."""
    mine, base = [], []
    for _ in range(args.warmup):
        fn(), baseline()
    for _ in range(max(1, args.iters)):
        for call, samples in ((baseline, base), (fn, mine)):
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1e3)
    return mine, base


def ort_graph(module, pixels: torch.Tensor, workdir: Path):
    """Export (opset 18, as `build` does) into workdir and open in ONNX Runtime."""
    from dart_triton.export.onnx_export import export_module
    from dart_triton.graphs.runtime import OrtGraph

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "backbone.onnx"
    export_module(module, (torch.zeros_like(pixels),), path, ["pixel_values"], ["fpn_features"])
    return OrtGraph(path)


def sub_block_costs(backbone, pixels: torch.Tensor, args) -> list[dict]:
    """One windowed attention and one MLP sub-block on the trunk's activations (PyTorch)."""
    with torch.inference_mode():
        x = backbone.pre_norm(backbone.patch_embed(pixels).permute(0, 2, 3, 1)
                              + backbone.pos_embed)
        block = next(b for b in backbone.blocks if b.window > 0)
        attn = common.time_call(lambda: block.attention_branch(x), args.iters, args.warmup)
        mlp = common.time_call(lambda: block.mlp(block.norm2(x)), args.iters, args.warmup)
    return [{"backbone": "one windowed attention sub-block", "torch_ms": _best(attn)[0],
             "torch_median_ms": attn.median_ms},
            {"backbone": "one MLP sub-block", "torch_ms": _best(mlp)[0],
             "torch_median_ms": mlp.median_ms}]


def _student(name: str, dims):
    from dart_triton.backbones.students import TimmStudent

    torch.manual_seed(0)
    return TimmStudent(name, dims).eval()


def measure(args, imgsz: int) -> list[dict]:
    from dart_triton.backbones.pruned import prune
    from dart_triton.contract.specs import GraphDims
    from dart_triton.model.backbone import RestructuredBackbone
    vm = vision_model(args.config, imgsz)
    fpn_dim = int(vm.config.fpn_hidden_size)
    dims = GraphDims(imgsz=imgsz, fpn_dim=fpn_dim,
                     scale_factors=tuple(vm.config.scale_factors))
    vit = RestructuredBackbone(vm, imgsz).eval()
    protected = set(vm.config.backbone_config.global_attn_indexes)
    pixels = torch.from_numpy(np.random.default_rng(0).uniform(
        -1, 1, (1, 3, imgsz, imgsz)).astype(np.float32))
    # (label, module factory, flag): one module alive at a time (ViT-H copies are 2.5 GB)
    candidates: list[tuple[str, object, str]] = [("ViT-H (vit)", lambda: vit, "vit")]
    for name, unit, k in PRUNED:
        candidates.append((f"{name}-{k}", lambda u=unit, n=k: prune(
            vit, stand_in_removals(vit, u, n, protected)), f"pruned:PLAN.json:{k} (--unit {unit})"))
    for student in args.students:
        candidates.append((f"{student} + adapter", lambda s=student: _student(s, dims),
                           f"student:DIR (timm:{student})"))
    rows = []
    x = pixels.numpy()
    with tempfile.TemporaryDirectory(prefix="bench-backbones-") as tmp, torch.inference_mode():
        vit_ort = None if args.no_ort else ort_graph(vit, pixels, Path(tmp) / "vit")
        vit_torch_all, vit_ort_all = [], []
        for i, (label, factory, flag) in enumerate(candidates):
            print(f"{label} ...", flush=True)
            module = factory()
            row = {"backbone": label, "flag": flag, "params_m": params_m(module),
                   "served_params_m": served_params_m(module),
                   "gflops": gflops(module, pixels)}
            mine, base = paired(lambda m=module: m(pixels), lambda: vit(pixels), args)
            vit_torch_all += base
            row.update(torch_ms=min(mine), torch_median_ms=statistics.median(mine),
                       torch_speedup=min(base) / min(mine))
            if vit_ort is not None:
                graph = vit_ort if i == 0 else ort_graph(module, pixels, Path(tmp) / str(i))
                mine, base = paired(lambda g=graph: g(pixel_values=x),
                                    lambda: vit_ort(pixel_values=x), args)
                vit_ort_all += base
                row.update(ort_ms=min(mine), ort_median_ms=statistics.median(mine),
                           ort_speedup=min(base) / min(mine))
                del graph
            rows.append(row)
            del module
            print(f"  {row}", flush=True)
    # ViT-H's own row: its fastest run over the whole study
    rows[0].update(torch_ms=min(vit_torch_all), torch_speedup=1.0)
    if vit_ort_all:
        rows[0].update(ort_ms=min(vit_ort_all), ort_speedup=1.0)
    for r in rows:
        r["flops_ratio"] = rows[0]["gflops"] / r["gflops"]
    return rows + sub_block_costs(vit, pixels, args)


def measure_served(args, imgsz: int) -> list[dict]:
    """End-to-end frames/s through `dart` at 4 classes, one repository per backbone."""
    from dart_triton.backbones.pruned import PruningPlan, Removal, vit_weights, weights_fingerprint
    from dart_triton.backbones.students import dims_record, save_student, teacher_levels
    from dart_triton.benchmarks.serving import graphs_dir
    from dart_triton.client import DartClient
    from dart_triton.export.repository import build_repository
    from dart_triton.model.parts import load_parts
    from dart_triton.serving.server import TritonServer

    checkpoint = common.checkpoint_for(args)
    parts = load_parts(checkpoint, imgsz, 4)
    fingerprint = weights_fingerprint(vit_weights(parts.backbone))
    image, names = common.test_image(), common.class_names(4)
    cache = common.cache_dir()
    choices = {"ViT-H (vit)": "vit"}
    protected = set(parts.model.config.vision_config.backbone_config.global_attn_indexes)
    for name, unit, k in PRUNED[3:]:  # block-pruned-16: the authors' pruned model
        plan = cache / f"stand-in-{unit}-{k}.json"
        removed = stand_in_removals(parts.backbone, unit, k, protected)
        PruningPlan([Removal(b, p, 0.0) for b, p in removed], unit, sorted(protected),
                    len(parts.backbone.blocks),
                    {"path": str(checkpoint), "weights_sha256": fingerprint}).save(plan)
        choices[f"{name}-{k}"] = f"pruned:{plan}:{len(removed) // (2 if unit == 'block' else 1)}"
    for student in args.students:
        out = cache / f"student-{student}-{imgsz}"
        if not (out / "config.json").is_file():
            module = _student(student, parts.dims)
            save_student(out, module, {**module.record(), "dims": dims_record(parts.dims),
                                       "levels": teacher_levels(parts.dims),
                                       "teacher": {"path": str(checkpoint),
                                                   "weights_sha256": fingerprint}})
        choices[f"{student} + adapter"] = f"student:{out}"
    onnx = graphs_dir(checkpoint, imgsz, 4)
    rows = []
    for label, choice in choices.items():
        repo = cache / f"repo-{label.split()[0]}-{imgsz}-m4"
        if not (repo / "dart_repository.json").is_file():
            print(f"building {repo} ...", flush=True)
            build_repository(checkpoint, repo, backend="python", imgsz=imgsz, max_classes=4,
                             backbone=choice, onnx_dir=onnx if choice == "vit" else None,
                             log=lambda *_: None)
        with TritonServer(repo, startup_timeout=900) as server, DartClient(
                server.grpc_url) as client:
            timing = common.time_call(lambda c=client: c.detect(image, names), args.iters,
                                      args.warmup)
        rows.append({"backbone": label, "flag": choice.split(":")[0],
                     "frame_ms": timing.median_ms, "fps": 1000.0 / timing.median_ms})
        print(f"  {rows[-1]}", flush=True)
    for r in rows:
        r["vs_vit"] = r["fps"] / rows[0]["fps"]
    return rows


def served_report(rows, args, imgsz: int, command: str) -> str:
    header = common.section_header(
        f"Backbones served end to end ({imgsz} px, 4 classes)", command,
        f"{args.config}: random weights at {imgsz} px; python backend (ONNX Runtime graphs)",
        notes=("One request at a time to `dart` (astronaut photo, 4 COCO classes): "
               "preprocess, backbone and text (cached), one enc_dec pass, postprocess. "
               "Median of the timed requests after warm-up. block-pruned-16 uses a "
               "stand-in plan (16 windowed blocks)."))
    table = common.markdown_table(rows, ["backbone", "flag", "frame_ms", "fps", "vs_vit"],
                                  ["backbone", "--backbone", "ms/frame", "frames/s",
                                   "vs ViT-H"], digits=2)
    return f"{header}\n{table}\n"


def plot(rows: list[dict], path: Path) -> Path:
    fig, (ax,) = common.new_figure(width=7.5, height=4.2)
    main = [r for r in rows if r.get("params_m")]
    for r in main:
        for key, marker in (("torch_ms", "o"), ("ort_ms", "s")):
            if r.get(key) == r.get(key):
                ax.scatter(r["served_params_m"], r[key], marker=marker,
                           color="C0" if key == "torch_ms" else "C1")
        ax.annotate(r["backbone"].replace(" + adapter", ""), (r["served_params_m"],
                                                              r["torch_ms"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter([], [], marker="o", color="C0", label="PyTorch FP32")
    ax.scatter([], [], marker="s", color="C1", label="ONNX Runtime")
    ax.set(xscale="log", yscale="log", xlabel="served parameters (M)",
           ylabel="backbone latency (ms)", title="backbones: latency vs size")
    ax.legend()
    return common.save_figure(fig, path)


def report(rows, args, imgsz: int, command: str) -> str:
    header = common.section_header(
        f"Backbones: ViT-H, pruned, students ({imgsz} px)", command,
        f"{args.config}: random weights at {imgsz} px; students with adapter to 256 channels",
        notes=("Fastest of the timed runs after warm-up (medians in the CSV: the machine is "
               "shared, the fastest run is the least disturbed), batch 1, 2 CPU cores. Each "
               "backbone's runs alternate with ViT-H's, and 'vs ViT-H' compares the fastest of "
               "each in that window (both under the same load). Pruned rows "
               "use stand-in plans (latency depends only on how many attention/MLP "
               "sub-blocks go: see the module docstring). Students are served as built: "
               "the trunk through stage 2 plus the coarsest adapter level only."))
    cols = ["backbone", "flag", "params_m", "served_params_m", "gflops", "flops_ratio",
            "torch_ms",
            "torch_speedup", "ort_ms", "ort_speedup"]
    heads = ["backbone", "--backbone", "params (M)", "served params (M)", "GFLOPs",
             "ViT-H / FLOPs", "PyTorch ms", "vs ViT-H", "ORT ms", "vs ViT-H"]
    table = common.markdown_table(rows, cols, heads, digits=1)
    return f"{header}\n{table}\n\n{common.image_link(args, STUDY, 'backbones')}\n"


def main(argv: list[str] | None = None) -> int:
    from dart_triton.backbones.students import PAPER_STUDENTS

    p = common.base_parser("dart_triton.benchmarks.backbones", __doc__.splitlines()[0],
                           classes=(4,))
    p.add_argument("--students", nargs="*", default=list(PAPER_STUDENTS),
                   help="timm students to time (default: the paper's four)")
    p.add_argument("--no-ort", action="store_true", help="PyTorch only (no ONNX export)")
    p.add_argument("--serve", action="store_true",
                   help="instead: frames/s through tritonserver at 4 classes (ViT-H, "
                        "block-pruned-16, the students), a section of its own")
    args = p.parse_args(argv)
    imgsz = common.resolve_imgsz(args)
    command = common.command_line("dart_triton.benchmarks.backbones", argv)
    with torch.no_grad():  # scoped: main() also runs in-process (smoke tests)
        return _run(args, imgsz, command)


def _run(args, imgsz: int, command: str) -> int:
    if args.serve:
        served = measure_served(args, imgsz)
        common.write_csv(served, Path(args.out) / f"{STUDY}_served.csv")
        common.update_section(args.results, f"{STUDY}_served",
                              served_report(served, args, imgsz, command))
        print(f"wrote {args.results} ({STUDY}_served section)")
        return 0
    rows = measure(args, imgsz)
    common.write_csv(rows, Path(args.out) / f"{STUDY}.csv")
    plot(rows, Path(args.out) / f"{STUDY}.png")
    common.update_section(args.results, STUDY, report(rows, args, imgsz, command))
    print(f"wrote {args.results} ({STUDY} section) and {args.out}/{STUDY}.csv/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
