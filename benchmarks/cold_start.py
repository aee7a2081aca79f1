"""Start to ready of a `--backend torch --compile` repository: compiled at load (before)
vs loaded from the ahead-of-time packages the build ships (`graphs.aot`).

One repository is built with `--compile`; each start is a fresh tritonserver with a fresh
compiler cache (`TORCHINDUCTOR_CACHE_DIR`, as on a new pod), timed from launch to
`/v2/health/ready`:

* compiled at load: the packages set aside, so each graph model runs `torch.compile` and
  warms up before it reports ready (what every start cost before);
* from the packages: the shipped machine code is loaded, nothing is compiled.

Goal on this CPU: the start from the packages at least 3x faster. On a GPU (`--gpu`, the
torch backend with FP16 and CUDA graphs): ≤ 20 s start to ready at 1008 px.

    python -m dart_triton.benchmarks.cold_start --config tiny
    python -m dart_triton.benchmarks.cold_start --config full --imgsz 1008 --gpu   # GPU
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from dart_triton.benchmarks import common
from dart_triton.contract import specs

STUDY = "cold_start"
COLUMNS = ["start", "seconds", "ratio", "goal"]
GOAL = 3.0


def build(args, imgsz: int, out: Path) -> tuple[Path, float]:
    from dart_triton.export.repository import build_repository

    start = time.perf_counter()
    extra = {"gpu": True, "cuda_graphs": True} if args.gpu else {}
    build_repository(common.checkpoint_for(args), out, backend="torch", imgsz=imgsz,
                     max_classes=args.max_classes, compile=args.compile, **extra)
    return out, time.perf_counter() - start


def time_start(repo: Path) -> float:
    """Seconds from launching tritonserver to ready, with an empty compiler cache."""
    from dart_triton.serving.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="dart-inductor-") as cache:
        start = time.perf_counter()
        with TritonServer(repo, startup_timeout=3600, env={"TORCHINDUCTOR_CACHE_DIR": cache}):
            return time.perf_counter() - start


def measure(args, imgsz: int) -> tuple[list[dict], float]:
    from dart_triton.graphs import aot
    from dart_triton.graphs.torch_graphs import weights_dir

    with tempfile.TemporaryDirectory(prefix="dart-cold-start-") as tmp:
        repo, build_s = build(args, imgsz, Path(tmp) / "repo")
        packaged = time_start(repo)
        print(f"  from the packages: {packaged:.1f} s", flush=True)
        aside = Path(tmp) / "aside"
        aside.mkdir()
        for name in specs.GRAPH_MODELS:  # compile at load, as before the packages
            weights = weights_dir(repo, name)
            shutil.move(aot.package_path(weights, name), aside / f"{name}.pt2")
        at_load = time_start(repo)
        print(f"  compiled at load: {at_load:.1f} s", flush=True)
    ratio = at_load / packaged
    goal = f"≥ {GOAL}x: " + ("met" if ratio >= GOAL else f"missed by {1 - ratio / GOAL:.0%}")
    rows = [
        {"start": "compiled at load (before)", "seconds": at_load, "ratio": 1.0, "goal": ""},
        {"start": "from the build's AOTInductor packages", "seconds": packaged,
         "ratio": ratio, "goal": goal},
    ]
    return rows, build_s


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0])
    p.add_argument("--compile", choices=("default", "max-autotune"), default="default")
    common.add_repository_args(p)
    args = p.parse_args(argv)
    imgsz = common.resolve_imgsz(args)
    rows, build_s = measure(args, imgsz)
    notes = (f"One `dart-triton build --backend torch --compile {args.compile}` repository "
             f"(build {build_s:.0f} s, compiling included); each start a fresh tritonserver "
             "with an empty TORCHINDUCTOR_CACHE_DIR, timed from launch to ready. ratio = "
             "compiled at load / from the packages.")
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    where = "GPU" if args.gpu else "CPU"
    model = f"{args.config} random-weight SAM3 at {imgsz}px, {where}"
    head = common.section_header("Cold start", command, model, notes)
    common.publish_table(args, STUDY, head, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
