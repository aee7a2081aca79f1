"""Checkpoint -> a servable Triton model repository.

`dart-triton build --checkpoint DIR --output REPO_DIR --backend {tensorrt,onnxruntime,python}
 --imgsz N --max-classes M`

Exports the two graphs (unless `--onnx-dir` already holds them for the same sizes),
writes every `config.pbtxt` from `dart_triton.contract.specs` and the python models' entry points,
saves the text encoder (weights, tokenizer, warm cache for a vocabulary) into the
repository so it is self-contained, and writes what the backend serves the graphs from
(see `export.backends`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from dart_triton.backbones.choice import BackboneChoice
from dart_triton.contract import specs
from dart_triton.export import manifest
from dart_triton.export.backends import BACKENDS, check_build
from dart_triton.export.onnx_export import (
    DYNAMIC_FRAMES,
    GRAPHS_JSON,
    backbone_frames,
    export_graphs,
    read_graphs_meta,
)
from dart_triton.export.options import (
    DEFAULT_INSTANCES,
    BuildOptions,
    RepoOptions,
    packaged_vocabulary,
)
from dart_triton.export.tensorrt.options import add_plan_arguments
from dart_triton.export.triton_config import write_repository_files
from dart_triton.model.checkpoint import CheckpointError
from dart_triton.model.text_encoder import TextEncoder, read_vocabulary


def write_text_encoder(repo: Path, checkpoint: Path, vocabulary: Path) -> int:
    """Text weights + tokenizer + a warm cache for the vocabulary; returns names cached."""
    from dart_triton.model.text_encoder import CACHE_FILE

    version = repo / specs.TEXT_ENCODER / "1"
    encoder = TextEncoder.from_checkpoint(checkpoint)
    encoder.save_pretrained(version / "text_encoder")
    names = read_vocabulary(vocabulary)
    shutil.copy2(vocabulary, version / vocabulary.name)
    encoder.save_cache(version / CACHE_FILE, names)  # safetensors + a JSON index: no pickle
    return len(names)


def _graphs_match(onnx_dir: Path, imgsz: int | None, max_classes: int,
                  backbone: str = "vit", masks: bool = False, max_batch: int = 1,
                  shared_passes: bool = False) -> bool:
    """Whether `onnx_dir` holds the graphs this build would export (a backbone for one
    frame, fixed, or with --max-batch > 1 for any number; an enc_dec for shared passes
    or not: else it is re-exported)."""
    if not (onnx_dir / GRAPHS_JSON).is_file():
        return False
    dims = read_graphs_meta(onnx_dir)
    recorded = json.loads((onnx_dir / GRAPHS_JSON).read_text()).get("backbone", "vit")
    frames = DYNAMIC_FRAMES if max_batch > 1 else 1
    return ((imgsz in (None, dims.imgsz)) and dims.max_classes == max_classes
            and dims.masks == masks and recorded == BackboneChoice.parse(backbone).describe()
            and backbone_frames(onnx_dir) == frames
            and backbone_frames(onnx_dir, "enc_dec") == (DYNAMIC_FRAMES if shared_passes else 1))


def build_repository(checkpoint: str | Path, output: str | Path,
                     options: BuildOptions | None = None, *, log=print,
                     **overrides) -> RepoOptions:
    """Write a servable repository; `overrides` replace fields of `options`."""
    build = replace(options or BuildOptions(), **overrides)
    checkpoint, repo = Path(checkpoint), Path(output)
    backend = check_build(build)  # the backend, looked up once; its options checked
    shared = backend.shares_passes and build.max_batch > 1  # RepoOptions.shared_passes
    manifest.invalidate(repo)  # written last: a repository without one is unfinished
    # Every directory in a repository is a model to Triton: export graphs elsewhere.
    with tempfile.TemporaryDirectory(prefix="dart-graphs-") as scratch:
        graphs = Path(build.onnx_dir) if build.onnx_dir else Path(scratch)
        if backend.export is not None:  # the backend serves something else (torch: weights)
            graphs = Path(scratch)
            dims = backend.export(checkpoint, graphs, build, log)
        elif not _graphs_match(graphs, build.imgsz, build.max_classes, build.backbone,
                               build.masks, build.max_batch, shared):
            _, agreements = export_graphs(checkpoint, graphs, build.imgsz, build.max_classes,
                                          build.masks, log=log, backbone=build.backbone,
                                          max_batch=build.max_batch, shared_passes=shared)
            bad = [a for a in agreements if not a.ok]
            if bad:
                raise RuntimeError(f"ONNX Runtime disagrees with PyTorch on {bad[0].tensor} "
                                   f"(cosine {bad[0].cosine:.6f})")
        opts = backend.repo_options(build, dims if backend.export else read_graphs_meta(graphs))
        vocab = build.vocabulary or packaged_vocabulary()
        repo.mkdir(parents=True, exist_ok=True)
        write_repository_files(repo, opts, backend)
        backend.write_artifacts(repo, graphs, build, opts, log)
        log(f"text encoder: cached {write_text_encoder(repo, checkpoint, vocab)} names "
            f"from {vocab.name}")
    manifest.write_manifest(repo, build, checkpoint, vocab, opts.dims)
    return opts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dart-triton build", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="local facebook/sam3-layout directory")
    p.add_argument("--output", required=True, help="model repository directory to write")
    p.add_argument("--backend", choices=tuple(BACKENDS), default="python",
                   help="how backbone/enc_dec are served: "
                        + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
    p.add_argument("--imgsz", type=int, default=None,
                   help="input resolution, a multiple of 14 (default: the checkpoint's)")
    p.add_argument("--max-classes", type=int, default=specs.DEFAULT_MAX_CLASSES,
                   help="prompts per enc_dec pass; more classes take ceil(N/max) passes")
    p.add_argument("--instances", default=None,
                   help="instance counts, e.g. 'dart=2,backbone=1,enc_dec=1' (defaults: "
                        + ", ".join(f"{k}={v}" for k, v in DEFAULT_INSTANCES.items()) + ")")
    p.add_argument("--onnx-dir", default=None, help="reuse graphs from `dart-triton export`")
    p.add_argument("--gpu", action="store_true",
                   help="run the python models and graphs on the GPU (implied by tensorrt)")
    p.add_argument("--gpus", default=None,
                   help="GPU ids, e.g. 0,1: every model gets --instances instances on EACH "
                        "listed GPU (Triton's instance_group gpus; implies --gpu)")
    p.add_argument("--ort-threads", type=int, default=0,
                   help="python backend: ONNX Runtime threads per graph session (default: "
                        "all cores; with 2 frames in flight, half the cores each)")
    p.add_argument("--vocabulary", default=None,
                   help="class names (one per line) to pre-encode into the text cache "
                        "(default: the 80 COCO names)")
    p.add_argument("--buckets", default="",
                   help="enc_dec class-count buckets, e.g. 1,4,16: one TensorRT profile (and "
                        "CUDA graph) each; dart pads N up to the next bucket. The largest "
                        "must equal --max-classes")
    p.add_argument("--no-plans", action="store_true",
                   help="tensorrt: write the repository without plans (build them later with "
                        "`dart-triton build-plans` on the GPU that will serve them)")
    add_plan_arguments(p, build_command=True)
    # --precision is shared with tensorrt (plan precision, default fp16); unset, the torch
    # backend picks fp16 on a GPU and fp32 on the CPU.
    p.set_defaults(precision=None)
    p._option_string_actions["--precision"].help = (
        "tensorrt: plan precision (default fp16); torch: serving precision (default fp16 "
        "with --gpu, fp32 on the CPU)")
    p.add_argument("--compile", choices=("none", "default", "max-autotune"), default="none",
                   help="torch: torch.compile the graph modules at load, before the models "
                        "report ready (max-autotune: minutes per model; default %(default)s)")
    p.add_argument("--backbone", default="vit",
                   metavar="{vit|pruned:PLAN.json:K|student:DIR}",
                   help="what serves `backbone`: SAM3's ViT (default), the ViT without the "
                        "first K units of a `dart-triton prune` plan, or a `dart-triton "
                        "distill` student directory; same contract, same enc_dec")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch (--gpu): capture one CUDA graph per enc_dec bucket (--buckets, "
                        "else --max-classes) and one for the backbone at load")
    p.add_argument("--max-batch", type=int, default=1, metavar="B",
                   help="frames per backbone call: concurrent requests (cameras) share one "
                        "call through Triton's dynamic batcher (every backend; "
                        "`dart` gets B instances unless --instances says otherwise); on the "
                        "python and torch backends the prompts of those frames also share "
                        "enc_dec passes (at most --max-classes rows each). "
                        "Default 1: one call per frame")
    p.add_argument("--masks", action="store_true",
                   help="serve masks on demand: a mask_decoder model, and `dart` answers "
                        "RETURN_MASKS with MASKS (COCO RLE) for the kept detections; "
                        "requests without it cost what they cost without --masks")
    p.add_argument("--batch-delay-us", type=int, default=0, metavar="US",
                   help="with --max-batch: how long a frame may wait for others to join its "
                        "batch (default 0: only frames already queued join)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = build_repository(args.checkpoint, args.output, BuildOptions.from_args(args))
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"dart-triton build: error: {exc}", file=sys.stderr)
        return 2
    print(f"model repository ready: {args.output} (backend {opts.backend}, "
          f"{opts.dims.imgsz}px, up to {opts.dims.max_classes} prompts per pass)\n"
          f"serve it with: dart-triton serve --model-repository {args.output}")
    return 0
