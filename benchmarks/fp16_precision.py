"""FP16 precision of the SAM3 vision backbone (our version of DART's Table 4).

For each resolution: cosine similarity of the detector's FPN level computed in FP16
against the FP32 reference (`transformers`' `Sam3VisionModel`, eager attention, TF32
off), and latency, for

* the restructured backbone (`RestructuredBackbone`: real RoPE, explicit softmax), and
* the reference fused-attention model (`Sam3VisionModel`, ``attn_implementation="sdpa"``),

in each runtime that exists: PyTorch eager (``.half()`` and autocast), ``torch.compile``
and ONNX Runtime's CUDA EP on an FP16 ONNX export. A runtime that cannot run is kept
as a row with the reason. Weights are random (seeded): the paper's 0.058 comes from
trained weights' activation ranges and need not reproduce here.

    python -m dart_triton.benchmarks.fp16_precision --imgsz 1008 644
"""

from __future__ import annotations

import copy
import gc
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dart_triton.benchmarks import common
from dart_triton.model.backbone import detection_level

STUDY = "fp16_precision"
RUNTIMES = ("eager", "autocast", "compile", "ort")
COLUMNS = ["imgsz", "model", "runtime", "precision", "latency_ms", "cosine", "max_abs_err",
           "status", "note"]


def vision_model(config: str, imgsz: int, device: str, seed: int = 0):
    """A random FP32 `Sam3VisionModel` configured for `imgsz` (eager attention)."""
    from transformers import Sam3VisionModel

    cfg = common.full_config() if config == "full" else _tiny_config()
    vcfg = copy.deepcopy(cfg.vision_config)
    vcfg.backbone_config.image_size = imgsz
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: 440M params init in seconds
        model = Sam3VisionModel._from_config(vcfg, attn_implementation="eager")
    return model.eval()


def _tiny_config():
    from dart_triton.model.checkpoint import tiny_config

    return tiny_config("a")


