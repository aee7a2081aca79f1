"""What a build is asked for: `dart-triton build`'s options and the repository's own.

Data and their checks only; which backend serves the graphs is looked up from
`BuildOptions.backend` once, by `backends.check_build`, and carried from there.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from dart_triton.backbones.choice import BackboneChoice
from dart_triton.contract import specs
from dart_triton.contract.passes import parse_buckets
from dart_triton.contract.specs import GraphDims
from dart_triton.export.tensorrt.options import PlanBuildOptions

DEFAULT_VOCABULARY = "coco80.txt"
DEFAULT_INSTANCES = {
    # Two `dart` instances keep two frames in flight: one in the backbone while the
    # other is in the encoder-decoder (inter-frame pipelining, DART §3.5).
    specs.DART: 2,
    specs.PREPROCESS: 2,
    specs.TEXT_ENCODER: 1,  # one instance = one shared embedding cache
    specs.BACKBONE: 1,
    specs.ENC_DEC: 1,
    specs.POSTPROCESS: 2,
    specs.MASK_DECODER: 1,  # only in a repository built with --masks
}


@dataclass
class RepoOptions:
    backend: str = "python"
    dims: GraphDims = field(default_factory=GraphDims)
    instances: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_INSTANCES))
    gpu: bool = False  # python models and graphs on the GPU (KIND_GPU)
    gpus: tuple[int, ...] = ()  # GPU ids; () = Triton's default (every visible GPU)
    enc_dec_buckets: tuple[int, ...] = ()  # N buckets dart pads to; () = chunks of max
    cuda_graphs: bool = True
    warm_vocabulary: str = "coco80.txt"
    ort_threads: int = 0  # python backend: ONNX Runtime threads per session (0 = all cores)
    # Graph-model parameters of backends that take any (torch: precision, compile mode,
    # CUDA graphs), from the build options by the backend's entry (`export.backends`).
    graph_settings: dict[str, str] = field(default_factory=dict)
    # What serves `backbone` (`BackboneChoice.describe`), said in dart's parameters.
    backbone: str = "vit"
    # Frames per backbone call: >1 turns on Triton's dynamic batcher for `backbone`, so
    # concurrent requests (cameras) share a call; 1 = one call per frame.
    max_batch: int = 1
    batch_delay_us: int = 0  # how long the batcher may hold a frame for others to join
    # enc_dec batches requests too (`specs.shared_enc_dec_spec`): the prompts of up to
    # max_batch frames share passes. Where the backend's enc_dec can (`Backend.shares_passes`).
    shared_passes: bool = False

    def __post_init__(self) -> None:
        self.gpus = tuple(self.gpus)
        if self.gpus:
            self.gpu = True  # (a backend that only runs on a GPU: `Backend.configure`)


def packaged_vocabulary(name: str = DEFAULT_VOCABULARY) -> Path:
    """A vocabulary shipped as package data (``dart_triton/assets``)."""
    return Path(str(resources.files("dart_triton") / "assets" / name))


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


def parse_gpus(text: str | None) -> tuple[int, ...]:
    """'0,1' -> (0, 1): the GPUs instance groups are placed on."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not all(t.isdigit() for t in items) or len(set(items)) != len(items):
        raise ValueError(f"--gpus takes distinct GPU ids like '0,1', got {text!r}")
    return tuple(int(t) for t in items)


@dataclass
class BuildOptions:
    """What `dart-triton build` was asked for; built once from the command line."""

    backend: str = "python"
    imgsz: int | None = None  # None: the checkpoint's
    max_classes: int = specs.DEFAULT_MAX_CLASSES
    instances: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_INSTANCES))
    onnx_dir: Path | None = None  # reuse exported graphs
    gpu: bool = False
    gpus: tuple[int, ...] = ()  # instance groups on these GPUs (implies gpu)
    buckets: tuple[int, ...] = ()
    vocabulary: Path | None = None  # None: the packaged COCO names
    ort_threads: int = 0
    build_plans: bool = True  # tensorrt: build the plans now (else `build-plans` later)
    plan: PlanBuildOptions = field(default_factory=PlanBuildOptions)
    # torch: serving precision (None: fp16 on a GPU, fp32 on the CPU), torch.compile mode,
    # CUDA graphs (one per enc_dec bucket); see export.torch_weights
    precision: str | None = None
    compile: str = "none"
    cuda_graphs: bool = False
    # What serves `backbone`: vit | pruned:PLAN.json:K | student:DIR (backbone_choice)
    backbone: str = "vit"
    max_batch: int = 1  # frames per backbone call (RepoOptions.max_batch)
    batch_delay_us: int = 0
    masks: bool = False  # also serve masks on demand (a mask_decoder model; GraphDims.masks)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.batch_delay_us < 0:
            raise ValueError(f"--batch-delay-us must be >= 0, got {self.batch_delay_us}")
        # The backend's own options (torch: precision, compile, CUDA graphs) are checked by
        # its entry in the backend table, `backends.check_build`, when the build starts.
        self.backbone = str(BackboneChoice.parse(self.backbone))
        self.buckets = parse_buckets(self.buckets)
        if self.buckets and self.buckets[-1] != self.max_classes:
            raise ValueError(f"the largest bucket ({self.buckets[-1]}) must equal "
                             f"--max-classes ({self.max_classes})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BuildOptions:
        instances = parse_instances(args.instances)
        if args.max_batch > 1 and f"{specs.DART}=" not in (args.instances or ""):
            # B frames per backbone call need B requests in `dart` at once.
            instances[specs.DART] = max(instances[specs.DART], args.max_batch)
        return cls(backend=args.backend, imgsz=args.imgsz, max_classes=args.max_classes,
                   instances=instances,
                   onnx_dir=Path(args.onnx_dir) if args.onnx_dir else None, gpu=args.gpu,
                   gpus=parse_gpus(args.gpus),
                   buckets=parse_buckets(args.buckets),
                   vocabulary=Path(args.vocabulary) if args.vocabulary else None,
                   ort_threads=args.ort_threads, build_plans=not args.no_plans,
                   plan=PlanBuildOptions.from_args(args), precision=args.precision,
                   compile=args.compile, cuda_graphs=args.cuda_graphs,
                   backbone=args.backbone, max_batch=args.max_batch,
                   batch_delay_us=args.batch_delay_us, masks=args.masks)

    def plan_options(self, max_classes: int) -> PlanBuildOptions:
        return replace(self.plan, max_classes=max_classes, buckets=self.buckets,
                       max_batch=self.max_batch)


