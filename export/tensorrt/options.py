"""The TensorRT a plan is built with (found once, from the installed module) and the
plan options `dart-triton build` and `dart-triton build-plans` share.

TensorRT is imported lazily: the options, the graph checks and the ``trtexec`` lines
work on a machine without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dart_triton.contract import specs
from dart_triton.contract.passes import parse_buckets
from dart_triton.export.tensorrt.profiles import MODELS
from dart_triton.export.tensorrt.verify import Tolerances, VerificationError

TRT_MISSING = (
    "TensorRT not installed: run inside the NGC tritonserver container "
    "(nvcr.io/nvidia/tritonserver:<yy.mm>-py3) or pip install tensorrt on a GPU machine"
)
# What --dry-run prints for when no TensorRT is installed here.
DEFAULT_DRY_RUN_VERSION = "10"


class TensorRTMissingError(RuntimeError):
    """The ``tensorrt`` Python package is not importable here."""


class TensorRTError(RuntimeError):
    """A TensorRT call failed; the message is one line naming the step."""


def one_line(text: object) -> str:
    """TensorRT's messages (parser errors, binding exceptions) as a single line."""
    return " ".join(str(text).split())


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTMissingError(TRT_MISSING) from e
    return tensorrt


@dataclass(frozen=True)
class TensorRTPath:
    """How plans are built with this TensorRT, decided once from the module itself.

    Weak typing (the FP16 builder flag) where ``BuilderFlag.FP16`` exists; strong typing
    (FP16 decided in the ONNX graph) where it is gone, as in TensorRT 11. Deciding by the
    API rather than the version number keeps a 10.x build with the flag on the path that
    TensorRT release documents."""

    version: str
    strongly_typed: bool

    @property
    def major(self) -> int:
        head = self.version.split(".")[0]
        return int(head) if head.isdigit() else 0

    @property
    def typing(self) -> str:
        return "strong" if self.strongly_typed else "weak"

    @classmethod
    def detect(cls, trt) -> TensorRTPath:
        flags = getattr(trt, "BuilderFlag", None)
        return cls(str(getattr(trt, "__version__", "unknown")),
                   strongly_typed=not hasattr(flags, "FP16"))

    @classmethod
    def for_version(cls, version: str) -> TensorRTPath:
        """The path of a TensorRT that is not installed here (``--dry-run``)."""
        head = str(version).split(".")[0]
        if not head.isdigit():
            raise ValueError(f"TensorRT version must start with its major number, got "
                             f"{version!r}")
        return cls(str(version), strongly_typed=int(head) >= 11)

    def build_graph(self, precision: str) -> bool:
        """Whether the builder reads an FP16 graph made from the FP32 one."""
        return self.strongly_typed and precision == "fp16"


def installed_path() -> TensorRTPath | None:
    try:
        return TensorRTPath.detect(import_tensorrt())
    except TensorRTMissingError:
        return None


@dataclass
class PlanBuildOptions:
    precision: str = "fp16"  # "fp16" (FP16 + FP32 kernels) or "fp32" (TF32 off)
    workspace_gb: float | None = None  # None: TensorRT's default (all device memory)
    opt_level: int | None = None  # builder optimisation level 0..5; None: TensorRT's 3
    max_classes: int | None = None  # None: largest bucket, else the export's, else 16
    opt_classes: int | None = None  # single-profile opt N; None: min(4, max_classes)
    buckets: tuple[int, ...] = ()  # e.g. (1, 4, 16): one profile per bucket
    max_batch: int = 1  # backbone frames per call (>1: a profile over 1..max_batch frames)
    imgsz: int | None = None  # expected image size; checked against the ONNX graphs
    models: tuple[str, ...] = ()  # (): every graph of the export (mask_decoder too, if any)
    skip_verify: bool = False
    sample: Path | None = None  # .npz with real pixel_values / text_features / text_mask
    seed: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    version: int = 1  # model version directory in the repository
    verbose: bool = False

    def __post_init__(self) -> None:
        # Normalise what callers (CLI, repository builder, dicts) may pass loosely.
        self.buckets = parse_buckets(self.buckets)
        if isinstance(self.models, str):
            self.models = tuple(m.strip() for m in self.models.split(",") if m.strip())
        self.models = tuple(self.models)
        if isinstance(self.tolerances, Mapping):
            self.tolerances = Tolerances(**self.tolerances)
        if self.sample is not None:
            self.sample = Path(self.sample)

    @classmethod
    def coerce(cls, options: PlanBuildOptions | Mapping | object | None) -> PlanBuildOptions:
        """Accept options, a dict, or an argparse Namespace (unknown keys are ignored)."""
        if isinstance(options, cls):
            return options
        if options is None:
            values = {}
        elif isinstance(options, Mapping):
            values = dict(options)
        else:
            values = vars(options)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PlanBuildOptions:
        """The options `add_plan_arguments` put on the command line (and any
        `build-plans`-only ones present in `args`)."""
        return cls.coerce({
            **vars(args),
            "tolerances": Tolerances(min_cosine=args.min_cosine, max_abs_boxes=args.max_box_diff),
        })

    def resolved_max_classes(self, exported: int | None = None) -> int:
        """--max-classes, else the largest bucket, else the export's, else the default."""
        if self.max_classes is not None:
            return self.max_classes
        if self.buckets:
            return max(self.buckets)
        return exported or specs.DEFAULT_MAX_CLASSES

    def validate(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {self.precision!r}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise ValueError(f"opt level must be in 0..5, got {self.opt_level}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ValueError(f"workspace must be > 0 GB, got {self.workspace_gb}")
        unknown = set(self.models) - set(MODELS)
        if unknown:
            raise ValueError(f"models must be among {MODELS}, got {self.models}")

    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * (1 << 30))



@contextlib.contextmanager
def tensorrt_step(what: str, path: TensorRTPath) -> Iterator[None]:
    """Any exception a TensorRT call raises (the bindings raise TypeError, AttributeError,
    RuntimeError, ...) becomes one TensorRTError line naming the step and the version."""
    try:
        yield
    except (TensorRTError, TensorRTMissingError, VerificationError):
        raise
    except Exception as e:
        raise TensorRTError(f"TensorRT {path.version} ({path.typing}ly typed): {what}: "
                            f"{type(e).__name__}: {one_line(e)}") from e



def add_plan_arguments(ap: argparse.ArgumentParser, build_command: bool = False) -> None:
    """Plan options shared by `dart-triton build` and `dart-triton build-plans`."""
    what = "tensorrt: " if build_command else ""
    ap.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                    help=f"{what}plan precision (default %(default)s)")
    ap.add_argument("--workspace-gb", type=float, help=f"{what}builder workspace limit (GiB)")
    ap.add_argument("--opt-level", type=int,
                    help=f"{what}builder optimisation level 0..5 (TensorRT's default: 3)")
    ap.add_argument("--sample", type=Path,
                    help=f"{what}.npz of pixel_values/text_features/text_mask to verify with "
                         "(default: the packaged photograph and COCO class names)")
    ap.add_argument("--skip-verify", action="store_true",
                    help=f"{what}do not compare the plans with the FP32 reference")
    ap.add_argument("--min-cosine", type=float, default=Tolerances.min_cosine,
                    help=f"{what}verification bar for FPN features and logits "
                         "(default %(default)s)")
    ap.add_argument("--max-box-diff", type=float, default=Tolerances.max_abs_boxes,
                    help=f"{what}verification bar for pred_boxes, normalised units "
                         "(default %(default)s)")
    ap.add_argument("--verbose", action="store_true", help=f"{what}TensorRT INFO logging")

