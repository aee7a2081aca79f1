"""Masks on demand: the cost per kept class and per kept detection, and per request.

A request with RETURN_MASKS adds, on top of detection: the backbone's finer FPN levels
(once per request), enc_dec handing over the kept prompts' encoder memory, the mask head
(`model.mask_head.MaskHead`: per kept prompt, cross-attention and a pixel decoder of 3x3
convolutions climbing to the 4x level; per kept query, an MLP and a dot product) and the
RLE encoding at the image's size (`model.masks.mask_rles`). None of it depends on the ViT,
so `--config full` times these parts at full SAM3 dims (`Sam3Config()`: FPN 256, 200
queries, 1008 px -> detection grid 72, masks 288x288) on a model whose ViT and text towers
are cut to one layer (nothing here runs them); random weights time like real ones.

Whole requests, with and without masks, are measured on the CPU: `DartPipeline.detect`
in process on the full random SAM3 (the checkpoint the other CPU studies use) at
`--request-imgsz` (default 322 px, as they do: the ViT-H at 1008 px takes minutes per
frame on 2 cores), on a real photograph. On a GPU (`--device cuda`) the request latency
is derived instead: a recorded no-mask figure at 1008 px plus the parts.

    python -m dart_triton.benchmarks.masks                  # CPU (~5 min)
    python -m dart_triton.benchmarks.masks --device cuda    # GPU, FP16 as served
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dart_triton.benchmarks import common

STUDY = "masks"
FULL_IMGSZ = 1008  # the served size; the ViT is not run, so the CPU can afford it
# COCO train2017 has ~2.9 categories and ~7.3 instances per image: a "typical" request
# keeps about 3 classes and 7 detections, whatever the number of classes asked for.
TYPICAL = (3, 7)
# Recorded no-mask request latencies at 1008 px (RESULTS.md section, per device type):
# `dart` through Triton, one request in flight, 1000 / seq_fps.
BASELINE_SECTIONS = {"cuda": "class_scaling_gpu_check_cuda_full_1008"}
RLE_CASES = (("object, 2% of the image", 0.02), ("object, 15%", 0.15),
             ("object, 50%", 0.5), ("noise (worst case)", None))
TYPICAL_RLE = "object, 15%"


# Models ---------------------------------------------------------------------------------


def reduced_full_model(imgsz: int):
    """`Sam3Config()` with one-layer ViT and text towers: the neck, DETR and mask decoder
    keep their full size (the ViT's width too: the neck reads 1024 channels)."""
    import torch
    from transformers import Sam3Config, Sam3Model

    config = Sam3Config(
        vision_config=dict(backbone_config=dict(
            model_type="sam3_vit_model", num_hidden_layers=1, global_attn_indexes=[0],
            image_size=imgsz)),
        text_config=dict(num_hidden_layers=1, max_position_embeddings=32))
    torch.manual_seed(0)
    return Sam3Model(config).eval()


def mask_model(args: argparse.Namespace, imgsz: int):
    """(Sam3Model, description) whose mask parts are timed."""
    from dart_triton.model.checkpoint import load_sam3

    if args.checkpoint or args.config == "tiny":
        model = load_sam3(common.checkpoint_for(args), imgsz=imgsz)
        return model, f"{args.config}: {common.model_summary(model)}"
    model = reduced_full_model(imgsz)
    return model, (f"full SAM3 mask path (`Sam3Config()` neck, DETR 6+6 x256, 200 queries, "
                   f"mask decoder x256) at {imgsz} px, ViT/text towers cut to 1 layer "
                   "(not run), random weights")


# Parts ----------------------------------------------------------------------------------


class Parts:
    """The mask path's pieces on one device and dtype, with example inputs."""

    def __init__(self, model, imgsz: int, device: str, dtype_name: str, max_prompts: int):
        import torch

        from dart_triton.graphs.aot import ServedModule
        from dart_triton.model.mask_head import MaskHead
        from dart_triton.model.parts import graph_dims

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch.float16 if dtype_name == "fp16" else torch.float32
        self.dims = d = graph_dims(model, max_prompts, masks=True)
        # ServedModule: inputs cast to the graph's precision, FP32 out, as served.
        self.head = ServedModule(MaskHead(model, d).to(self.device, self.dtype),
                                 self.dtype).eval()
        self.neck = [model.vision_encoder.neck.fpn_layers[i].to(self.device, self.dtype)
                     for i in d.mask_levels]
        vit_width = model.config.vision_config.backbone_config.hidden_size
        grid = imgsz // 14
        gen = torch.Generator().manual_seed(0)

        def randn(*shape: int):
            return torch.randn(*shape, generator=gen).to(self.device)

        self.vit_out = randn(1, vit_width, grid, grid).to(self.dtype)
        self.levels = [randn(1, d.fpn_dim, *(2 * [d.level_hw(d.scale_factors[i])]))
                       for i in d.mask_levels]
        self.randn = randn

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], iters: int, warmup: int) -> float:
        with self.torch.inference_mode():
            return common.time_call(fn, iters, warmup, self.sync).median_ms

    def head_inputs(self, prompts: int, queries: int) -> tuple:
        d = self.dims
        return (*self.levels, self.randn(prompts, d.feat_hw ** 2, d.fpn_dim),
                self.randn(prompts, d.text_len, d.text_dim),
                self.torch.ones(prompts, d.text_len, dtype=self.torch.int32,
                                device=self.device),
                self.randn(prompts, queries, d.fpn_dim))

    def head_fn(self, prompts: int, queries: int) -> Callable[[], Any]:
        inputs = self.head_inputs(prompts, queries)
        return lambda: self.head(*inputs)

    def query_fn(self, queries: int) -> Callable[[], Any]:
        """The mask head's per-query part alone for one prompt (its MLP and the dot
        product with the pixel embedding): too small to read off whole calls' noise."""
        head, d = self.head.module, self.dims
        pixels = self.randn(1, d.fpn_dim, d.mask_hw, d.mask_hw).to(self.dtype)
        kept = self.randn(1, queries, d.fpn_dim).to(self.dtype)
        return lambda: self.torch.bmm(head.mask_embedder(kept), pixels.flatten(2))

    def neck_fn(self) -> Callable[[], Any]:
        return lambda: [layer(self.vit_out) for layer in self.neck]

    def handover_fn(self, prompts: int) -> Callable[[], Any]:
        """`MaskSources.add` of one enc_dec pass whose prompts all may keep a detection:
        the copies of their encoder memory and decoder queries (in process)."""
        from dart_triton.pipeline.masks import MaskSources
        from dart_triton.pipeline.orchestration import HeadOutputs

        d, t = self.dims, self.torch
        head = HeadOutputs(
            t.rand(prompts, d.num_queries, 4, device=self.device),
            t.full((prompts, d.num_queries), 4.0, device=self.device),
            t.full((prompts, 1), 4.0, device=self.device),
            self.randn(prompts, d.feat_hw ** 2, d.fpn_dim),
            self.randn(prompts, d.num_queries, d.fpn_dim))
        return lambda: MaskSources(0.5).add(0, head)

    def blob_logits(self, fraction: float | None):
        """[1, m, m] logits of a round object covering `fraction` of the image (smooth, as
        real masks are), or of noise (every pixel may flip: the most runs)."""
        m = self.dims.mask_hw
        if fraction is None:
            return 4 * self.randn(1, m, m)
        yx = self.torch.stack(self.torch.meshgrid(
            *(2 * [self.torch.arange(m, dtype=self.torch.float32)]), indexing="ij"))
        radius2 = fraction * m * m / np.pi
        dist2 = ((yx - (m - 1) / 2) ** 2).sum(0)
        return (8 * (1 - dist2 / radius2)).clamp(-8, 8)[None].to(self.device)


