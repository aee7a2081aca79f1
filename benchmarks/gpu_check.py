"""The torch backend served by Triton against the same modules in process, with the goals.

For one `--backend torch` repository: starts tritonserver on it (compilation and CUDA-graph
capture happen while it loads), runs the class-scaling study against it (perf_analyzer,
concurrency 1 and 2), times `dart` from a client (one frame in flight, then two), reads
where enc_dec's inputs arrived (`dart_graph_inputs_total`: GPU-resident or not), stops
the server, then runs the same modules in this process the way `dart` runs them
(preprocessing on the device, backbone ∥ text, enc_dec passes, `select`) and times the
backbone alone. Writes the section ``<stem>`` with the goals of issue 13 (1008 px, FP16,
on a GPU): backbone ≤ 12 ms, ≥ 40 frames/s at 4 classes with 2 in flight, 2 in flight
≥ 1.10x one, served within 1.10x of in process.

    python -m dart_triton.benchmarks.gpu_check --repo REPO [--stem gpu_check_1008]
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np

from dart_triton.benchmarks import class_scaling, common
from dart_triton.contract import specs

STUDY = "gpu_check"
# Issue 13's goals (1008 px, FP16, H100): (key, label, target, higher is better)
GOALS = (
    ("backbone_ms", "backbone, in process (ms)", 12.0, False),
    ("served_pipe_fps", "served, 4 classes, 2 in flight (frames/s)", 40.0, True),
    ("pipe_gain", "2 in flight / 1 in flight", 1.10, True),
    ("served_over_inprocess", "served / in process, ms per frame, 1 in flight", 1.10, False),
)
SERVER_ARGS = [
    "--exit-timeout-secs=10",
    # GPU tensors between python models travel through Triton's CUDA memory pool
    # (64 MB by default): 1008 px pixels are 12 MB, features 5 MB, 2+ frames in flight.
    "--cuda-memory-pool-byte-size=0:1073741824",
]


def repository_facts(repo: Path) -> dict:
    """imgsz, max_classes, buckets, GPU or not, torch settings: from the generated configs."""
    def params(model: str) -> dict[str, str]:
        text = (repo / model / "config.pbtxt").read_text()
        return dict(re.findall(r'key: "([^"]+)"\n  value \{ string_value: "([^"]*)" \}', text))

    backbone = params(specs.BACKBONE)
    if "precision" not in backbone:
        raise SystemExit(f"{repo} is not a --backend torch repository")
    dart = params(specs.DART)
    gpu = "KIND_GPU" in (repo / specs.BACKBONE / "config.pbtxt").read_text()
    return {"imgsz": int(dart["imgsz"]), "max_classes": int(dart["max_classes"]),
            "buckets": [int(b) for b in dart.get("enc_dec_buckets", "").split(",") if b],
            "gpu": gpu, "precision": backbone["precision"], "compile": backbone["compile"],
            "cuda_graphs": backbone["cuda_graphs"] == "yes"}


def graph_inputs(metrics_url: str) -> dict[str, float]:
    """enc_dec's fpn_features arrivals by memory kind (cpu/gpu)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {"cpu": 0.0, "gpu": 0.0}
    for line in text.splitlines():
        if line.startswith("dart_graph_inputs_total{") and 'model="enc_dec"' in line \
                and 'input="fpn_features"' in line:
            memory = re.search(r'memory="(\w+)"', line).group(1)
            out[memory] = float(line.rsplit(" ", 1)[1])
    return out


def served_timing(grpc_url: str, names: list[str], iters: int) -> tuple[float, float]:
    """(ms per frame with 1 in flight, frames/s with 2 in flight) through `dart`."""
    from dart_triton.client import DartClient

    image = common.test_image()
    with DartClient(grpc_url) as client:
        seq = common.time_call(lambda: client.detect(image, names), iters=iters, warmup=2)
        frames = [image] * max(4, iters)
        list(client.detect_stream(frames[:4], names, in_flight=2))  # warm the pair
        t0 = time.perf_counter()
        done = sum(1 for _ in client.detect_stream(frames, names, in_flight=2))
        pipe_fps = done / (time.perf_counter() - t0)
    return seq.median_ms, pipe_fps


