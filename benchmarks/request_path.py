"""Where a served request's time goes: `dart`'s own step timers beside Triton's per-model
statistics, and the served latency against the same graphs in process.

For each backend (python: ONNX Runtime graphs; torch: the PyTorch modules) a repository is
built from the benchmark checkpoint and served; for each class count N, sequential
requests go to `dart` and `dart_ensemble` (median client latency), and the difference of
the metrics before and after gives, per request:

* `dart`'s steps (`dart_step_seconds_total` / `dart_step_calls_total`, `contract.metrics`):
  read, preprocess, backbone, text_encoder, enc_dec, select, respond; a BLS step includes
  the called model's queue and compute time;
* each model's time inside Triton (`get_inference_statistics`: queue + compute).

Goals on a CPU with the tiny model (graph compute is small there, so the fixed cost of
serving shows): `dart` ≤ 2.0x in process at N = 1 and 4, `dart_ensemble` ≤ 2.5x.

    python -m dart_triton.benchmarks.request_path --config tiny --classes 1 4
    python -m dart_triton.benchmarks.request_path --config full --imgsz 1008 --gpu  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from dart_triton.benchmarks import common
from dart_triton.contract import specs
from dart_triton.contract.metrics import STEP_CALLS, STEP_SECONDS, STEPS

STUDY = "request_path"
COLUMNS = ["backend", "n", "path", "ms", "ratio", "goal"]
STEP_COLUMNS = ["backend", "n", "where", "what", "ms_per_request", "calls_per_request"]
GOALS = {specs.DART: 2.0, specs.DART_ENSEMBLE: 2.5}
ENTRIES = (specs.DART, specs.DART_ENSEMBLE)


def repository(args: argparse.Namespace, backend: str, imgsz: int) -> Path:
    """A repository of `backend` for the benchmark checkpoint, built once (cached)."""
    from dart_triton.export.repository import build_repository

    checkpoint = common.checkpoint_for(args)
    where = "gpu" if args.gpu else "cpu"
    name = f"repo-{checkpoint.name}-{imgsz}-m{args.max_classes}-{backend}-{where}"
    repo = common.cache_dir() / name
    if not (repo / "dart_repository.json").is_file():
        print(f"building {repo} (once) ...", flush=True)
        extra = {"gpu": True, "compile": "default", "cuda_graphs": True} if (
            args.gpu and backend == "torch") else {"gpu": args.gpu}
        build_repository(checkpoint, repo, backend=backend, imgsz=imgsz,
                         max_classes=args.max_classes, **extra)
    return repo


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    """(metric, step) -> value, for dart's step metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = re.match(r'(dart_step_\w+)\{.*step="(\w+)".*\} (\S+)$', line)
        if m:
            key = (m.group(1), m.group(2))
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def model_stats(client) -> dict[str, tuple[int, float]]:
    """model -> (inferences, queue + compute seconds) from Triton's statistics."""
    stats = client.get_inference_statistics(as_json=True)
    out = {}
    for m in stats.get("model_stats", []):
        inf = m.get("inference_stats", {})
        ns = sum(int(inf.get(k, {}).get("ns", 0)) for k in
                 ("queue", "compute_input", "compute_infer", "compute_output"))
        out[m["name"]] = (int(m.get("inference_count", 0)), ns / 1e9)
    return out


@contextlib.contextmanager
def served(repo: Path) -> Iterator:
    from dart_triton.serving.server import TritonServer

    with TritonServer(repo, startup_timeout=1800) as server:
        yield server


def in_process(args: argparse.Namespace, backend: str, imgsz: int):
    """The same graphs in this process: ONNX Runtime (python) or PyTorch (torch)."""
    from dart_triton.benchmarks.serving import graphs_dir
    from dart_triton.pipeline.detectors import DartPipeline

    checkpoint = common.checkpoint_for(args)
    onnx = graphs_dir(checkpoint, imgsz, args.max_classes) if backend == "python" else None
    return DartPipeline.from_checkpoint(checkpoint, imgsz, args.max_classes, onnx_dir=onnx)


