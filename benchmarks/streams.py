"""Many cameras, one server: aggregate frames/s and per-frame latency of S concurrent
streams, with requests batched (--max-batch) and without.

Two repositories of one backend are built from the benchmark checkpoint, alike but for
`--max-batch B` (Triton's dynamic batcher on `backbone`, and on `enc_dec`, whose passes
then hold the prompts of several frames; B = the largest S) against `--max-batch 1`;
both give `dart` B instances, so as many frames are in flight either way. Each of S
streams is a camera with one frame in flight: it sends its own frames one after the
other. Reported per (S, N): aggregate frames/s, p50/p99 latency per frame, and Triton's
statistics of backbone and enc_dec (inferences and executions: fewer executions than
inferences means batches formed).

Goals: on a CPU, batching never lowers aggregate throughput by more than 5% and p99
stays within 1.5x of unbatched at S = 4 (compute is linear there: nothing to gain, only
the queue to lose); on a GPU (H200, 1008 px, FP16, torch), 8 streams x 1 class reach
>= 2x the unbatched frames/s and 8 x 4 classes >= 1.5x.

    python -m dart_triton.benchmarks.streams --config tiny --streams 1 2 4 8 \
        --classes 1 4 16 --max-classes 16
    python -m dart_triton.benchmarks.streams --config full --imgsz 1008 --gpu \
        --classes 1 4 --max-classes 16  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from dart_triton.benchmarks import common
from dart_triton.contract import specs

STUDY = "streams"
COLUMNS = ["backend", "batching", "streams", "n", "frames_per_s", "p50_ms", "p99_ms",
           "backbone_inferences", "backbone_executions", "enc_dec_inferences",
           "enc_dec_executions", "vs_unbatched", "goal"]


def repository(args: argparse.Namespace, imgsz: int, max_batch: int) -> Path:
    """A repository with `max_batch` frames per backbone call, built once (cached)."""
    from dart_triton.export.options import parse_instances
    from dart_triton.export.repository import build_repository

    checkpoint = common.checkpoint_for(args)
    where = "gpu" if args.gpu else "cpu"
    dart = max(args.streams)
    variant = f"-c{args.compile}" if args.gpu and args.backend == "torch" else ""
    variant += f"-k{args.buckets.replace(',', '_')}" if args.buckets else ""
    name = (f"repo-{checkpoint.name}-{imgsz}-m{args.max_classes}-{args.backend}-{where}"
            f"{variant}-b{max_batch}-d{args.batch_delay_us}-dart{dart}-shared")
    repo = common.cache_dir() / name
    if not (repo / "dart_repository.json").is_file():
        print(f"building {repo} (once) ...", flush=True)
        extra = {"gpu": True, "compile": args.compile, "cuda_graphs": True} if (
            args.gpu and args.backend == "torch") else {"gpu": args.gpu}
        build_repository(checkpoint, repo, backend=args.backend, imgsz=imgsz,
                         max_classes=args.max_classes, max_batch=max_batch,
                         batch_delay_us=args.batch_delay_us, buckets=args.buckets,
                         instances=parse_instances(f"dart={dart}"), **extra)
    return repo


def add_variant_args(p: argparse.ArgumentParser, compile_default: str) -> None:
    """--compile and --buckets: what `repository` builds besides --max-batch (shared with
    `batch_gain`, which measures this study's batched repository in process)."""
    p.add_argument("--compile", choices=("none", "default", "max-autotune"),
                   default=compile_default,
                   help="torch.compile mode of a --gpu torch repository (CUDA graphs either "
                        "way; none: captured eagerly, a start of seconds)")
    p.add_argument("--buckets", default="",
                   help="enc_dec prompt buckets, e.g. 1,4,16 (default: passes of "
                        "max-classes)")


@contextlib.contextmanager
def served(repo: Path) -> Iterator:
    from dart_triton.serving.server import TritonServer

    with TritonServer(repo, startup_timeout=1800) as server:
        yield server


def model_counts(client, model: str = specs.BACKBONE) -> tuple[int, int]:
    """(inferences, executions) of `model` so far, from Triton's statistics."""
    stats = client.get_inference_statistics(model, as_json=True)
    (entry,) = stats["model_stats"]
    return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))