def in_process_timing(repo: Path, facts: dict, names: list[str], iters: int) -> dict:
    """The served modules in this process, run the way `dart` runs them."""
    import torch

    from dart_triton.contract.passes import plan_passes
    from dart_triton.graphs.torch_graphs import TorchGraphs, TorchSettings
    from dart_triton.model.postprocess import select
    from dart_triton.model.preprocess import preprocess_tensor
    from dart_triton.model.text_encoder import TextEncoder
    from dart_triton.pipeline.detectors import InProcessRunner
    from dart_triton.pipeline.orchestration import run_graphs, run_sync

    device = "cuda" if facts["gpu"] and torch.cuda.is_available() else "cpu"
    settings = TorchSettings(precision=facts["precision"], compile=facts["compile"],
                             cuda_graphs=facts["cuda_graphs"])
    graphs = TorchGraphs.from_repository(repo, device, settings, facts["buckets"])
    text = TextEncoder.from_pretrained(repo / "text_encoder" / "1" / "text_encoder",
                                       device=device)
    runner = InProcessRunner(graphs, text)
    image = common.test_image()
    passes = plan_passes(len(names), facts["max_classes"], facts["buckets"])
    sync = torch.cuda.synchronize if device == "cuda" else None

    @torch.no_grad()
    def frame():
        pixels = preprocess_tensor(torch.from_numpy(image).to(device), facts["imgsz"])
        head = run_sync(run_graphs(runner, pixels, names, passes))
        return select(*head.detection, np.array(image.shape[:2]))

    pixels = preprocess_tensor(torch.from_numpy(image).to(device), facts["imgsz"])
    backbone = common.time_call(lambda: graphs.backbone(pixels), iters=iters, warmup=3,
                                sync=sync)
    whole = common.time_call(frame, iters=iters, warmup=2, sync=sync)
    return {"device": device, "backbone_ms": backbone.median_ms, "inprocess_ms": whole.median_ms}


