"""NMS at scale: `postprocess.select` with SCORE_THRESHOLD 0 over N classes x 200 queries.

SCORE_THRESHOLD 0 sends every box to NMS: 1024 classes x SAM3's 200 queries is 204,800
boxes in one legal request. NMS runs per class, a block of classes at a time, on the best
`specs.PRE_NMS_TOPK` candidates. Goals on a CPU: < 0.1 s at 80 x 200, < 2 s at 1024 x 200.
The "no overall cap" rows send all N x 200 boxes through NMS (for scale; not served).
Inputs are random SAM3-shaped head outputs (NMS cost depends on shapes and overlaps, not
on weights); the time is the median of --iters runs, in this process.

    python -m dart_triton.benchmarks.nms_scaling
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dart_triton.benchmarks import common

STUDY = "nms_scaling"
COLUMNS = ["case", "classes", "boxes", "nms_candidates", "kept", "ms"]
GOALS_S = {80: 0.1, 1024: 2.0}


def head_outputs(n: int, queries: int, seed: int = 0):
    """Random boxes (xyxy in [0, 1], overlapping), logits and presence logits."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.8, (n, queries, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.01, 0.3, (n, queries, 2))], -1)
    return (boxes.astype(np.float32), rng.normal(size=(n, queries)).astype(np.float32),
            rng.normal(size=(n, 1)).astype(np.float32))


def measure(classes: list[int], queries: int, iters: int, warmup: int) -> list[dict]:
    from dart_triton.contract import specs
    from dart_triton.contract.validation import DetectOptions
    from dart_triton.model.postprocess import nms, select

    size = (480, 640)
    rows = []
    for n in classes:
        raw = head_outputs(n, queries)
        boxes = raw[0].reshape(-1, 4).astype(np.float64) * [640, 480, 640, 480]
        scores, groups = raw[1].reshape(-1).astype(np.float64), np.repeat(np.arange(n), queries)
        cases = [
            ("select, threshold 0 (served)", lambda raw=raw: select(*raw, size, DetectOptions(0.0)),
             min(n * queries, specs.PRE_NMS_TOPK)),
            ("nms, no overall cap", lambda b=boxes, s=scores, g=groups: nms(
                b, s, g, specs.DEFAULT_NMS_IOU, max_candidates=None), n * queries),
        ]
        for case, fn, candidates in cases:
            timing = common.time_call(fn, iters, warmup)
            out = fn()
            rows.append({"case": case, "classes": n, "boxes": n * queries,
                         "nms_candidates": candidates,
                         "kept": len(out[1]) if isinstance(out, tuple) else len(out),
                         "ms": timing.median_ms})
            print(f"  {rows[-1]}", flush=True)
    return rows


def verdict(rows: list[dict]) -> str:
    parts = []
    for n, goal in GOALS_S.items():
        row = next((r for r in rows if r["classes"] == n and "served" in r["case"]), None)
        if row:
            met = "met" if row["ms"] < goal * 1e3 else "MISSED"
            parts.append(f"{n} x 200 at threshold 0: {row['ms']:.0f} ms (goal < {goal:g} s, "
                         f"{met})")
    return "; ".join(parts) + "." if parts else ""


def plot(rows: list[dict], path: Path) -> Path:
    fig, (ax,) = common.new_figure(width=6)
    for case, style in (("select, threshold 0 (served)", "o-"), ("nms, no overall cap", "s--")):
        pts = [(r["classes"], r["ms"]) for r in rows if r["case"] == case]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=case)
    for n, goal in GOALS_S.items():
        ax.plot([n], [goal * 1e3], "k_", markersize=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes (x 200 queries)")
    ax.set_ylabel("ms (median)")
    ax.set_title("NMS at SCORE_THRESHOLD 0 (bars: goals)")
    ax.legend(fontsize=8)
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m dart_triton.benchmarks.{STUDY}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[1, 16, 80, 256, 1024],
                   help="class counts N to measure (default: %(default)s)")
    p.add_argument("--queries", type=int, default=200, help="queries per class (SAM3: 200)")
    p.add_argument("--iters", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="CSV/PNG directory")
    p.add_argument("--results", type=Path, default=common.DEFAULT_RESULTS,
                   help="markdown file whose section for this study is rewritten")
    args = p.parse_args(argv)
    from dart_triton.contract import specs

    rows = measure(args.classes, args.queries, args.iters, args.warmup)
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    notes = (f"`postprocess.select` in process on numpy inputs (the CPU path: numpy, one "
             f"thread); caps: {specs.PRE_NMS_TOPK} candidates overall, "
             f"{specs.PRE_NMS_TOPK_PER_GROUP} per class; NMS IoU {specs.DEFAULT_NMS_IOU}, "
             f"MAX_DETECTIONS {specs.DEFAULT_MAX_DETECTIONS}. {verdict(rows)}")
    head = common.section_header("NMS at scale (SCORE_THRESHOLD 0)", command,
                                 f"random SAM3-shaped head outputs, {args.queries} queries",
                                 notes)
    common.write_csv(rows, args.out / f"{STUDY}.csv")
    body = f"{head}\n{common.markdown_table(rows, COLUMNS, digits=1)}\n"
    try:
        plot(rows, args.out / f"{STUDY}.png")
        body += f"\n{common.image_link(args, STUDY, 'NMS scaling')}\n"
    except ImportError:  # matplotlib is the optional `bench` extra
        pass
    common.update_section(args.results, STUDY, body)
    print(verdict(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
