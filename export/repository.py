"""Checkpoint -> a servable Triton model repository.

`dart-triton build --checkpoint DIR --output REPO_DIR --backend {tensorrt,onnxruntime,python}
 --imgsz N --max-classes M`

Exports the two graphs (unless `--onnx-dir` already holds them for the same sizes),
writes every `config.pbtxt` from `dart_triton.specs`, copies the python models, saves
the text encoder (weights, tokenizer, warm cache for a vocabulary) into the repository
so it is self-contained, and for `tensorrt` builds verified FP16 plans.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from dart_triton import specs
from dart_triton.checkpoint import CheckpointError
from dart_triton.text_encoder import TextEncoder, read_vocabulary

from .onnx_export import GRAPHS_JSON, export_graphs, read_graphs_meta
from .triton_config import BACKENDS, DEFAULT_INSTANCES, RepoOptions, all_configs

SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
ASSETS = Path(__file__).resolve().parent.parent / "dart_triton" / "assets"
GRAPH_MODELS = ("backbone", "enc_dec")


def parse_instances(text: str | None) -> dict[str, int]:
    """'dart=2,backbone=1' -> counts merged over the defaults."""
    counts = dict(DEFAULT_INSTANCES)
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if name not in counts or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad --instances entry {item!r}: use MODEL=COUNT with MODEL in "
                             f"{sorted(counts)}")
        counts[name] = int(value)
    return counts


def write_configs(repo: Path, opts: RepoOptions) -> None:
    for name, text in all_configs(opts).items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)  # ensembles need a version dir
        (repo / name / "config.pbtxt").write_text(text)


def copy_python_models(repo: Path, backend: str) -> None:
    names = ["preprocess", "text_encoder", "postprocess", "dart"]
    if backend == "python":
        names += list(GRAPH_MODELS)
    for name in names:
        shutil.copy2(SOURCE_REPOSITORY / name / "1" / "model.py", repo / name / "1" / "model.py")


def write_text_encoder(repo: Path, checkpoint: Path, vocabulary: Path) -> int:
    """Text weights + tokenizer + a warm cache for the vocabulary; returns names cached."""
    version = repo / "text_encoder" / "1"
    encoder = TextEncoder.from_checkpoint(checkpoint)
    encoder.save_pretrained(version / "text_encoder")
    names = read_vocabulary(vocabulary)
    shutil.copy2(vocabulary, version / vocabulary.name)
    encoder.save_cache(version / "text_cache.npz", names)
    return len(names)


def place_graphs(repo: Path, onnx_dir: Path, backend: str) -> None:
    if backend == "tensorrt":
        return
    for name in GRAPH_MODELS:
        version = repo / name / "1"
        for old in version.glob("model.onnx*"):
            old.unlink()
        shutil.copy2(onnx_dir / f"{name}.onnx", version / "model.onnx")
        data = onnx_dir / f"{name}.onnx.data"
        if data.is_file():  # external weights keep the file name the graph refers to
            shutil.copy2(data, version / data.name)


def _graphs_match(onnx_dir: Path, imgsz: int | None, max_classes: int) -> bool:
    if not (onnx_dir / GRAPHS_JSON).is_file():
        return False
    dims = read_graphs_meta(onnx_dir)
    return (imgsz in (None, dims.imgsz)) and dims.max_classes == max_classes


def build_repository(checkpoint: str | Path, output: str | Path, backend: str = "python",
                     imgsz: int | None = None, max_classes: int = specs.DEFAULT_MAX_CLASSES,
                     instances: dict[str, int] | None = None, onnx_dir: str | Path | None = None,
                     gpu: bool | None = None, buckets: tuple[int, ...] = (),
                     vocabulary: str | Path | None = None, plan_options: dict | None = None,
                     build_engine_plans: bool = True, ort_threads: int = 0,
                     log=print) -> RepoOptions:
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    checkpoint, repo = Path(checkpoint), Path(output)
    # Every directory in a repository is a model to Triton: export graphs elsewhere.
    scratch = tempfile.TemporaryDirectory(prefix="dart-graphs-")
    graphs = Path(onnx_dir) if onnx_dir else Path(scratch.name)
    if not _graphs_match(graphs, imgsz, max_classes):
        _, agreements = export_graphs(checkpoint, graphs, imgsz, max_classes, log=log)
        bad = [a for a in agreements if not a.ok]
        if bad:
            raise RuntimeError(f"ONNX Runtime disagrees with PyTorch on {bad[0].tensor} "
                               f"(cosine {bad[0].cosine:.6f})")
    dims = read_graphs_meta(graphs)
    opts = RepoOptions(backend=backend, dims=dims, instances=instances or dict(DEFAULT_INSTANCES),
                       gpu=bool(gpu), enc_dec_buckets=tuple(buckets), ort_threads=ort_threads)
    vocab = Path(vocabulary) if vocabulary else ASSETS / "coco80.txt"
    opts.warm_vocabulary = vocab.name
    repo.mkdir(parents=True, exist_ok=True)
    write_configs(repo, opts)
    copy_python_models(repo, backend)
    place_graphs(repo, graphs, backend)
    log(f"text encoder: cached {write_text_encoder(repo, checkpoint, vocab)} names "
        f"from {vocab.name}")
    if backend == "tensorrt" and build_engine_plans:
        from .tensorrt_build import build_plans

        build_plans(graphs, repo, {"max_classes": dims.max_classes, "buckets": buckets,
                                   **(plan_options or {})})
    (repo / "dart_repository.json").write_text(json.dumps(
        {"backend": backend, "dims": {k: v for k, v in asdict(dims).items() if k != "extra"},
         "instances": opts.instances, "enc_dec_buckets": list(buckets),
         "checkpoint": str(checkpoint.resolve())}, indent=2))
    scratch.cleanup()
    return opts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dart-triton build", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="local facebook/sam3-layout directory")
    p.add_argument("--output", required=True, help="model repository directory to write")
    p.add_argument("--backend", choices=BACKENDS, default="python",
                   help="how backbone/enc_dec are served: TensorRT plans (GPU), the "
                        "onnxruntime backend, or ONNX Runtime inside the python backend")
    p.add_argument("--imgsz", type=int, default=None,
                   help="input resolution, a multiple of 14 (default: the checkpoint's)")
    p.add_argument("--max-classes", type=int, default=specs.DEFAULT_MAX_CLASSES,
                   help="prompts per enc_dec pass; more classes take ceil(N/max) passes")
    p.add_argument("--instances", default=None,
                   help="instance counts, e.g. 'dart=2,backbone=1,enc_dec=1' (defaults: "
                        + ", ".join(f"{k}={v}" for k, v in DEFAULT_INSTANCES.items()) + ")")
    p.add_argument("--onnx-dir", default=None, help="reuse graphs from `dart-triton export`")
    p.add_argument("--gpu", action="store_true",
                   help="run python/onnxruntime models on the GPU (implied by tensorrt)")
    p.add_argument("--buckets", default="",
                   help="tensorrt: enc_dec N profiles, e.g. 1,4,16 (pad to the next bucket)")
    p.add_argument("--ort-threads", type=int, default=0,
                   help="python backend: ONNX Runtime threads per graph session (default: "
                        "all cores; with 2 frames in flight, half the cores each)")
    p.add_argument("--vocabulary", default=None,
                   help="class names (one per line) to pre-encode into the text cache "
                        "(default: the 80 COCO names)")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="tensorrt")
    p.add_argument("--no-plans", action="store_true",
                   help="tensorrt: write the repository without plans (build them later with "
                        "`dart-triton build-plans` on the GPU that will serve them)")
    p.add_argument("--workspace-gb", type=float, default=None, help="tensorrt workspace limit")
    args = p.parse_args(argv)
    try:
        from dart_triton.buckets import parse_buckets

        plan_options = {"precision": args.precision}
        if args.workspace_gb:
            plan_options["workspace_gb"] = args.workspace_gb
        opts = build_repository(
            args.checkpoint, args.output, args.backend, args.imgsz, args.max_classes,
            parse_instances(args.instances), args.onnx_dir, args.gpu,
            parse_buckets(args.buckets), args.vocabulary, plan_options,
            build_engine_plans=not args.no_plans, ort_threads=args.ort_threads)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"dart-triton build: error: {exc}", file=sys.stderr)
        return 2
    print(f"model repository ready: {args.output} (backend {opts.backend}, "
          f"{opts.dims.imgsz}px, up to {opts.dims.max_classes} prompts per pass)\n"
          f"serve it with: dart-triton serve --model-repository {args.output}")
    return 0
