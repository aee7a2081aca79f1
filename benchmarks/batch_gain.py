"""What batching frames can give at most: the served graph modules in process, per-frame
time of backbone and enc_dec alone and in batches of F frames.

The streams study measures what a batched server gains; this bounds it. The repository is
the streams study's batched one (same options, same cache): `backbone` at F frames per
call, `enc_dec` as shared passes of F frames x k prompts each (at most max-classes rows
a pass, padded to the warm prompt buckets, as served). Per frame, alone = backbone(1) +
enc_dec(1 frame); batched = (backbone(F) + enc_dec(F frames)) / F; their ratio is the
most that S = F streams can gain from batching on this device, whatever the server does
around the graphs.

    python -m dart_triton.benchmarks.batch_gain --config tiny --frames 1 2 4 8 --classes 1 4
    python -m dart_triton.benchmarks.batch_gain --config full --imgsz 1008 --gpu \
        --frames 1 2 4 8 --classes 1 4 --max-classes 16 --buckets 1,4,16 --compile none
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from dart_triton.benchmarks import common, streams
from dart_triton.contract import specs
from dart_triton.contract.passes import parse_buckets

STUDY = "batch_gain"
COLUMNS = ["frames", "n", "backbone_ms", "backbone_ms_per_frame", "passes", "enc_dec_ms",
           "enc_dec_ms_per_frame", "ms_per_frame", "bound_vs_alone"]


def timed(fn: Callable[[], object], iters: int, sync: Callable[[], None]) -> float:
    """Median milliseconds of `fn` (after one untimed call)."""
    fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def measure(args: argparse.Namespace, imgsz: int) -> list[dict]:
    import torch

    from dart_triton.graphs.torch_graphs import (
        TorchGraph,
        TorchSettings,
        example_inputs,
        weights_dir,
    )

    repo = streams.repository(args, imgsz, max(args.frames))
    device = torch.device("cuda" if args.gpu else "cpu")
    settings = TorchSettings(precision="fp16" if args.gpu else "fp32",
                             compile=args.compile if args.gpu else "none",
                             cuda_graphs=args.gpu)
    backbone = TorchGraph.from_weights(weights_dir(repo, specs.BACKBONE), specs.BACKBONE,
                                       device, settings)
    enc_dec = TorchGraph.from_weights(weights_dir(repo, specs.ENC_DEC), specs.ENC_DEC,
                                      device, settings)
    backbone.warm_up(args.frames)
    enc_dec.warm_up(parse_buckets(args.buckets), args.frames)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    dims = enc_dec.dims

    rows = []
    for n in args.classes:
        alone = None
        for f in args.frames:
            (pixels,) = example_inputs(specs.BACKBONE, dims, f, device)
            # As served: a pass holds at most max_classes rows, whole frames each.
            per_pass = max(1, dims.max_classes // n)
            passes = [example_inputs(specs.ENC_DEC, dims, k * n, device, frames=k)
                      for k in [per_pass] * (f // per_pass) + [f % per_pass] if k]
            bb = timed(lambda p=pixels: backbone(p), args.iters, sync)
            ed = timed(lambda xs=passes: [enc_dec(*x) for x in xs], args.iters, sync)
            per_frame = (bb + ed) / f
            alone = per_frame if f == 1 else alone
            rows.append({"frames": f, "n": n, "backbone_ms": bb, "backbone_ms_per_frame": bb / f,
                         "passes": len(passes), "enc_dec_ms": ed, "enc_dec_ms_per_frame": ed / f,
                         "ms_per_frame": per_frame,
                         "bound_vs_alone": f"{alone / per_frame:.2f}x" if alone else ""})
            print(f"  F={f} N={n}: backbone {bb:.2f} ms, enc_dec {ed:.2f} ms, "
                  f"{per_frame:.2f} ms per frame", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(1, 4), iters=20)
    p.add_argument("--frames", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="frames per call F (the first should be 1: the alone baseline)")
    streams.add_variant_args(p, compile_default="none")
    common.add_repository_args(p)
    args = p.parse_args(argv)
    # The streams study's batched repository: the same name, so one build serves both.
    args.streams, args.backend, args.batch_delay_us = [max(args.frames)], "torch", 0
    imgsz = common.resolve_imgsz(args)
    rows = measure(args, imgsz)
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    where = "GPU, FP16, CUDA graphs" if args.gpu else "CPU, FP32"
    notes = ("In process, no server: the most batching F frames can save per frame on this "
             "device (bound_vs_alone = alone / batched per-frame time). enc_dec runs F frames "
             "x N prompts as served: shared passes of at most max-classes rows, whole "
             "frames each, padded to the warm buckets; "
             f"median of {args.iters} calls after one.")
    head = common.section_header("What batching can give", command,
                                 f"{args.config} random-weight SAM3 at {imgsz}px, {where}",
                                 notes)
    stem = STUDY + ("_gpu" if args.gpu else "")
    common.write_csv(rows, args.out / f"{stem}.csv")
    body = f"{head}\n{common.markdown_table(rows, COLUMNS, digits=2)}\n"
    common.update_section(args.results, stem, body)
    print(common.markdown_table(rows, COLUMNS, digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
