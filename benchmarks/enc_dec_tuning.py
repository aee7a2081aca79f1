"""Encoder-decoder tuning: what makes the batched detection head cheaper per prompt.

The enc-dec's cost grows with N (every prompt conditions the 6 encoder layers' image
tokens), so it bounds large class counts. Variants measured on one FPN feature map
and N real prompts:

* PyTorch, attention as loaded (eager: explicit softmax) vs SDPA, intra-op threads;
* ONNX Runtime on the exported ``enc_dec.onnx`` (CPU only here): threads x graph
  optimisation level (basic / extended / all);
* on a GPU: PyTorch eager vs SDPA attention in FP32 and FP16.

    python -m dart_triton.benchmarks.enc_dec_tuning --classes 1 4 16
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dart_triton.benchmarks import common, serving

STUDY = "enc_dec_tuning"
COLUMNS = ["imgsz", "device", "runtime", "attention", "dtype", "threads", "opt_level", "n",
           "ms", "ms_per_prompt"]
ORT_LEVELS = ("basic", "extended", "all")


def torch_rows(parts, feats, text, mask, args, device: str) -> list[dict]:
    rows = []
    dtypes = ["fp32", "fp16"] if device.startswith("cuda") else ["fp32"]
    threads_list = [0] if device.startswith("cuda") else args.threads
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    base_threads = torch.get_num_threads()
    for dname in dtypes:
        dtype = torch.float16 if dname == "fp16" else torch.float32
        parts.head.to(device, dtype)
        f = torch.from_numpy(feats).to(device, dtype)
        t, m = torch.from_numpy(text).to(device, dtype), torch.from_numpy(mask).to(device)
        for attn in ("eager", "sdpa"):
            parts.model.set_attn_implementation(attn)
            for threads in threads_list:
                if threads:
                    torch.set_num_threads(threads)
                for n in args.classes:
                    with torch.no_grad():
                        fn = lambda n=n, f=f, t=t, m=m: parts.head(f, t[:n], m[:n])  # noqa: E731
                        timing = common.time_call(fn, args.iters, args.warmup, sync)
                    rows.append(_row(args, device, "PyTorch", attn, dname, threads or "-",
                                     "-", n, timing.median_ms))
    torch.set_num_threads(base_threads)
    parts.model.set_attn_implementation("eager")
    parts.head.to("cpu", torch.float32)
    return rows


def ort_rows(onnx_path: Path, feats, text, mask, args) -> list[dict]:
    import onnxruntime as ort

    from dart_triton.contract import specs

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    rows = []
    for level in args.ort_levels:
        for threads in args.threads:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = levels[level]
            if threads:
                opts.intra_op_num_threads = threads
            session = ort.InferenceSession(str(onnx_path), opts,
                                           providers=["CPUExecutionProvider"])
            for n in args.classes:
                feed = {specs.FPN_FEATURES: feats, specs.TEXT_FEATURES: text[:n],
                        specs.TEXT_MASK: mask[:n]}
                timing = common.time_call(lambda feed=feed, s=session: s.run(None, feed),
                                          args.iters, args.warmup)
                rows.append(_row(args, "cpu", "ONNX Runtime", "explicit (graph)", "fp32",
                                 threads or "default", level, n, timing.median_ms))
    return rows


def _row(args, device, runtime, attn, dtype, threads, level, n, ms) -> dict:
    row = {"imgsz": args.imgsz_used, "device": device, "runtime": runtime, "attention": attn,
           "dtype": dtype, "threads": threads, "opt_level": level, "n": n, "ms": ms,
           "ms_per_prompt": ms / n}
    print(f"  {row}", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> Path:
    sizes = sorted({r["imgsz"] for r in rows}, reverse=True)
    fig, axes = common.new_figure(ncols=len(sizes), width=6)
    for ax, imgsz in zip(axes, sizes, strict=True):
        at = [r for r in rows if r["imgsz"] == imgsz]
        variants = sorted({_variant(r) for r in at})
        for v in variants:
            sel = sorted((r for r in at if _variant(r) == v), key=lambda r: r["n"])
            label = f"{v[0]} {v[1]} {v[2]} t={v[3]}" + (f" opt={v[4]}" if v[4] != "-" else "")
            ax.plot([r["n"] for r in sel], [r["ms_per_prompt"] for r in sel], marker="o",
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{imgsz}px, {at[0]['device']}", fontsize=9)
        ax.set_xlabel("prompts per pass (N)")
        ax.set_ylabel("enc-dec ms per prompt")
        ax.legend(fontsize=6)
    return common.save_figure(fig, path)


def _variant(r: dict) -> tuple:
    return r["runtime"], r["attention"], r["dtype"], str(r["threads"]), r["opt_level"]


def report(rows, args, command, model) -> str:
    notes = ("Enc-dec latency for one FPN map and N prompts (median of "
             f"{args.iters}); ms per prompt = ms / N. Threads '-' = the process default.")
    head = common.section_header("Encoder-decoder tuning", command, model, notes)
    best = min(rows, key=lambda r: r["ms_per_prompt"]) if rows else None
    summary = ""
    if best:
        summary = (f"\nCheapest per prompt here: {best['runtime']} ({best['attention']}, "
                   f"{best['dtype']}, threads {best['threads']}, opt {best['opt_level']}) at "
                   f"N={best['n']}: {best['ms_per_prompt']:.1f} ms/prompt.\n")
    table = common.markdown_table(rows, COLUMNS, digits=1)
    return f"{head}\n{table}\n{summary}\n{common.image_link(args, args.stem, 'enc-dec tuning')}\n"


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(1, 4, 16), iters=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="intra-op thread counts to try on CPU")
    p.add_argument("--ort-levels", nargs="+", choices=ORT_LEVELS, default=list(ORT_LEVELS))
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--stem", default=STUDY)
    args = p.parse_args(argv)
    from dart_triton.model.parts import load_parts
    from dart_triton.model.text_encoder import TextEncoder

    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    checkpoint = common.checkpoint_for(args)
    rows: list[dict] = []
    model = ""
    for imgsz in args.sizes or [common.resolve_imgsz(args)]:
        args.imgsz_used = imgsz
        parts = load_parts(checkpoint, imgsz, max(args.classes))
        model = f"{args.config}: {common.model_summary(parts.model)}"
        text, mask = TextEncoder.from_sam3(parts.model, parts.tokenizer).encode(
            common.class_names(max(args.classes)))
        rng = np.random.default_rng(0)
        d = parts.dims
        feats = rng.standard_normal((1, d.fpn_dim, d.feat_hw, d.feat_hw)).astype(np.float32)
        rows += torch_rows(parts, feats, text, mask, args, args.device)
        if not args.no_ort and args.device == "cpu":
            onnx = serving.graphs_dir(checkpoint, imgsz, 16) / "enc_dec.onnx"
            rows += ort_rows(onnx, feats, text, mask, args)
        common.write_csv(rows, args.out / f"{args.stem}.csv")
        plot(rows, args.out / f"{args.stem}.png")
        common.update_section(args.results, args.stem, report(rows, args, command, model))
    print(common.markdown_table(rows, COLUMNS, digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