def verdicts(row: dict, facts: dict) -> list[dict]:
    """Each goal met or missed (and by how much); goals hold for 1008 px FP16 on a GPU."""
    applies = facts["gpu"] and facts["imgsz"] == 1008 and facts["precision"] == "fp16"
    out = []
    for key, label, target, higher in GOALS:
        value = row.get(key, float("nan"))
        ok = value >= target if higher else value <= target
        if not applies:
            verdict = "n/a (goals are for 1008 px FP16 on a GPU)"
        elif value != value:
            verdict = "not measured"
        elif ok:
            verdict = "met"
        else:
            verdict = f"missed by {abs(value - target) / target * 100:.0f}%"
        out.append({"goal": label, "target": f"{'≥' if higher else '≤'} {target:g}",
                    "measured": value, "verdict": verdict})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m dart_triton.benchmarks.{STUDY}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, required=True, help="a --backend torch repository")
    p.add_argument("--classes", type=int, default=4, help="classes for the timed frames")
    p.add_argument("--iters", type=int, default=20, help="timed frames (median reported)")
    p.add_argument("--scaling", type=int, nargs="*", default=[1, 2, 4, 8, 16, 80],
                   help="class counts for the class-scaling study (none: skip it)")
    p.add_argument("--scaling-iters", type=int, default=4,
                   help="requests per perf_analyzer window in the class-scaling study")
    p.add_argument("--stability", type=float, default=100,
                   help="class scaling: perf_analyzer --stability-percentage (see there)")
    p.add_argument("--stem", default=STUDY, help="RESULTS.md section key and CSV stem")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="CSV/PNG directory")
    p.add_argument("--results", type=Path, default=common.DEFAULT_RESULTS,
                   help="markdown results file")
    p.add_argument("--config", choices=("full", "tiny"), default="full",
                   help="which random SAM3 the repository was built from (for the record)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="where the tritonserver log goes (default: --out)")
    p.add_argument("--startup-timeout", type=float, default=900,
                   help="seconds for the server to load (compilation and capture included)")
    args = p.parse_args(argv)
    from dart_triton.serving.server import TritonServer

    repo = args.repo.resolve()
    facts = repository_facts(repo)
    names = common.class_names(args.classes)
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    info = common.machine_info()
    row: dict = {"imgsz": facts["imgsz"], "classes": args.classes}
    t0 = time.perf_counter()
    log_dir = args.log_dir or args.out
    log_dir.mkdir(parents=True, exist_ok=True)
    with TritonServer(repo, startup_timeout=args.startup_timeout, extra_args=SERVER_ARGS,
                      log_path=log_dir / f"{args.stem}-tritonserver.log") as server:
        row["load_s"] = time.perf_counter() - t0
        print(f"{STUDY}: served after {row['load_s']:.0f} s (compile/capture included)",
              flush=True)
        row["served_seq_ms"], row["served_pipe_fps"] = served_timing(
            server.grpc_url, names, args.iters)
        row["served_seq_fps"] = 1e3 / row["served_seq_ms"]
        row["pipe_gain"] = row["served_pipe_fps"] / row["served_seq_fps"]
        arrivals = graph_inputs(server.metrics_url)
        row["enc_dec_features_on_gpu"] = arrivals["gpu"]
        row["enc_dec_features_on_cpu"] = arrivals["cpu"]
        if args.scaling:
            class_scaling.main([
                "--url", server.grpc_url, "--http-url", server.http_url,
                "--classes", *map(str, args.scaling), "--iters", str(args.scaling_iters),
                "--stability", str(args.stability),
                "--stem", f"class_scaling_{args.stem}", "--out", str(args.out),
                "--results", str(args.results), "--config", args.config,
                "--imgsz", str(facts["imgsz"])])
    # The served figures are on record before the in-process run compiles again.
    write_results(args, row, facts, command, info)
    row.update(in_process_timing(repo, facts, names, args.iters))
    row["served_over_inprocess"] = row["served_seq_ms"] / row["inprocess_ms"]
    goals = write_results(args, row, facts, command, info)
    print(common.markdown_table(goals, ["goal", "target", "measured", "verdict"], digits=2))
    return 0


def write_results(args: argparse.Namespace, row: dict, facts: dict, command: str,
                  info) -> list[dict]:
    """The CSV and the RESULTS.md section of this run, with the goals' verdicts."""
    common.write_csv([row], args.out / f"{args.stem}.csv")
    goals = verdicts(row, facts)
    settings = (f"{facts['precision']}, compile {facts['compile']}, CUDA graphs "
                f"{'on' if facts['cuda_graphs'] else 'off'}, buckets {facts['buckets'] or '-'}, "
                f"max {facts['max_classes']} prompts per pass")
    resident = ("yes: every enc_dec call got fpn_features in GPU memory"
                if row["enc_dec_features_on_gpu"] and not row["enc_dec_features_on_cpu"]
                else f"no: enc_dec got fpn_features {row['enc_dec_features_on_cpu']:.0f} times "
                     f"in host memory, {row['enc_dec_features_on_gpu']:.0f} times in GPU memory")
    notes = (f"`--backend torch` repository ({'GPU' if facts['gpu'] else 'CPU'}; {settings}). "
             f"Served: `dart` over gRPC from one client, {args.iters} frames (median) with one "
             f"in flight, then {max(4, args.iters)} frames with two in flight; in process: "
             "the same modules, preprocessing on the device, backbone ∥ text, enc_dec "
             "passes and `select`, as `dart` runs them, without Triton. Backbone: the "
             f"module alone, synchronised. Load: server start to ready. GPU-resident "
             f"hand-offs: {resident}. Class scaling: section `class_scaling_{args.stem}`.")
    body = (common.section_header(f"GPU check, torch backend, {facts['imgsz']} px",
                                  command, json.dumps(facts), notes, info)
            + "\n" + common.markdown_table([row], digits=2) + "\n\n"
            + common.markdown_table(goals, ["goal", "target", "measured", "verdict"],
                                    digits=2) + "\n")
    common.update_section(args.results, args.stem, body)
    return goals


if __name__ == "__main__":
    raise SystemExit(main())
