"""Shared benchmark plumbing: arguments, model checkpoints, timing, machine info, writers.

Every study (`hierarchy`, `class_scaling`, `serving_overhead`, `text_cache`,
`fp16_precision`) is a module with ``main(argv)`` that writes ``<study>.csv``,
``<study>.png`` and a markdown section into a results file (by default
``benchmarks/RESULTS.md``), replacing only the text between its own markers.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
# In a source checkout the studies write beside this file (benchmarks/results, RESULTS.md);
# installed from a wheel (this folder is dart_triton/benchmarks in site-packages) they
# write under the working directory instead, never into the installed package.
IN_CHECKOUT = (BENCH_DIR.parent / "pyproject.toml").is_file()
REPO_ROOT = BENCH_DIR.parent if IN_CHECKOUT else Path.cwd()
DEFAULT_OUT = BENCH_DIR / "results" if IN_CHECKOUT else Path.cwd() / "benchmarks" / "results"
DEFAULT_RESULTS = (BENCH_DIR if IN_CHECKOUT else Path.cwd() / "benchmarks") / "RESULTS.md"

def cache_dir() -> Path:
    """Checkpoints, ONNX graphs and repositories built for benchmarks (reused across runs).

    Random full-size checkpoints are 3.4 GB: kept outside git (artifacts/ is ignored);
    ``DART_BENCH_CACHE`` moves them (tests point it at a temporary directory).
    """
    return Path(os.environ.get("DART_BENCH_CACHE") or REPO_ROOT / "artifacts" / "bench")

COCO80 = Path(str(resources.files("dart_triton") / "assets" / "coco80.txt"))

# CPU defaults: the full ViT-H at 1008 px takes ~minutes per frame on 2 cores. Not 336:
# at the pretraining size RestructuredBackbone's pos_embed is the Parameter itself
# (requires grad) and the ONNX export fails; 322 (23x23 tokens) costs about the same.
DEFAULT_IMGSZ = {"full": 322, "tiny": 112}


# Arguments ------------------------------------------------------------------------------


def base_parser(prog: str, description: str, classes: Sequence[int] = (3,),
                iters: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", choices=("full", "tiny"), default="full",
                   help="full: random-weight SAM3 (Sam3Config(), ~840M params); tiny: the "
                        "test-size random SAM3 (seconds, numbers meaningless)")
    p.add_argument("--imgsz", type=int, default=None,
                   help="input resolution, a multiple of 14 (default: full "
                        f"{DEFAULT_IMGSZ['full']}, tiny {DEFAULT_IMGSZ['tiny']})")
    p.add_argument("--classes", type=int, nargs="+", default=list(classes),
                   help="class counts N to measure (default: %(default)s)")
    p.add_argument("--iters", type=int, default=iters, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="SAM3 checkpoint dir (default: a cached random one for --config)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV/PNG directory")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                   help="markdown file whose section for this study is rewritten")
    return p


def add_repository_args(p: argparse.ArgumentParser) -> None:
    """The options of a study that builds and serves its own repositories."""
    p.add_argument("--max-classes", type=int, default=4,
                   help="prompts per enc_dec pass in the built repositories (default 4)")
    p.add_argument("--gpu", action="store_true",
                   help="GPU repositories (torch: FP16, torch.compile, CUDA graphs)")


def resolve_imgsz(args: argparse.Namespace) -> int:
    from dart_triton.contract.specs import PATCH_SIZE

    imgsz = args.imgsz or DEFAULT_IMGSZ[args.config]
    if imgsz % PATCH_SIZE:
        raise SystemExit(f"--imgsz must be a multiple of {PATCH_SIZE}, got {imgsz}")
    return imgsz


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m", prog, *map(shlex.quote, map(str, args))])


# Models ---------------------------------------------------------------------------------


def full_config():
    """`Sam3Config()`: the facebook/sam3 architecture (ViT-H/14, 32 blocks, 6+6 DETR)."""
    from transformers import Sam3Config

    return Sam3Config()


def random_checkpoint(config: str, seed: int = 0, cache: Path | None = None) -> Path:
    """A random-weight SAM3 checkpoint dir for `config`, written once and reused.

    Compute does not depend on weight values, so random weights time like real ones.
    """
    from dart_triton.model.checkpoint import write_clip_tokenizer, write_tiny_checkpoint

    path = Path(cache or cache_dir()) / f"sam3-{config}-seed{seed}"
    if (path / "config.json").is_file() and (path / "vocab.json").is_file():
        return path
    if config == "tiny":
        return write_tiny_checkpoint(path, seed=seed, variant="a")
    import torch
    from transformers import Sam3Model

    print(f"writing a random full-size SAM3 checkpoint to {path} (once) ...", flush=True)
    torch.manual_seed(seed)
    # Initialising 840M parameters takes a minute on a CPU and seconds on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Sam3Model(full_config()).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_clip_tokenizer(path)
    return path


def checkpoint_for(args: argparse.Namespace) -> Path:
    return Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.config)


def model_summary(model) -> str:
    """'ViT 32x1024, DETR 6+6, 200 queries, 840.0M params' for the results header."""
    cfg = model.config
    vit = cfg.vision_config.backbone_config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"ViT {vit.num_hidden_layers}x{vit.hidden_size}, DETR "
            f"{cfg.detr_encoder_config.num_layers}+{cfg.detr_decoder_config.num_layers} "
            f"x{cfg.detr_decoder_config.hidden_size}, {cfg.detr_decoder_config.num_queries} "
            f"queries, {params:.1f}M params, random weights")


def class_names(n: int) -> list[str]:
    """The first n COCO names (cycled with a suffix past 80, to stay distinct)."""
    base = [line.strip() for line in COCO80.read_text().splitlines() if line.strip()]
    return [base[i % len(base)] + ("" if i < len(base) else f" {i // len(base)}")
            for i in range(n)]


def test_image(size: int = 512) -> np.ndarray:
    """A real photograph when scikit-image is installed, else a smooth synthetic frame."""
    try:
        from skimage import data

        return data.astronaut()
    except ImportError:
        y, x = np.mgrid[0:size, 0:size]
        rgb = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1)
        return rgb.astype(np.uint8)


# Timing ---------------------------------------------------------------------------------


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else float("nan")


def time_call(fn: Callable[[], Any], iters: int = 3, warmup: int = 1,
              sync: Callable[[], None] | None = None) -> Timing:
    """Median-friendly wall-clock samples of fn(); `sync` (e.g. cuda.synchronize) per call."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    timing = Timing()
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        timing.samples_ms.append((time.perf_counter() - t0) * 1e3)
    return timing


# Machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        import cpuinfo  # py-cpuinfo, when installed

        return str(cpuinfo.get_cpu_info().get("brand_raw") or platform.processor())
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def machine_info() -> dict[str, str]:
    import onnxruntime
    import torch
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": f"{cpu_model()} ({cores} cores usable)",
        "gpu": gpu_name() or "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if hasattr(os, "getloadavg"):  # a shared machine: say how busy it was when we started
        info["load"] = "/".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"
    return info


def machine_line(info: dict[str, str] | None = None) -> str:
    info = info or machine_info()
    return "; ".join(f"{k} {v}" for k, v in info.items())


# Writers --------------------------------------------------------------------------------


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.{digits}f}"
    return "–" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                   headers: Sequence[str] | None = None, digits: int = 1) -> str:
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def section_header(title: str, command: str, model: str, notes: str = "",
                   info: dict[str, str] | None = None) -> str:
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    text = (f"### {title}\n\n"
            f"- date: {date}\n- machine: {machine_line(info)}\n"
            f"- command: `{command}`\n- model: {model}\n")
    return text + (f"\n{notes.strip()}\n" if notes.strip() else "")


def publish_table(args: argparse.Namespace, study: str, head: str,
                  rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 1) -> None:
    """A one-table study: its CSV, its section of the results file (`head` and the table),
    and the table on stdout."""
    write_csv(rows, Path(args.out) / f"{study}.csv")
    table = markdown_table(rows, columns, digits=digits)
    update_section(args.results, study, f"{head}\n{table}\n")
    print(table)


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"


def update_section(results: Path, key: str, body: str) -> Path:
    """Replace the text between this key's markers, or append a new marked section."""
    begin, end = _markers(key)
    block = f"{begin}\n{body.strip()}\n{end}"
    results = Path(results)
    text = results.read_text() if results.is_file() else "# DART benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    return results


def read_section(results: Path, key: str) -> str | None:
    begin, end = _markers(key)
    text = Path(results).read_text() if Path(results).is_file() else ""
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def copy_sections(src: Path, dst: Path) -> list[str]:
    """Copy every marked section of `src` into `dst` (merging a GPU run's file, say)."""
    text = Path(src).read_text()
    keys = [chunk.split(" -->", 1)[0] for chunk in text.split("<!-- BEGIN ")[1:]]
    for key in keys:
        body = read_section(src, key)
        if body is not None:
            update_section(dst, key, body)
    return keys


def image_link(args: argparse.Namespace, stem: str, alt: str) -> str:
    """Markdown image of `<out>/<stem>.png`, relative to the results file when possible."""
    out, results = Path(args.out).resolve(), Path(args.results).resolve().parent
    try:
        rel = out.relative_to(results).as_posix()
    except ValueError:
        rel = str(out)
    return f"![{alt}]({rel}/{stem}.png)"


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0, nrows: int = 1):
    """A figure and its axes as a flat list (row by row)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run in CI and on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m dart_triton.benchmarks.common merge SRC DST`: copy marked sections."""
    p = argparse.ArgumentParser(prog="python -m dart_triton.benchmarks.common")
    sub = p.add_subparsers(dest="cmd", required=True)
    merge = sub.add_parser("merge", help="copy marked sections of SRC into DST")
    merge.add_argument("src", type=Path)
    merge.add_argument("dst", type=Path, nargs="?", default=DEFAULT_RESULTS)
    sub.add_parser("machine", help="print this machine's description")
    args = p.parse_args(argv)
    if args.cmd == "merge":
        print("copied:", ", ".join(copy_sections(args.src, args.dst)))
    else:
        print(machine_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
