"""Where the encoder-decoder's time goes, per operator: the PyTorch profiler on
`BatchedDetectionHead` and ONNX Runtime's own profiler on ``enc_dec.onnx``.

Explains the per-prompt cost that bounds large class counts on CPU (hierarchy L2+).

    python -m dart_triton.benchmarks.enc_dec_profile --classes 16
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from dart_triton.benchmarks import common, serving

STUDY = "enc_dec_profile"
COLUMNS = ["runtime", "op", "ms", "share_pct", "calls"]
TOP = 10


def torch_profile(parts, feats, text, mask, attn: str) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    parts.model.set_attn_implementation(attn)
    args = (torch.from_numpy(feats), torch.from_numpy(text), torch.from_numpy(mask))
    with torch.no_grad():
        parts.head(*args)  # warm-up outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            parts.head(*args)
    parts.model.set_attn_implementation("eager")
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"runtime": f"PyTorch ({attn} attention)", "op": e.key,
             "ms": e.self_cpu_time_total / 1e3, "share_pct": 100 * e.self_cpu_time_total / total,
             "calls": e.count} for e in events]


def ort_profile(onnx_path: Path, feats, text, mask) -> list[dict]:
    import onnxruntime as ort

    from dart_triton.contract import specs

    with tempfile.TemporaryDirectory(prefix="dart-ort-prof-") as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "enc_dec")
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        feed = {specs.FPN_FEATURES: feats, specs.TEXT_FEATURES: text, specs.TEXT_MASK: mask}
        session.run(None, feed)  # warm-up
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, list[float]] = defaultdict(list)
    runs = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")].append(e["dur"] / 1e3)
    runs = max(runs, 1)  # both runs are in the file: report one run's share
    total = sum(sum(v) for v in per_op.values()) or 1.0
    return [{"runtime": "ONNX Runtime CPU", "op": op, "ms": sum(v) / runs,
             "share_pct": 100 * sum(v) / total, "calls": len(v) // runs}
            for op, v in per_op.items()]


def top(rows: list[dict], k: int = TOP) -> list[dict]:
    out = []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        sel = sorted((r for r in rows if r["runtime"] == runtime), key=lambda r: -r["ms"])
        out += sel[:k]
    return out


def plot(rows: list[dict], path: Path) -> Path:
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    fig, axes = common.new_figure(ncols=len(runtimes), width=5)
    for ax, runtime in zip(axes, runtimes, strict=True):
        sel = [r for r in rows if r["runtime"] == runtime][::-1]
        ax.barh([r["op"].removeprefix("aten::") for r in sel], [r["share_pct"] for r in sel])
        ax.set_title(runtime, fontsize=9)
        ax.set_xlabel("% of operator time")
        ax.tick_params(axis="y", labelsize=7)
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(16,), iters=1)
    args = p.parse_args(argv)
    from dart_triton.model.parts import load_parts
    from dart_triton.model.text_encoder import TextEncoder

    imgsz = common.resolve_imgsz(args)
    n = args.classes[0]
    checkpoint = common.checkpoint_for(args)
    parts = load_parts(checkpoint, imgsz, n)
    text, mask = TextEncoder.from_sam3(parts.model, parts.tokenizer).encode(
        common.class_names(n))
    d = parts.dims
    feats = np.random.default_rng(0).standard_normal(
        (1, d.fpn_dim, d.feat_hw, d.feat_hw)).astype(np.float32)
    rows = top(torch_profile(parts, feats, text, mask, "eager")
               + torch_profile(parts, feats, text, mask, "sdpa"))
    onnx = serving.graphs_dir(checkpoint, imgsz, 16) / "enc_dec.onnx"
    rows += top(ort_profile(onnx, feats, text, mask))
    for r in rows:
        print(f"  {r['runtime']:<28} {r['op']:<32} {r['ms']:9.1f} ms {r['share_pct']:5.1f}%")
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    notes = (f"One enc-dec pass, N={n} prompts, {imgsz}px ({d.feat_hw}x{d.feat_hw} image "
             f"tokens), CPU; top {TOP} operators by self time per runtime. The 6 encoder "
             "layers run self-attention over all image tokens once per prompt (text enters "
             "through cross-attention), so this cost is linear in N.")
    head = common.section_header("Encoder-decoder profile", command,
                                 f"{args.config}: {common.model_summary(parts.model)}", notes)
    common.write_csv(rows, args.out / f"{STUDY}.csv")
    plot(rows, args.out / f"{STUDY}.png")
    table = common.markdown_table(rows, COLUMNS, digits=1)
    common.update_section(args.results, STUDY, f"{head}\n{table}\n\n"
                          f"{common.image_link(args, STUDY, 'enc-dec profile')}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
