"""Optimisation hierarchy (DART Table 1): cumulative speed-up over naive SAM3, per frame.

  L0  naive: `Sam3Model` once per class, masks included
  L1  shared backbone: vision encoder once, Sam3Model's enc-dec + mask head per class
  L2  + batched detection-only decoding (`BatchedDetectionHead`, chunks of max_classes;
      text features from the cache)
  L3  + restructured backbone graph in an inference engine: ONNX Runtime (CPU or CUDA
      EP); on a GPU without TensorRT / ORT-CUDA: the restructured backbone compiled with
      torch.compile in FP16, the nearest stand-in here
  L4  + enc-dec graph and inter-frame pipelining: the `dart` model over Triton gRPC with
      2 frames in flight (ms per frame = wall / frames). CPU only (no Triton on the GPU box)

Ceiling: L0 divided by the backbone alone (what L-anything would give if decoding were free).
L0/L1 at large N are measured on ``--naive-max`` classes and extrapolated linearly
(per-class cost x N, plus one backbone for L1); such rows say so.

    python -m dart_triton.benchmarks.hierarchy --classes 3 80
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dart_triton.benchmarks import common, serving

STUDY = "hierarchy"
LEVELS = {
    0: "naive (Sam3Model per class, masks)",
    1: "shared backbone",
    2: "+ batched det-only decoding",
    3: "+ restructured backbone engine",
    4: "+ enc-dec graph + pipelining (Triton, 2 in flight)",
}
COLUMNS = ["imgsz", "dtype", "n", "level", "optimisation", "backbone", "enc_dec", "ms",
           "speedup", "how"]


class Bench:
    """One resolution's loaded parts on one device, and a level's per-frame callable."""

    def __init__(self, args, imgsz: int, device: str):
        from dart_triton.model.parts import load_parts
        from dart_triton.model.preprocess import preprocess
        from dart_triton.model.text_encoder import TextEncoder

        self.args, self.imgsz, self.device = args, imgsz, device
        self.checkpoint = common.checkpoint_for(args)
        self.parts = load_parts(self.checkpoint, imgsz, args.max_classes)
        self.model_text = common.model_summary(self.parts.model)
        self.parts.model.to(device)
        self.parts.backbone.to(device)  # its constant buffers are built on the CPU
        self.parts.head.to(device)
        self.text = TextEncoder.from_sam3(self.parts.model, self.parts.tokenizer, device=device)
        self.pixels_np, _ = preprocess(common.test_image(), imgsz)
        self.dtype = torch.float32
        self.ort = None

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        for m in (self.parts.model, self.parts.backbone, self.parts.head):
            m.to(dtype)

    @property
    def pixels(self) -> torch.Tensor:
        return torch.from_numpy(self.pixels_np).to(self.device, self.dtype)

    def sync(self) -> Callable[[], None] | None:
        return torch.cuda.synchronize if self.device.startswith("cuda") else None

    def tokens(self, names: list[str]):
        from dart_triton.model.checkpoint import TEXT_MAX_LENGTH

        tok = self.parts.tokenizer(names, padding="max_length", max_length=TEXT_MAX_LENGTH,
                                   truncation=True, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def detect_level(self) -> int:
        return self.parts.dims.detection_level  # the level Sam3Model feeds its enc-dec

    # Levels: each returns a zero-argument callable running one frame --------------------
    def level0(self, names: list[str]):
        ids, mask = self.tokens(names)
        model, px = self.parts.model, self.pixels

        def run():
            for i in range(len(names)):
                model(pixel_values=px, input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
        return run

    def reference_backbone(self):
        encoder, px = self.parts.model.vision_encoder, self.pixels
        return lambda: encoder(px)

    def level1(self, names: list[str]):
        ids, mask = self.tokens(names)
        model, px = self.parts.model, self.pixels

        def run():
            vision = model.vision_encoder(px)
            for i in range(len(names)):
                model(vision_embeds=vision, input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
        return run

    def _decode(self, fpn: torch.Tensor, names: list[str]) -> None:
        from dart_triton.contract.passes import plan_passes

        feats, mask = self.text.encode(names)  # warm after the first call: cache lookups
        feats = torch.from_numpy(feats).to(self.device, self.dtype)
        mask = torch.from_numpy(mask).to(self.device)
        for p in plan_passes(len(names), self.args.max_classes):
            self.parts.head(fpn, feats[p.start:p.stop], mask[p.start:p.stop])

    def level2(self, names: list[str]):
        encoder, px, level = self.parts.model.vision_encoder, self.pixels, self.detect_level()
        return lambda: self._decode(encoder(px).fpn_hidden_states[level], names)

    def engine_backbone(self) -> tuple[Callable[[], torch.Tensor], str]:
        """The restructured backbone in the best engine here, and its description."""
        if self.ort is None and self.device == "cpu":
            from dart_triton.graphs.runtime import OrtGraph

            onnx = serving.graphs_dir(self.checkpoint, self.imgsz, self.args.max_classes)
            self.ort = OrtGraph(onnx / "backbone.onnx")
        if self.device == "cpu":
            from dart_triton.contract import specs

            graph, px = self.ort, self.pixels_np
            return (lambda: torch.from_numpy(graph(**{specs.PIXEL_VALUES: px})[0]),
                    "ONNX Runtime CPU")
        compiled = torch.compile(self.parts.backbone, dynamic=False)
        px = self.pixels
        with torch.no_grad():
            compiled(px)  # compile outside the timed region
        return (lambda: compiled(px)[0]), f"torch.compile {_dtype_name(self.dtype)}"

    def level3(self, names: list[str], backbone: Callable[[], torch.Tensor]):
        return lambda: self._decode(backbone().to(self.device, self.dtype), names)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}[dtype]


def served_ms_per_frame(args, imgsz: int, n: int, url: str) -> float:
    """ms per frame of `dart` over gRPC with 2 frames in flight (wall / frames)."""
    from dart_triton.client import DartClient

    names = common.class_names(n)
    image = common.test_image()
    frames = max(2, 2 * args.iters)
    with DartClient(url, "grpc", "dart", timeout=3600) as client:
        for _ in range(args.warmup):
            client.detect(image, names)
        t0 = time.perf_counter()
        for _ in client.detect_stream([image] * frames, names, in_flight=2):
            pass
        return (time.perf_counter() - t0) * 1e3 / frames


def measure(bench: Bench, n: int, rows: list[dict], flush: Callable[[], None],
            base: dict, l3_backbone) -> None:
    args = bench.args
    names = common.class_names(n)
    k = min(n, args.naive_max) if args.naive_max else n

    def t(fn) -> float:
        try:
            with torch.no_grad():
                return common.time_call(fn, args.iters, args.warmup, bench.sync()).median_ms
        except Exception as exc:  # e.g. a reference op without an FP16 kernel: keep the row
            print(f"  failed: {type(exc).__name__}: {exc}", flush=True)
            return float("nan")

    bb_ref = t(bench.reference_backbone())
    per_class = {}
    results: dict[int, tuple[float, str, str, str]] = {}
    for level in (0, 1):
        ms = t(getattr(bench, f"level{level}")(names[:k]))
        how = "measured"
        if k < n:
            fixed = bb_ref if level == 1 else 0.0
            per_class[level] = (ms - fixed) / k
            ms = fixed + per_class[level] * n
            how = f"extrapolated: {k} classes measured, x{n / k:.1f} per-class part"
        results[level] = (ms, "N x" if level == 0 else "1 x", f"{n} x", how)
    results[2] = (t(bench.level2(names)), "1 x", f"{-(-n // args.max_classes)} x batched",
                  "measured")
    bb_engine = float("nan")
    if l3_backbone is not None:
        fn, engine = l3_backbone
        bb_engine = t(fn)
        results[3] = (t(bench.level3(names, fn)), engine, "PyTorch", "measured")
    if args.serve_url and bench.device == "cpu":
        ms = served_ms_per_frame(args, bench.imgsz, n, args.serve_url)
        results[4] = (ms, "ORT in Triton", "ORT in Triton", "measured, 2 frames in flight")
    l0 = results[0][0]
    for level, (ms, bb, ed, how) in results.items():
        rows.append({**base, "n": n, "level": level, "optimisation": LEVELS[level],
                     "backbone": bb, "enc_dec": ed, "ms": ms, "speedup": l0 / ms, "how": how})
    best_bb = min(bb_ref, bb_engine) if bb_engine == bb_engine else bb_ref
    rows.append({**base, "n": n, "level": "ceiling", "optimisation": "decoding free",
                 "backbone": "best", "enc_dec": "0", "ms": best_bb, "speedup": l0 / best_bb,
                 "how": f"backbone alone ({'engine' if best_bb == bb_engine else 'PyTorch'})"})
    for r in rows[-len(results) - 1:]:
        print(f"  N={n:3d} L{r['level']}: {r['ms']:9.1f} ms  x{r['speedup']:.2f}  {r['how']}",
              flush=True)
    flush()


def plot(rows: list[dict], path: Path) -> Path:
    groups = sorted({(r["imgsz"], r["dtype"], r["n"]) for r in rows},
                    key=lambda g: (-g[0], g[1], g[2]))
    ncols = min(4, len(groups))
    fig, axes = common.new_figure(ncols=ncols, width=3.6, height=3.2,
                                  nrows=-(-len(groups) // ncols))
    for ax in axes[len(groups):]:
        ax.axis("off")
    for ax, (imgsz, dtype, n) in zip(axes, groups, strict=False):
        sel = [r for r in rows if (r["imgsz"], r["dtype"], r["n"]) == (imgsz, dtype, n)]
        labels = [f"L{r['level']}" if r["level"] != "ceiling" else "ceil" for r in sel]
        bars = ax.bar(labels, [r["speedup"] for r in sel],
                      color=["C0" if r["level"] != "ceiling" else "C7" for r in sel])
        ax.bar_label(bars, fmt="%.1fx", fontsize=8)
        ax.set_title(f"N={n}, {imgsz}px, {dtype}", fontsize=9)
        ax.set_yscale("log")  # the ceiling is orders of magnitude above at large N
        ax.set_ylabel("speed-up vs L0 (log)")
    return common.save_figure(fig, path)


def report(rows: list[dict], args, command: str, model: str, info) -> str:
    notes = (f"Per-frame latency (median of {args.iters} after {args.warmup} warm-up) for one "
             f"image and N class prompts, chunks of {args.max_classes} prompts per enc-dec "
             "pass. Speed-up is L0 / level. L2+ read text features from the warm cache "
             "(L0/L1 run SAM3's text encoder per prompt, as shipped). "
             "Targets (DART): L2 ≥ 2.7x at N=3, ≥ 15x at N=80.")
    table = common.markdown_table(rows, COLUMNS, digits=1)
    title = "Optimisation hierarchy (Table 1)" + (f": {args.stem}" if args.stem != STUDY else "")
    head = common.section_header(title, command, model, notes, info)
    return f"{head}\n{table}\n\n{common.image_link(args, args.stem, 'hierarchy')}\n"



def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(3, 80), iters=3)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="several resolutions in one run (default: --imgsz)")
    p.add_argument("--max-classes", type=int, default=16, help="prompts per enc-dec pass")
    p.add_argument("--naive-max", type=int, default=None,
                   help="measure L0/L1 on at most this many classes, extrapolate beyond "
                        "(default: 3 for --config full, none for tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "fp16", "bf16"), default=["fp32"],
                   help="precisions, in this order, for PyTorch levels (GPU: fp32 fp16)")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager",
                   help="attention of the PyTorch reference modules (ViT in L0-L2, DETR "
                        "enc-dec in all levels): eager = explicit softmax, as load_sam3 "
                        "loads it; sdpa = transformers' default (fused kernels)")
    p.add_argument("--no-engine", action="store_true", help="skip L3")
    p.add_argument("--serve", action="store_true",
                   help="L4: start a tritonserver on a built repository (CPU)")
    p.add_argument("--url", default=None, help="L4 against this running server (gRPC host:port)")
    p.add_argument("--stem", default=STUDY, help="CSV/PNG file stem and RESULTS.md section key")
    args = p.parse_args(argv)
    if args.naive_max is None and args.config == "full":
        args.naive_max = 3
    sizes = args.sizes or [common.resolve_imgsz(args)]
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    info = common.machine_info()
    rows: list[dict] = []
    model_text = ""

    def flush() -> None:
        common.write_csv(rows, args.out / f"{args.stem}.csv")
        plot(rows, args.out / f"{args.stem}.png")
        common.update_section(args.results, args.stem, report(rows, args, command, model_text,
                                                             info))

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for imgsz in sizes:
        bench = Bench(args, imgsz, args.device)
        bench.parts.model.set_attn_implementation(args.attn)
        model_text = (f"{args.config}: {bench.model_text}; device {args.device}; "
                      f"{args.attn} attention in the PyTorch modules")
        for dname in args.dtypes:
            bench.set_dtype(dtypes[dname])
            # On a GPU the engine stand-in is an FP16/BF16 compile: skip it for FP32.
            skip = args.no_engine or (args.device != "cpu" and dname == "fp32")
            l3 = None if skip else _engine(bench)
            with _server(args, imgsz, dname) as url:
                args.serve_url = url
                for n in args.classes:
                    print(f"{STUDY}: {imgsz}px {dname} N={n}", flush=True)
                    measure(bench, n, rows, flush, {"imgsz": imgsz, "dtype": dname}, l3)
        del bench
        gc.collect()
    print(common.markdown_table(rows, COLUMNS, digits=1))
    return 0


def _engine(bench: Bench):
    try:
        return bench.engine_backbone()
    except Exception as exc:  # no engine here: the table then stops at L2
        print(f"  L3 engine unavailable: {type(exc).__name__}: {exc}", flush=True)
        return None


def _server(args, imgsz: int, dtype: str):
    import contextlib

    if args.url:
        return contextlib.nullcontext(args.url)
    if not args.serve or args.device != "cpu" or dtype != "fp32":
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def start():
        args.http_url, args.ort_threads = None, 0
        with serving.served(args, imgsz) as s:
            yield s.grpc_url
    return start()


if __name__ == "__main__":
    raise SystemExit(main())