def measure_backend(args: argparse.Namespace, backend: str, imgsz: int
                    ) -> tuple[list[dict], list[dict]]:
    import tritonclient.grpc as grpcclient

    from dart_triton.client import DartClient

    image = common.test_image()
    latency, steps = [], []
    times: dict[tuple[int, str], float] = {}
    with served(repository(args, backend, imgsz)) as server:
        stats_client = grpcclient.InferenceServerClient(server.grpc_url)
        for entry in ENTRIES:
            with DartClient(server.grpc_url, "grpc", entry, timeout=3600) as client:
                for n in args.classes:
                    if entry == specs.DART_ENSEMBLE and n > args.max_classes:
                        continue
                    names = common.class_names(n)
                    for _ in range(args.warmup):
                        client.detect(image, names)
                    before, triton0 = scrape(server.metrics_url), model_stats(stats_client)
                    timing = common.time_call(lambda c=client, k=names: c.detect(image, k),
                                              args.iters, 0)
                    after, triton1 = scrape(server.metrics_url), model_stats(stats_client)
                    times[n, entry] = timing.median_ms
                    print(f"  {backend} N={n} {entry}: {timing.median_ms:.1f} ms", flush=True)
                    if entry == specs.DART:
                        steps += step_rows(backend, n, args.iters, before, after)
                    steps += triton_rows(backend, n, entry, args.iters, triton0, triton1)
    pipeline = in_process(args, backend, imgsz)  # the server is down: the cores are its
    for n in args.classes:
        names = common.class_names(n)
        base = common.time_call(lambda k=names: pipeline.detect(image, k), args.iters,
                                args.warmup).median_ms
        print(f"  {backend} N={n} in process: {base:.1f} ms", flush=True)
        latency.append({"backend": backend, "n": n, "path": "in process", "ms": base,
                        "ratio": 1.0, "goal": ""})
        for entry in ENTRIES:
            if (n, entry) in times:
                ratio = times[n, entry] / base
                goal = GOALS[entry]
                latency.append({"backend": backend, "n": n, "path": entry,
                                "ms": times[n, entry], "ratio": ratio,
                                "goal": f"≤ {goal}x: " + ("met" if ratio <= goal else
                                                          f"missed by {ratio / goal - 1:.0%}")})
    return latency, steps


def step_rows(backend: str, n: int, requests: int, before: dict, after: dict) -> list[dict]:
    rows = []
    for step in STEPS:
        seconds = after.get((STEP_SECONDS, step), 0.0) - before.get((STEP_SECONDS, step), 0.0)
        calls = after.get((STEP_CALLS, step), 0.0) - before.get((STEP_CALLS, step), 0.0)
        rows.append({"backend": backend, "n": n, "where": "dart step", "what": step,
                     "ms_per_request": 1e3 * seconds / requests,
                     "calls_per_request": calls / requests})
    return rows


def triton_rows(backend: str, n: int, entry: str, requests: int, before: dict,
                after: dict) -> list[dict]:
    rows = []
    for model in sorted(after):
        count = after[model][0] - before.get(model, (0, 0.0))[0]
        seconds = after[model][1] - before.get(model, (0, 0.0))[1]
        if count:
            rows.append({"backend": backend, "n": n, "where": f"Triton, via {entry}",
                         "what": model, "ms_per_request": 1e3 * seconds / requests,
                         "calls_per_request": count / requests})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(1, 4), iters=20)
    p.add_argument("--backends", nargs="+", default=["python", "torch"],
                   choices=("python", "torch"), help="repositories to serve (default: both)")
    common.add_repository_args(p)
    args = p.parse_args(argv)
    imgsz = common.resolve_imgsz(args)
    latency, steps = [], []
    for backend in args.backends:
        rows, step = measure_backend(args, backend, imgsz)
        latency += rows
        steps += step
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    notes = (f"Sequential requests over gRPC, median client latency of {args.iters} after "
             f"{args.warmup} warm-up; in process: `DartPipeline` on the same graphs (ONNX "
             "Runtime for python, PyTorch for torch). Steps: mean ms per request from the "
             "metrics' differences; a BLS step holds the called model's queue and compute "
             "time, and backbone ∥ text_encoder overlap.")
    where = "GPU" if args.gpu else "CPU"
    model = f"{args.config} random-weight SAM3 at {imgsz}px, {where}"
    head = common.section_header("Request path", command, model, notes)
    common.write_csv(latency, args.out / f"{STUDY}.csv")
    common.write_csv(steps, args.out / f"{STUDY}_steps.csv")
    body = (f"{head}\n{common.markdown_table(latency, COLUMNS, digits=2)}\n\n"
            f"{common.markdown_table(steps, STEP_COLUMNS, digits=2)}\n")
    common.update_section(args.results, STUDY, body)
    print(common.markdown_table(latency, COLUMNS, digits=2))
    print(common.markdown_table(steps, STEP_COLUMNS, digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
