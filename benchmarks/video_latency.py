"""Video latency through the server, the paper's protocol (DART §4.1): frames/s on traffic video.

The paper times 100 frames after a 10-frame warm-up, averaged over 5 runs, on VisDrone-VID
traffic clips. Here every class count N (default 1, 2, 4, 8) and every number of frames in
flight K (default 1, 2, 4) gets ``--runs`` runs; each run warms up on ``--warmup`` frames,
then times ``--frames`` frames sent through `DartClient.detect_stream` (K requests in
flight, results in frame order) and reports frames/s. Frames are decoded beforehand, so
the figure is the server pipeline's (request encoding, gRPC, Triton, every model), not the
decoder's. Without ``--clip``, a synthetic traffic clip is generated: vehicles (boxes with
windows) crossing a road in both directions at several speeds and sizes.

    python -m dart_triton.benchmarks.video_latency --frames 100 --warmup 10 --runs 5
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dart_triton.benchmarks import common, serving

STUDY = "video_latency"
COLUMNS = ["classes", "in_flight", "runs", "fps_min", "fps_median", "fps_max", "ms_per_frame"]


# --- the synthetic traffic clip -------------------------------------------------------------
@dataclass(frozen=True)
class Vehicle:
    lane: int
    length: int  # pixels along the road
    width: int
    speed: float  # pixels per frame; negative: right to left
    offset: float  # position at frame 0
    colour: tuple[int, int, int]


def _road(width: int, height: int, lanes: int) -> tuple[np.ndarray, list[int]]:
    """Grass, asphalt, dashed lane lines; the centre row of each lane."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (86, 124, 70)  # verge
    top, bottom = height // 5, height - height // 5
    img[top:bottom] = (72, 72, 76)  # asphalt
    rng = np.random.default_rng(7)
    noise = rng.integers(-6, 7, (bottom - top, width, 1))
    img[top:bottom] = np.clip(img[top:bottom].astype(int) + noise, 0, 255).astype(np.uint8)
    lane_h = (bottom - top) / lanes
    for k in range(1, lanes):
        y = int(top + k * lane_h)
        solid = k == lanes // 2  # the centre line between the two directions
        for x in range(0, width, 40):
            if solid or (x // 40) % 2 == 0:
                img[y - 1 : y + 2, x : x + (40 if solid else 22)] = (230, 230, 220)
    img[top - 3 : top] = img[bottom : bottom + 3] = (235, 235, 235)
    return img, [int(top + (k + 0.5) * lane_h) for k in range(lanes)]


def traffic_vehicles(width: int, height: int, lanes: int = 4, count: int = 10,
                     seed: int = 0) -> list[Vehicle]:
    """Cars, vans and trucks: upper lanes drive right, lower lanes left, speeds 1-5% of width."""
    rng = np.random.default_rng(seed)
    lane_h = (height - 2 * (height // 5)) / lanes
    palette = [(200, 30, 30), (240, 240, 240), (30, 60, 160), (20, 20, 20), (230, 180, 40),
               (60, 140, 70), (150, 150, 160)]
    vehicles = []
    for i in range(count):
        lane = i % lanes
        kind = rng.choice(3, p=[0.6, 0.25, 0.15])  # car, van, truck
        length = int(lane_h * (1.3, 1.8, 3.0)[kind] * rng.uniform(0.9, 1.1))
        wide = int(lane_h * (0.55, 0.65, 0.75)[kind])
        speed = width * rng.uniform(0.01, 0.05) * (1 if lane < lanes // 2 else -1)
        colour = tuple(int(c) for c in palette[rng.integers(len(palette))])
        vehicles.append(Vehicle(lane, length, wide, float(speed),
                                float(rng.uniform(0, width + length)), colour))  # type: ignore[arg-type]
    return vehicles


def vehicle_box(v: Vehicle, frame: int, width: int, centres: list[int]) -> tuple[int, ...]:
    """xyxy of vehicle ``v`` at ``frame`` (unclipped; vehicles wrap round the frame)."""
    span = width + v.length
    x = round((v.offset + v.speed * frame) % span - v.length)
    y = centres[v.lane] - v.width // 2
    return x, y, x + v.length, y + v.width


def traffic_frames(frames: int, width: int = 640, height: int = 360, *, lanes: int = 4,
                   vehicles: int = 10, seed: int = 0) -> Iterator[np.ndarray]:
    """RGB frames of the synthetic traffic scene, deterministic for a seed."""
    road, centres = _road(width, height, lanes)
    fleet = traffic_vehicles(width, height, lanes, vehicles, seed)
    for f in range(frames):
        img = road.copy()
        for v in fleet:
            x1, y1, x2, y2 = vehicle_box(v, f, width, centres)
            a, b = max(x1, 0), min(x2, width)
            if a >= b:
                continue
            img[y1:y2, a:b] = v.colour
            # Windscreen and roof: a darker band a quarter from the front.
            front = x2 - v.length // 4 if v.speed > 0 else x1 + v.length // 4
            wa, wb = sorted((front, front - np.sign(v.speed) * max(2, v.length // 8)))
            wa, wb = max(int(wa), 0), min(int(wb), width)
            if wa < wb:
                img[y1 + 2 : y2 - 2, wa:wb] = (40, 50, 60)
        yield img


def write_clip(path: Path, frames: Iterator[np.ndarray], fps: float = 25.0) -> Path:
    """An H.264 MP4 of ``frames``."""
    from dart_triton.client.streams import Mp4Sink

    sink = Mp4Sink(Path(path), fps)
    try:
        for image in frames:
            sink.write(image)
    finally:
        sink.close()
    return Path(path)


def load_frames(clip: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` frames of ``clip``, decoded once (the clip loops if shorter)."""
    from dart_triton.client.streams import open_source

    frames: list[np.ndarray] = []
    with open_source(clip) as source:
        for frame in source:
            frames.append(frame.image)
            if len(frames) == count:
                break
    if not frames:
        raise SystemExit(f"{clip}: no frame could be decoded")
    return [frames[i % len(frames)] for i in range(count)]


# --- the protocol ---------------------------------------------------------------------------
def run_once(client, frames: list[np.ndarray], classes: list[str], in_flight: int,
             warmup: int) -> float:
    """Frames/s of ``frames[warmup:]`` after ``frames[:warmup]`` went through untimed."""
    if warmup:
        for _ in client.detect_stream(frames[:warmup], classes, in_flight=in_flight):
            pass
    timed = frames[warmup:]
    start = time.perf_counter()
    for _ in client.detect_stream(timed, classes, in_flight=in_flight):
        pass
    return len(timed) / (time.perf_counter() - start)


def summarise(n: int, k: int, fps: list[float]) -> dict:
    median = statistics.median(fps)
    return {"classes": n, "in_flight": k, "runs": len(fps), "fps_min": min(fps),
            "fps_median": median, "fps_max": max(fps), "ms_per_frame": 1e3 / median}


def plot(rows: list[dict], path: Path) -> Path:
    fig, (ax,) = common.new_figure(width=6.5)
    for k in sorted({r["in_flight"] for r in rows}):
        pts = [r for r in rows if r["in_flight"] == k]
        xs = [r["classes"] for r in pts]
        med = np.array([r["fps_median"] for r in pts])
        err = [med - [r["fps_min"] for r in pts], [r["fps_max"] for r in pts] - med]
        ax.errorbar(xs, med, yerr=err, fmt="o-", capsize=3,
                    label=f"{k} frame{'s' if k > 1 else ''} in flight")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("classes N")
    ax.set_ylabel("frames/s (median; bars: min-max over runs)")
    ax.legend(fontsize=8)
    return common.save_figure(fig, path)


def report(rows: list[dict], args, command: str, model: str, clip: str, size: str) -> str:
    notes = (f"Protocol (DART §4.1): {args.iters} run(s) per setting, each {args.warmup} "
             f"warm-up frame(s) then {args.frames} timed frame(s) of {clip} ({size}), sent "
             "through `DartClient.detect_stream` over gRPC with K requests in flight, results "
             "in frame order; frames decoded beforehand. The paper's protocol is "
             "`--frames 100 --warmup 10 --runs 5`. Classes: the first N COCO names.")
    if args.config == "tiny" and not args.url:
        notes += (" The tiny random model at 112 px computes next to nothing: these figures "
                  "measure the client, gRPC and Triton plumbing, not SAM3, and on a shared, "
                  "loaded CPU (see the load above) the min-max spread is the machine's noise.")
    head = common.section_header("Video latency through Triton (§4.1 protocol)", command, model,
                                 notes)
    table = common.markdown_table(rows, COLUMNS, digits=2)
    return f"{head}\n{table}\n\n{common.image_link(args, STUDY, 'video latency')}\n"


def _parser():
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(1, 2, 4, 8))
    serving.add_server_args(p)
    p.set_defaults(warmup=10, iters=5)
    p.add_argument("--runs", dest="iters", type=int, help="runs per setting (default 5)")
    p.add_argument("--frames", type=int, default=100, help="timed frames per run (default 100)")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4], metavar="K",
                   help="frames in flight to measure (default: 1 2 4)")
    p.add_argument("--clip", type=Path, help="a video (default: a generated traffic clip)")
    p.add_argument("--clip-size", default="640x360", metavar="WxH",
                   help="size of the generated clip (default 640x360)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.frames, args.iters, *args.in_flight) < 1 or args.warmup < 0:
        raise SystemExit("--frames, --runs and --in-flight must be >= 1, --warmup >= 0")
    imgsz = common.resolve_imgsz(args)
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    count = args.warmup + args.frames
    if args.clip:
        clip_name = str(args.clip)
    else:
        w, h = (int(v) for v in args.clip_size.lower().split("x"))
        args.clip = write_clip(common.cache_dir() / f"traffic-{w}x{h}-{count}.mp4",
                               traffic_frames(count, w, h))
        clip_name = f"a generated traffic clip ({args.clip.name})"
    frames = load_frames(args.clip, count)
    size = f"{frames[0].shape[1]}x{frames[0].shape[0]}"
    model = (f"{args.config} random-weight SAM3 at {imgsz}px, python-backend repository (ORT)"
             if not args.url else f"the server at {args.url}")

    from dart_triton.client import DartClient

    rows: list[dict] = []
    runs: list[dict] = []
    with serving.served(args, imgsz) as served, \
            DartClient(served.grpc_url, concurrency=max(args.in_flight)) as client:
        for n in args.classes:
            classes = common.class_names(n)
            for k in args.in_flight:
                fps = []
                for run in range(args.iters):
                    fps.append(run_once(client, frames, classes, k, args.warmup))
                    runs.append({"classes": n, "in_flight": k, "run": run + 1,
                                 "frames": args.frames, "fps": fps[-1]})
                rows.append(summarise(n, k, fps))
                print(f"{STUDY}: N={n} K={k}: {rows[-1]['fps_median']:.2f} frames/s "
                      f"(min {rows[-1]['fps_min']:.2f}, max {rows[-1]['fps_max']:.2f})",
                      flush=True)
                common.write_csv(rows, args.out / f"{STUDY}.csv")
                common.write_csv(runs, args.out / f"{STUDY}_runs.csv")
                plot(rows, args.out / f"{STUDY}.png")
                common.update_section(args.results, STUDY,
                                      report(rows, args, command, model, clip_name, size))
    print(common.markdown_table(rows, COLUMNS, digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