def backbone_counts(client) -> tuple[int, int]:
    return model_counts(client, specs.BACKBONE)


def graph_counts(client) -> tuple[int, ...]:
    """backbone's, then enc_dec's (inferences, executions)."""
    return (*model_counts(client, specs.BACKBONE), *model_counts(client, specs.ENC_DEC))


def run_streams(url: str, frames: list[np.ndarray], names: list[str], streams: int,
                per_stream: int, counts: Callable[[], tuple[int, ...]]
                ) -> tuple[float, list[float], tuple[int, ...]]:
    """S threads, each a camera sending its frames one at a time; (seconds, latencies,
    the counts' growth over the timed frames)."""
    from dart_triton.client import DartClient

    warm, start = threading.Barrier(streams + 1), threading.Barrier(streams + 1)
    latencies, lock = [], threading.Lock()

    def camera(k: int) -> None:
        mine = []
        with DartClient(url, timeout=3600) as client:
            for frame in frames:  # connected, and warm for every size it will send
                client.detect(frame, names)
            warm.wait()
            start.wait()
            for i in range(per_stream):
                t0 = time.perf_counter()
                client.detect(frames[(k + i) % len(frames)], names)
                mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=camera, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    warm.wait()
    before = counts()  # after the warm-up frames, before the timed ones
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return seconds, latencies, tuple(a - b for a, b in zip(counts(), before, strict=True))


def one_round(args: argparse.Namespace, imgsz: int, max_batch: int,
              frames: list[np.ndarray]) -> dict[tuple[int, int], tuple]:
    """One run of every (N, S) on a fresh server: (N, S) -> (frames/s, latencies, counts)."""
    import tritonclient.grpc as grpcclient

    out = {}
    with served(repository(args, imgsz, max_batch)) as server:
        stats = grpcclient.InferenceServerClient(server.grpc_url)
        for n in args.classes:
            names = common.class_names(n)
            for s in args.streams:
                seconds, latencies, counts = run_streams(
                    server.grpc_url, frames, names, s, args.frames,
                    lambda: graph_counts(stats))
                out[n, s] = (s * args.frames / seconds, latencies, counts)
                print(f"  max-batch {max_batch} S={s} N={n}: {out[n, s][0]:.1f} frames/s",
                      flush=True)
    return out