class ReferenceLevel(torch.nn.Module):
    """Sam3VisionModel -> only the FPN level the detector reads (same output as ours)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.level = model, detection_level(model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).fpn_hidden_states[self.level]


class RestructuredLevel(torch.nn.Module):
    def __init__(self, model, imgsz: int):
        super().__init__()
        from dart_triton.model.backbone import RestructuredBackbone

        self.backbone = RestructuredBackbone(model, imgsz)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values)[0]


def build(kind: str, fp32_model, imgsz: int, half: bool) -> torch.nn.Module:
    """'restructured' or 'sdpa' module over a copy of the FP32 weights (FP16 if `half`)."""
    device = next(fp32_model.parameters()).device
    if kind == "sdpa":
        model = copy.deepcopy(fp32_model)
        model.set_attn_implementation("sdpa")
        module = ReferenceLevel(model)
    else:
        # RestructuredBackbone builds its RoPE tables with CPU tensors (it cannot be built
        # from a CUDA model): build on a CPU copy of the FP32 weights, then cast and move.
        module = RestructuredLevel(copy.deepcopy(fp32_model).cpu(), imgsz)
    return (module.half() if half else module).to(device).eval()


def pixels_for(imgsz: int, device: str) -> torch.Tensor:
    from dart_triton.model.preprocess import preprocess

    pixels, _ = preprocess(common.test_image(), imgsz)
    return torch.from_numpy(pixels).to(device)


def compare(out: torch.Tensor, ref: np.ndarray) -> tuple[float, float]:
    from dart_triton.export.onnx_export import cosine

    got = out.float().cpu().numpy()
    if not np.isfinite(got).all():
        return float("nan"), float("inf")
    return cosine(got, ref), float(np.abs(got - ref).max())


def _sync(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.startswith("cuda") else None


def ort_fp16_runner(module: torch.nn.Module, pixels: torch.Tensor, workdir: Path):
    """Export the FP16 module to ONNX and open it on the CUDA EP; raises with the reason."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                           f"(providers: {', '.join(providers)})")
    path = workdir / "backbone_fp16.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (pixels,), str(path), input_names=["pixel_values"],
                          output_names=["fpn"], opset_version=18, dynamo=False,
                          external_data=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider"])
    feed = {"pixel_values": pixels.cpu().numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def measure(kind: str, runtime: str, fp32_model, imgsz: int, pixels: torch.Tensor,
            ref: np.ndarray, args, workdir: Path) -> dict:
    device = str(pixels.device)
    row = {"imgsz": imgsz, "model": "restructured (explicit attn)" if kind == "restructured"
           else "reference (fused SDPA)", "runtime": runtime}
    half = runtime != "fp32-eager"
    row["precision"] = "FP32" if not half else ("FP16 autocast" if runtime == "autocast"
                                                 else "FP16")
    try:
        module = build(kind, fp32_model, imgsz, half=half and runtime != "autocast")
        x = pixels.half() if half and runtime != "autocast" else pixels
        note = ""
        if runtime == "compile":
            torch._dynamo.reset()  # a fresh graph per model/size: no dynamic-shape recompiles
            fn = torch.compile(module, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(x)
            note = f"compile {time.perf_counter() - t0:.0f} s"
            call = lambda: fn(x)  # noqa: E731
        elif runtime == "ort":
            call = ort_fp16_runner(module, x, workdir)
        elif runtime == "autocast":
            def call():
                with torch.autocast(pixels.device.type, dtype=torch.float16):
                    return module(x)
        else:
            call = lambda: module(x)  # noqa: E731
        with torch.no_grad():
            out = call()
            timing = common.time_call(call, args.iters, args.warmup, _sync(device))
        row["cosine"], row["max_abs_err"] = compare(out, ref)
        row.update(latency_ms=timing.median_ms, status="ok", note=note)

    except Exception as exc:  # a runtime that cannot run stays in the table, with why
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        row.update(status="skipped", note=reason[:200])
        if args.verbose:
            traceback.print_exc()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"  {row}", flush=True)
    return row


def run_resolution(imgsz: int, args, device: str, rows: list[dict], flush) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # a true FP32 reference
    torch.backends.cudnn.allow_tf32 = False
    fp32 = vision_model(args.config, imgsz, device)
    pixels = pixels_for(imgsz, device)
    with torch.no_grad():
        ref_module = ReferenceLevel(fp32)
        ref = ref_module(pixels).float().cpu().numpy()
        timing = common.time_call(lambda: ref_module(pixels), args.iters, args.warmup,
                                  _sync(device))
    rows.append({"imgsz": imgsz, "model": "reference (eager attn)", "runtime": "eager",
                 "precision": "FP32", "latency_ms": timing.median_ms, "cosine": 1.0,
                 "max_abs_err": 0.0, "status": "ok", "note": "the FP32 reference"})
    flush()
    with tempfile.TemporaryDirectory(prefix="dart-fp16-") as tmp:
        for kind in ("restructured", "sdpa"):
            for runtime in ["fp32-eager", *args.runtimes]:
                rows.append(measure(kind, runtime, fp32, imgsz, pixels, ref, args, Path(tmp)))
                flush()
    del fp32
    gc.collect()


def plot(rows: list[dict], path: Path) -> Path:
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, (ax_cos, ax_lat) = common.new_figure(ncols=2, width=6.5,
                                              height=max(3.0, 0.28 * len(ok) + 1))
    short = {"restructured (explicit attn)": "restructured", "reference (fused SDPA)": "SDPA",
             "reference (eager attn)": "reference"}
    labels = [f"{r['imgsz']} {short.get(r['model'], r['model'])} {r['runtime']} "
              f"{r['precision']}" for r in ok]
    y = np.arange(len(ok))
    ax_cos.barh(y, [1 - min(r["cosine"], 1.0) if r["cosine"] == r["cosine"] else 1 for r in ok])
    ax_cos.set_xscale("symlog", linthresh=1e-6)
    ax_cos.set_yticks(y, labels, fontsize=7)
    ax_cos.set_xlabel("1 - cosine vs FP32 reference (lower is better)")
    ax_lat.barh(y, [r["latency_ms"] for r in ok])
    ax_lat.set_yticks(y, labels, fontsize=7)
    ax_lat.set_xlabel("latency (ms, median)")
    return common.save_figure(fig, path)


def report(rows: list[dict], args, command: str, model: str) -> str:
    notes = ("Cosine similarity of the FPN level the detector reads (1x, imgsz/14), FP16 vs "
             "FP32 reference; random weights (seeded), one real photograph as input. "
             "`skipped` rows say why that runtime could not run here.")
    cos_rows = [{**r, "cosine": f"{r['cosine']:.6f}" if isinstance(r.get("cosine"), float)
                 else r.get("cosine"),
                 "max_abs_err": f"{r['max_abs_err']:.3g}" if isinstance(r.get("max_abs_err"),
                                                                       float) else None}
                for r in rows]
    table = common.markdown_table(cos_rows, COLUMNS, digits=1)
    head = common.section_header("FP16 precision of the vision backbone (Table 4)", command,
                                 model, notes)
    return f"{head}\n{table}\n\n{common.image_link(args, STUDY, 'fp16 precision')}\n"



def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           iters=10)
    p.set_defaults(warmup=3)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="resolutions (default: 1008 644 on a GPU, --imgsz or tiny's on CPU)")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=None,
                   help="default: all on a GPU, eager and autocast on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of skipped rows")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    sizes = args.sizes or ([1008, 644] if cuda and args.config == "full"
                           else [common.resolve_imgsz(args)])
    args.runtimes = args.runtimes or (list(RUNTIMES) if cuda else ["eager", "autocast"])
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    cfg = common.full_config() if args.config == "full" else _tiny_config()
    vit = cfg.vision_config.backbone_config
    model = (f"{args.config} Sam3VisionModel (ViT {vit.num_hidden_layers}x{vit.hidden_size}, "
             f"random weights), device {device}")
    rows: list[dict] = []

    def flush() -> None:  # after every row: a run cut short still leaves its results
        common.write_csv(rows, args.out / f"{STUDY}.csv")
        plot(rows, args.out / f"{STUDY}.png")
        common.update_section(args.results, STUDY, report(rows, args, command, model))

    for imgsz in sizes:
        print(f"{STUDY}: {imgsz}px on {device}", flush=True)
        run_resolution(imgsz, args, device, rows, flush)
    print(common.markdown_table(rows, COLUMNS, digits=4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
