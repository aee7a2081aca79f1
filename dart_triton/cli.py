"""`dart-triton` console script: one front door, subcommands dispatch into the folders."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). Imports are lazy so that
# `dart-triton detect` does not pay for torch.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "tiny-checkpoint": ("dart_triton.model.checkpoint", "tiny_checkpoint_main",
                        "write a tiny randomly initialised SAM3 checkpoint"),
    "export": ("dart_triton.export.onnx_export", "main",
               "checkpoint -> backbone.onnx + enc_dec.onnx, checked with ONNX Runtime"),
    "build": ("dart_triton.export.repository", "main",
              "checkpoint -> servable Triton model repository"),
    "build-plans": ("dart_triton.export.tensorrt.build", "main",
                    "ONNX graphs -> TensorRT plans, verified (GPU + TensorRT)"),
    "check-repository": ("dart_triton.export.check", "check_main",
                         "is a built repository what `build` would write now? (exit 0: yes)"),
    "prune": ("dart_triton.compression.pruning", "main",
              "greedy sub-block/block pruning search of the ViT backbone -> PLAN.json"),
    "distill": ("dart_triton.compression.distill", "main",
                "distil a student backbone (timm + adapter, or pruned ViT) from the teacher"),
    "serve": ("dart_triton.serving.serve", "serve_main", "start tritonserver on a repository"),
    "health": ("dart_triton.serving.health", "main", "deep health check: one tiny real inference"),
    "detect": ("dart_triton.client.cli", "detect_main", "detect objects in images via Triton"),
    "video": ("dart_triton.client.video_cli", "video_main",
              "annotate (and track) a video, frames folder or stream via Triton"),
    "label": ("dart_triton.client.label", "label_main",
              "auto-label an image folder into a COCO or YOLO dataset via Triton"),
    "coco-eval": ("dart_triton.benchmarks.coco_eval", "main", "COCO box AP through the server"),
}


def _usage() -> str:
    lines = ["usage: dart-triton COMMAND [ARGS...]   (or --version)", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a mistake, not a request for help: usage on stderr, exit 2
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from dart_triton import __version__

        print(f"dart-triton {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dart-triton: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