def measure(args: argparse.Namespace, imgsz: int) -> list[dict]:
    """Rounds alternate between the two repositories, so that a slow spell of the machine
    (two shared cores drift by a third within minutes) falls on both alike; per (N, S):
    the median rate of the rounds, the latencies pooled."""
    image = common.test_image()
    frames = [np.ascontiguousarray(f) for f in
              (image, image[::2, ::2], image[:400, :300], image[::-1])]  # cameras differ
    batches = (1, max(args.streams))
    rounds: dict[int, list[dict]] = {b: [] for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            rounds[b].append(one_round(args, imgsz, b, frames))
    rows = []
    for b in batches:
        for n in args.classes:
            for s in args.streams:
                runs = [r[n, s] for r in rounds[b]]
                latencies = [x for run in runs for x in run[1]]
                rows.append({
                    "backend": args.backend, "batching": f"max-batch {b}", "streams": s,
                    "n": n, "frames_per_s": float(np.median([run[0] for run in runs])),
                    "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
                    "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
                    "backbone_inferences": sum(run[2][0] for run in runs),
                    "backbone_executions": sum(run[2][1] for run in runs),
                    "enc_dec_inferences": sum(run[2][2] for run in runs),
                    "enc_dec_executions": sum(run[2][3] for run in runs),
                    "vs_unbatched": "", "goal": ""})
    return rows


def compare(rows: list[dict], gpu: bool) -> None:
    """Batched rows against the unbatched row of the same (S, N), with the goals."""
    plain = {(r["streams"], r["n"]): r for r in rows if r["batching"] == "max-batch 1"}
    for r in rows:
        base = plain.get((r["streams"], r["n"]))
        if base is None or r is base:
            continue
        speed = r["frames_per_s"] / base["frames_per_s"]
        tail = r["p99_ms"] / base["p99_ms"]
        r["vs_unbatched"] = f"{speed:.2f}x frames/s, {tail:.2f}x p99"
        if gpu and r["streams"] == 8 and r["n"] in (1, 4):
            want = 2.0 if r["n"] == 1 else 1.5
            r["goal"] = f"≥ {want}x: " + ("met" if speed >= want else "missed")
        elif not gpu:
            ok = speed >= 0.95 and (r["streams"] != 4 or tail <= 1.5)
            r["goal"] = "≥ 0.95x" + (", p99 ≤ 1.5x" if r["streams"] == 4 else "") + (
                ": met" if ok else ": missed")


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = common.new_figure(ncols=2)
    for batching in sorted({r["batching"] for r in rows}):
        for n in sorted({r["n"] for r in rows}):
            mine = [r for r in rows if r["batching"] == batching and r["n"] == n]
            xs = [r["streams"] for r in mine]
            axes[0].plot(xs, [r["frames_per_s"] for r in mine], "o-", label=f"{batching}, N={n}")
            axes[1].plot(xs, [r["p99_ms"] for r in mine], "o-", label=f"{batching}, N={n}")
    for ax, what in zip(axes, ("aggregate frames/s", "p99 ms per frame"), strict=True):
        ax.set_xlabel("streams")
        ax.set_ylabel(what)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(1, 4))
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="concurrent streams S (default: %(default)s)")
    p.add_argument("--frames", type=int, default=40, help="frames per stream per run")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds per repository, alternating (median frames/s; latencies "
                        "pooled)")
    p.add_argument("--backend", choices=("python", "torch"), default="torch")
    p.add_argument("--batch-delay-us", type=int, default=0,
                   help="the batched repository's queue delay (default 0)")
    add_variant_args(p, compile_default="default")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find) both repositories and stop")
    common.add_repository_args(p)
    args = p.parse_args(argv)
    imgsz = common.resolve_imgsz(args)
    if args.build_only:
        for b in (1, max(args.streams)):
            print(repository(args, imgsz, b), flush=True)
        return 0
    rows = measure(args, imgsz)
    compare(rows, args.gpu)
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    where = "GPU" if args.gpu else "CPU"
    notes = (f"S streams, each one camera with one frame in flight, {args.frames} frames each "
             f"after a warm-up with each frame size it sends; {args.repeats} rounds per "
             "repository, each on a fresh server, alternating between the two (median "
             "frames/s, latencies pooled); "
             f"`dart` has {max(args.streams)} instances in both repositories. Counts are "
             "Triton's, for the timed frames: fewer executions than inferences means "
             "frames (backbone) or the prompts of several frames (enc_dec: shared passes, "
             "at most max-classes rows each) shared a call.")
    head = common.section_header("Many streams", command,
                                 f"{args.config} random-weight SAM3 at {imgsz}px, {where}, "
                                 f"{args.backend} backend", notes)
    stem = STUDY + ("_gpu" if args.gpu else "")  # the CPU and GPU tables side by side
    common.write_csv(rows, args.out / f"{stem}.csv")
    plot(rows, args.out / f"{stem}.png")
    body = (f"{head}\n{common.markdown_table(rows, COLUMNS, digits=1)}\n\n"
            f"{common.image_link(args, stem, 'Many streams')}\n")
    common.update_section(args.results, stem, body)
    print(common.markdown_table(rows, COLUMNS, digits=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