def measure_parts(parts: Parts, args: argparse.Namespace) -> list[dict]:
    from dart_triton.model.masks import mask_rles

    d, rows = parts.dims, []

    def add(part: str, ms: float, prompts: int | str = "", queries: int | str = "",
            unit: str = "", per_unit: float | None = None) -> None:
        rows.append({"part": part, "prompts": prompts, "queries": queries, "ms": ms,
                     "unit": unit, "ms_per_unit": ms if per_unit is None else per_unit})
        print(f"  {rows[-1]}", flush=True)

    levels = "+".join(f"{d.level_hw(d.scale_factors[i])}²" for i in d.mask_levels)
    add(f"neck: finer FPN levels ({levels})", parts.time(parts.neck_fn(), args.iters,
                                                         args.warmup), unit="request")
    shapes = [(p, 1) for p in args.prompts] + [(1, j) for j in args.queries if j != 1]
    shapes.append((min(TYPICAL[0], d.max_classes), -(-TYPICAL[1] // TYPICAL[0])))
    # Round-robin over the shapes: a burst of load on a shared machine then hits every
    # shape alike instead of bending the slopes.
    fns = {shape: parts.head_fn(*shape) for shape in dict.fromkeys(shapes)}
    samples: dict[tuple[int, int], list[float]] = {shape: [] for shape in fns}
    for i in range(args.warmup + max(1, args.iters)):
        for shape, fn in fns.items():
            ms = parts.time(fn, 1, 0)
            if i >= args.warmup:
                samples[shape].append(ms)
    for (p, j), times in samples.items():
        add("mask head", float(np.median(times)), p, j, "call")
    for j in args.queries:
        add("mask head: per-query part (MLP + dot product)",
            parts.time(parts.query_fn(j), max(args.iters, 5), args.warmup), 1, j, "call")
    n = d.max_classes
    ms = parts.time(parts.handover_fn(n), max(args.iters, 5), args.warmup)
    add("hand-over: copy of kept rows", ms, n, d.num_queries, "prompt", ms / n)
    size = tuple(args.rle_size)
    k = 8  # masks per timed call: a per-mask time of a few ms is below scheduling noise
    for case, fraction in RLE_CASES:
        logits = parts.blob_logits(fraction).expand(k, -1, -1)
        ms = parts.time(lambda logits=logits: mask_rles(logits, size, 0.5),
                        max(args.iters, 5), args.warmup)
        add(f"RLE {size[1]}x{size[0]}, {k} masks: {case}", ms, unit="mask", per_unit=ms / k)
    return rows


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares ms per unit (NaN with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return float("nan")
    x, y = np.array(points, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def derive(rows: list[dict], max_prompts: int) -> tuple[list[dict], float]:
    """Cost per kept class / detection (slopes of the measured calls) and the typical
    request's mask cost (a sum of measured parts); returns (rows, typical ms)."""
    head = {(r["prompts"], r["queries"]): r["ms"] for r in rows if r["part"] == "mask head"}
    neck = next(r["ms"] for r in rows if r["part"].startswith("neck"))
    handover = next(r["ms_per_unit"] for r in rows if r["part"].startswith("hand-over"))
    rle = next(r["ms_per_unit"] for r in rows if r["part"].endswith(TYPICAL_RLE))
    per_class = slope([(p, ms) for (p, j), ms in head.items() if j == 1])
    per_query = slope([(r["queries"], r["ms"]) for r in rows
                       if r["part"].startswith("mask head: per-query")])
    kept, dets = TYPICAL
    p, j = min(kept, max_prompts), -(-dets // kept)
    typical = neck + head[(p, j)] + kept * handover + dets * rle
    out = [
        {"quantity": "per request (masks asked): finer FPN levels", "ms": neck,
         "how": "measured"},
        {"quantity": "per kept class: mask head (slope over P, J = 1) + hand-over",
         "ms": per_class + handover, "how": f"derived: {per_class:.1f} + {handover:.2f}"},
        {"quantity": "per kept detection: mask head's per-query part (slope over J) + RLE "
                     f"({TYPICAL_RLE})",
         "ms": per_query + rle, "how": f"derived: {per_query:.2f} + {rle:.2f}"},
        {"quantity": f"typical request: {kept} kept classes, {dets} detections",
         "ms": typical, "how": f"sum of measured parts: levels + head(P={p}, J={j}) + "
                               f"{kept} hand-overs + {dets} RLE"},
    ]
    return out, typical


# Requests -------------------------------------------------------------------------------


REQUEST_CASES = (("built without masks", False, False),
                 ("built with masks, not asked", True, False),
                 ("built with masks, masks asked", True, True))


def request_pipelines(args: argparse.Namespace, imgsz: int):
    """({built with masks: DartPipeline}, model summary): `load_parts(masks=True)` and,
    on the same weights, the pipeline `load_parts(masks=False)` builds (a backbone with
    the detection level alone, enc_dec without the mask outputs)."""
    from dart_triton.graphs.runtime import TorchModuleGraphs
    from dart_triton.model.backbone import RestructuredBackbone
    from dart_triton.model.detection_head import BatchedDetectionHead
    from dart_triton.model.parts import graph_dims, load_parts
    from dart_triton.pipeline.detectors import DartPipeline

    parts = load_parts(common.checkpoint_for(args), imgsz, args.max_prompts, masks=True)
    with_masks = DartPipeline.from_parts(parts)
    plain_dims = graph_dims(parts.model, args.max_prompts, masks=False)
    plain = DartPipeline(
        TorchModuleGraphs(RestructuredBackbone(parts.model.vision_encoder, imgsz).eval(),
                          BatchedDetectionHead(parts.model, plain_dims, "sdpa").eval()),
        with_masks.text_encoder, imgsz, args.max_prompts)
    return {False: plain, True: with_masks}, common.model_summary(parts.model)


def measure_requests(args: argparse.Namespace, imgsz: int) -> tuple[list[dict], str]:
    """`DartPipeline.detect` in process: built without masks vs with (asked or not), the
    three cases interleaved round by round (a burst of load hits them alike)."""
    pipes, summary = request_pipelines(args, imgsz)
    image = common.test_image()
    rows = []
    for n in args.classes:
        names = common.class_names(n)
        samples: dict[str, list[float]] = {case: [] for case, _, _ in REQUEST_CASES}
        last = {}
        for i in range(args.warmup + max(1, args.request_iters)):
            for case, built, asked in REQUEST_CASES:
                t0 = time.perf_counter()
                last[case] = pipes[built].detect(image, names, masks=asked,
                                                 score_threshold=args.score_threshold)
                if i >= args.warmup:
                    samples[case].append((time.perf_counter() - t0) * 1e3)
        base = None
        for case, _, _ in REQUEST_CASES:
            ms, dets = float(np.median(samples[case])), last[case]
            base = base or ms
            rows.append({"classes": n, "case": case, "imgsz": imgsz,
                         "detections": len(dets.scores),
                         "kept_classes": len(set(dets.class_ids.tolist())),
                         "masks": len(dets.masks or ()), "ms": ms,
                         "min_ms": min(samples[case]), "max_ms": max(samples[case]),
                         "added_ms": ms - base, "ratio": ms / base,
                         "how": f"measured at {imgsz} px, median of {len(samples[case])}"})
            print(f"  {rows[-1]}", flush=True)
    return rows, summary


def recorded_baselines(args: argparse.Namespace, device: str) -> tuple[dict[int, float], str]:
    """No-mask request ms by class count: --no-mask-ms, else RESULTS.md's section for the
    device (seq_fps of `dart`), else none."""
    if args.no_mask_ms:
        return ({int(k): float(v) for k, v in (s.split("=") for s in args.no_mask_ms)},
                "given by --no-mask-ms")
    key = BASELINE_SECTIONS.get(device)
    # the recorded figure lives in the checkout's RESULTS.md when --results points elsewhere
    sections = [common.read_section(path, key) for path in (args.results, common.DEFAULT_RESULTS)
                if key] + [None]
    section = next((s for s in sections if s), None)
    if not section:
        return {}, ""
    found: dict[int, float] = {}
    header: list[str] = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells if "seq_fps" in cells else []
        elif not line.startswith("|"):
            break  # the end of the first table (the per-model breakdown follows)
        elif len(cells) == len(header) and cells[0].isdigit():
            fps = cells[header.index("seq_fps")]
            if fps not in ("", "–"):
                found[int(cells[0])] = 1e3 / float(fps)
    return found, f"RESULTS.md `{key}` (`dart`, 1 in flight, 1000 / seq_fps)"


def derived_requests(classes: list[int], typical: float, baselines: dict[int, float],
                     source: str) -> list[dict]:
    rows = []
    for n in classes:
        base = baselines.get(n)
        with_masks = None if base is None else base + typical
        rows.append({"classes": n, "case": "without masks", "ms": base,
                     "how": f"measured: {source}" if base else "no recorded figure"})
        rows.append({"classes": n, "case": "with masks (typical)", "ms": with_masks,
                     "added_ms": typical, "ratio": None if base is None else with_masks / base,
                     "how": f"derived: + {typical:.1f} ms typical mask cost"})
    return rows


# Output ---------------------------------------------------------------------------------


def plot(parts_rows: list[dict], requests: list[dict], path: Path) -> Path:
    fig, axes = common.new_figure(ncols=3, width=4.5)
    head = [r for r in parts_rows if r["part"] == "mask head"]
    for ax, (fixed, other, label) in zip(axes, (("queries", "prompts", "kept classes P (J=1)"),
                                                ("prompts", "queries", "kept queries J (P=1)")),
                                         strict=False):
        pts = sorted((r[other], r["ms"]) for r in head if r[fixed] == 1)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("mask head ms (median)")
    ax = axes[2]
    shown = [r for r in requests if r.get("ms") is not None]
    measured = [r for r in shown if str(r.get("how", "")).startswith("measured at")]
    x = range(len(shown))
    ax.bar(x, [r["ms"] / 1e3 for r in shown],
           color=["C2" if r["case"].endswith("masks asked") or "typical" in r["case"] else
                  "C1" if "with masks" in r["case"] else "C0" for r in shown])
    if measured:  # the spread of the timed rounds
        ax.errorbar(x, [r["ms"] / 1e3 for r in shown],
                    yerr=[[(r["ms"] - r["min_ms"]) / 1e3 for r in shown],
                          [(r["max_ms"] - r["ms"]) / 1e3 for r in shown]],
                    fmt="none", ecolor="k", capsize=3, lw=1)
        for i, r in enumerate(shown):
            ax.annotate(f"{r['kept_classes']} cls\n{r['detections']} det\n{r['masks']} masks",
                        (i, 0), ha="center", va="bottom", fontsize=6, color="w",
                        xytext=(0, 3), textcoords="offset points")
        ax.set_title(f"whole request, measured at {measured[0]['imgsz']} px "
                     "(median, min-max)", fontsize=9)
    elif shown:
        ax.set_title("whole request (derived)", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no recorded no-mask figure", ha="center", transform=ax.transAxes)
    ax.set_xticks(list(x), [f"N={r['classes']}\n{r['case'].replace('built ', '')}"
                            for r in shown])
    ax.set_ylabel("request s")
    ax.tick_params(axis="x", labelsize=6, rotation=60)
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(4, 16), iters=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                   help="mask path precision (default: fp16 on cuda, as served; fp32 on cpu)")
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 2, 4],
                   help="kept classes P per mask head call, at J = 1 (default: %(default)s)")
    p.add_argument("--queries", type=int, nargs="+", default=[1, 10, 50],
                   help="kept detections J per prompt, at P = 1 (default: %(default)s)")
    p.add_argument("--max-prompts", type=int, default=4,
                   help="prompts per mask head call and per enc_dec pass (default 4)")
    p.add_argument("--rle-size", type=int, nargs=2, default=[1080, 1920], metavar=("H", "W"),
                   help="image size the RLE is encoded at (default: 1080 1920)")
    p.add_argument("--score-threshold", type=float, default=0.1,
                   help="whole requests: low, so that detections (and masks) are kept with "
                        "random weights (default: %(default)s)")
    p.add_argument("--request-imgsz", type=int, default=None,
                   help="whole requests' input size (default: full "
                        f"{common.DEFAULT_IMGSZ['full']}, as the other CPU studies; tiny: "
                        "--imgsz)")
    p.add_argument("--request-iters", type=int, default=3,
                   help="timed rounds of whole requests, after --warmup (median reported; "
                        "default %(default)s)")
    p.add_argument("--no-mask-ms", nargs="+", metavar="N=MS", default=None,
                   help="no-mask request latencies to derive from (default: RESULTS.md's "
                        "recorded figure for the device, if any)")
    args = p.parse_args(argv)
    info = common.machine_info()  # the load at the start, before this run adds its own
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    if args.imgsz is None and args.config == "full":
        args.imgsz = FULL_IMGSZ
    imgsz = common.resolve_imgsz(args)
    model, summary = mask_model(args, imgsz)
    parts = Parts(model, imgsz, args.device, dtype, args.max_prompts)
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    print(f"mask path at {imgsz} px on {args.device} {dtype}{threads}", flush=True)
    part_rows = measure_parts(parts, args)
    derived, typical = derive(part_rows, parts.dims.max_classes)
    del model, parts
    gc.collect()

    if args.device == "cpu":  # whole requests in process (DartPipeline runs on the CPU)
        request_imgsz = args.request_imgsz or (
            common.DEFAULT_IMGSZ["full"] if args.config == "full" else imgsz)
        args.imgsz = request_imgsz
        request_imgsz = common.resolve_imgsz(args)
        print(f"whole requests at {request_imgsz} px", flush=True)
        requests, request_model = measure_requests(args, request_imgsz)
        summary += f"; requests: {args.config} SAM3 ({request_model}) at {request_imgsz} px"
        shape = common.test_image().shape
        baseline_note = (
            f"Requests: **measured at {request_imgsz} px**, `DartPipeline.detect(image, "
            "classes)` vs `detect(image, classes, masks=True)` in process (PyTorch graphs, "
            f"CPU fp32{threads}) on a {shape[1]}x{shape[0]} photograph (skimage "
            "`astronaut`), the first N COCO names, "
            f"{args.max_prompts} prompts per enc_dec pass, score threshold "
            f"{args.score_threshold:g} (low enough for random weights to keep detections: "
            "the kept classes and detections are in the table; masks are encoded at the "
            f"image's size), median of {args.request_iters} rounds after {args.warmup} "
            "warm-up, the three cases interleaved in each round (min-max in the CSV and "
            "the plot). *Built with masks*: `load_parts(..., masks=True)` and "
            "`DartPipeline.from_parts`, whose backbone computes the finer FPN levels on "
            "every request; *built without masks*: the same weights as "
            "`load_parts(masks=False)` builds them (detection level only). added_ms and "
            "ratio: to the pipeline built without masks. "
            + (f"Not {imgsz} px: the ViT-H at {imgsz} px takes minutes per frame on this "
               "CPU; the 1008 px mask path is the table above."
               if request_imgsz != imgsz else ""))
    else:
        baselines, source = recorded_baselines(args, args.device)
        requests = derived_requests(args.classes, typical, baselines, source)
        baseline_note = (
            "Requests: **derived**, not measured: a recorded no-mask request latency "
            f"at {imgsz} px plus the typical mask cost measured here "
            f"({TYPICAL[0]} kept classes, {TYPICAL[1]} detections, as in an average COCO "
            "image; the mask cost does not grow with the classes asked, only with those "
            "kept). " + ("" if baselines else
                         f"No no-mask figure at {imgsz} px is recorded for {args.device} "
                         "(the CPU runs are at 322 px), so only the mask cost is given."))

    rows = ([{"table": "parts", **r} for r in part_rows]
            + [{"table": "derived", **r} for r in derived]
            + [{"table": "requests", **r} for r in requests])
    # A GPU run gets its own CSV, figure and section beside the CPU one (gpu_check's merge).
    stem = STUDY if args.device == "cpu" else f"{STUDY}_{args.device}"
    common.write_csv(rows, args.out / f"{stem}.csv")
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    notes = (f"Mask path timed on {args.device} in {dtype}{threads}, in process, median of "
             f"{args.iters} after {args.warmup} warm-up: the backbone's finer FPN levels "
             "(from a random ViT output), `MaskHead` as served (`ServedModule`), "
             "`MaskSources.add` (in process; a served request also moves enc_dec's extra "
             "outputs between models, not timed here) and `mask_rles` at "
             f"{args.rle_size[1]}x{args.rle_size[0]} (threshold 0.5) on synthetic mask "
             "logits. P: kept classes in one mask head call, J: kept queries per class. "
             "Measured rows are medians; per-class and per-detection costs are least-squares "
             "slopes of them (derived).")
    head = common.section_header("Masks on demand: cost per kept class, per detection, "
                                 "per request", command, summary, notes, info)
    tables = [
        common.markdown_table(part_rows, ["part", "prompts", "queries", "ms", "unit",
                                          "ms_per_unit"], digits=2),
        common.markdown_table(derived, ["quantity", "ms", "how"], digits=1),
        baseline_note,
        common.markdown_table(requests, ["classes", "case", "kept_classes", "detections",
                                         "masks", "ms", "added_ms", "ratio", "how"],
                              digits=2),
    ]
    body = head + "\n" + "\n\n".join(tables) + "\n"
    try:
        plot(part_rows, requests, args.out / f"{stem}.png")
        body += f"\n{common.image_link(args, stem, 'mask costs')}\n"
    except ImportError:  # matplotlib is the optional `bench` extra
        pass
    common.update_section(args.results, stem, body)
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
