"""Serving overhead: in-process `DartPipeline` (ONNX Runtime) vs Triton `dart` (BLS) over
gRPC vs `dart_ensemble`, same image, classes and ONNX graphs; sequential requests.

Target: served within 1.15x of in-process.

    python -m dart_triton.benchmarks.serving_overhead --classes 4 16
"""

from __future__ import annotations

from pathlib import Path

from dart_triton.benchmarks import common, serving

STUDY = "serving_overhead"
COLUMNS = ["n", "path", "ms", "ratio", "target"]
TARGET = 1.15


def in_process(args, imgsz: int, max_classes: int):
    from dart_triton.pipeline.detectors import DartPipeline

    checkpoint = common.checkpoint_for(args)
    onnx = serving.graphs_dir(checkpoint, imgsz, max_classes)
    return DartPipeline.from_checkpoint(checkpoint, imgsz, max_classes, onnx_dir=onnx)


def measure(args, imgsz: int) -> tuple[list[dict], str]:
    from dart_triton.client import DartClient

    image = common.test_image()
    rows: list[dict] = []
    with serving.served(args, imgsz) as served:
        from dart_triton.benchmarks.class_scaling import max_classes_of

        max_classes = max_classes_of(served.http_url)
        times: dict[tuple[int, str], float] = {}
        for entry in ("dart", "dart_ensemble"):
            with DartClient(served.grpc_url, "grpc", entry, timeout=3600) as client:
                for n in args.classes:
                    if entry == "dart_ensemble" and n > max_classes:
                        continue  # one enc_dec step: cannot chunk
                    names = common.class_names(n)
                    times[n, entry] = common.time_call(lambda c=client, k=names: c.detect(
                        image, k), args.iters, args.warmup).median_ms
                    print(f"  N={n} {entry}: {times[n, entry]:.1f} ms", flush=True)
    # The server is down now: the in-process pipeline gets the cores to itself, as it did.
    pipeline = in_process(args, imgsz, max_classes)
    for n in args.classes:
        names = common.class_names(n)
        base = common.time_call(lambda k=names: pipeline.detect(image, k), args.iters,
                                args.warmup).median_ms
        print(f"  N={n} in-process: {base:.1f} ms", flush=True)
        rows.append({"n": n, "path": "in-process DartPipeline (ORT)", "ms": base, "ratio": 1.0,
                     "target": ""})
        for entry, label in (("dart", "Triton dart (BLS), gRPC"),
                             ("dart_ensemble", "Triton dart_ensemble, gRPC")):
            if (n, entry) in times:
                ratio = times[n, entry] / base
                rows.append({"n": n, "path": label, "ms": times[n, entry], "ratio": ratio,
                             "target": "met" if ratio <= TARGET else
                             f"MISSED by {100 * (ratio - TARGET):.0f} pts"})
    return rows, f"max {max_classes} prompts per enc_dec pass"


def plot(rows: list[dict], path: Path) -> Path:
    fig, (ax,) = common.new_figure(width=6)
    ns = sorted({r["n"] for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    width = 0.8 / len(paths)
    for i, name in enumerate(paths):
        xs = [j + i * width for j, n in enumerate(ns) if any(r["n"] == n and r["path"] == name
                                                             for r in rows)]
        ys = [r["ratio"] for n in ns for r in rows if r["n"] == n and r["path"] == name]
        ax.bar(xs, ys, width, label=name)
    ax.axhline(TARGET, color="k", ls="--", lw=0.8, label=f"{TARGET}x target")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ns))], [f"N={n}" for n in ns])
    ax.set_ylabel("latency / in-process")
    ax.legend(fontsize=7)
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(4, 16), iters=5)
    serving.add_server_args(p)
    args = p.parse_args(argv)
    imgsz = common.resolve_imgsz(args)
    rows, extra = measure(args, imgsz)
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    notes = (f"Sequential requests, median of {args.iters} after {args.warmup} warm-up; the "
             "same ONNX graphs in both (ORT inside Triton's python backend vs in process); "
             f"{extra}. ratio = served / in-process; target ≤ {TARGET}x.")
    model = f"{args.config} random-weight SAM3 at {imgsz}px"
    head = common.section_header("Serving overhead", command, model, notes)
    common.write_csv(rows, args.out / f"{STUDY}.csv")
    plot(rows, args.out / f"{STUDY}.png")
    table = common.markdown_table(rows, COLUMNS, digits=2)
    common.update_section(args.results, STUDY, f"{head}\n{table}\n\n"
                          f"{common.image_link(args, STUDY, 'serving overhead')}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
