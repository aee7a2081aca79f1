"""COCO box AP (and, with ``--iou-type segm``, mask AP) of a `dart` Triton server:
`dart-triton coco-eval`.

Every image goes to the server with all category names as CLASSES; CLASS_IDS
map back to COCO category ids. Each image's detections are appended to a JSONL
file as they arrive, so an interrupted run (Ctrl-C, server restart) resumes
where it stopped. The detect step is a plain ``image -> Detections`` callable,
so mapping, writing, resuming and scoring run the same with or without a server.
Mask AP asks the server for masks (COCO RLE, written as each result's ``segmentation``).
With ``--url`` repeated, the images are spread over several servers; one that fails
is set aside and its images go to the others (`dart_triton.client.endpoints`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dart_triton.client.errors import DartClientError
from dart_triton.client.images import read_image_input
from dart_triton.contract import specs
from dart_triton.contract.detections import Detections

Detect = Callable[[np.ndarray | bytes], Detections]

METRIC_NAMES = ("AP", "AP50", "AP75", "APS", "APM", "APL")
JSONL_NAME, RESULTS_NAME, METRICS_NAME, RUN_NAME = (
    "detections.jsonl", "results.json", "metrics.json", "run.json"
)
# Settings that change detections: a resumed run must not mix two of them in one file.
_RUN_KEYS = ("model", "imgsz", "score_threshold", "nms_iou", "max_detections",
             "prompt_template", "categories")
# ... and with masks: a run that needs them cannot use detections made without them.
_MASK_KEYS = ("masks", "mask_threshold")
IOU_TYPES = {"bbox": "box", "segm": "mask"}


@dataclass(frozen=True)
class CocoDataset:
    images: list[dict]  # COCO image records (id, file_name, width, height), sorted by id
    category_ids: list[int]  # sorted; index i is CLASSES[i]
    category_names: list[str]
    unsegmented: int = 0  # annotations without a `segmentation` (mask AP needs them all)

    @classmethod
    def load(cls, annotations: Path, limit: int | None = None) -> CocoDataset:
        data = json.loads(Path(annotations).read_text())
        images = sorted(data["images"], key=lambda im: im["id"])
        cats = sorted(data["categories"], key=lambda c: c["id"])
        unsegmented = sum("segmentation" not in a for a in data.get("annotations", []))
        return cls(images[:limit], [c["id"] for c in cats], [c["name"] for c in cats],
                   unsegmented)

    @property
    def image_ids(self) -> list[int]:
        return [im["id"] for im in self.images]


# --- resumable JSONL ------------------------------------------------------------------
def read_done(jsonl: Path) -> dict[int, list[dict]]:
    """Detections already on disk, by image id.

    A last line cut short by a crash is dropped from the file itself, so that the
    next append starts on a line of its own; that image is simply run again.
    """
    if not jsonl.exists():
        return {}
    data = jsonl.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with jsonl.open("r+b") as f:
            f.truncate(end)
        print(f"coco-eval: dropped a partial last line of {jsonl}", file=sys.stderr)
    done: dict[int, list[dict]] = {}
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done[int(record["image_id"])] = record["detections"]
        except (ValueError, KeyError, TypeError):
            print(f"coco-eval: skipping malformed line {number} of {jsonl}", file=sys.stderr)
    return done


def coco_image(path: Path, info: dict, send: str = "file") -> np.ndarray | bytes:
    """The image as it is sent: the file's bytes, or pixels (``send``, or a file the server
    would rotate by its EXIF orientation). COCO boxes refer to the stored pixels, so the
    EXIF orientation is ignored unless the annotation's size says the dataset was stored
    rotated."""
    want = (info.get("height"), info.get("width"))
    image = read_image_input(path, send, exif=False)
    if None in want or (image.height, image.width) == want:
        return image.payload
    image = read_image_input(path, send, exif=True)
    if (image.height, image.width) != want:
        raise ValueError(f"{path}: size {image.width}x{image.height} but the annotations "
                         f"say {want[1]}x{want[0]}")
    return image.payload


def detect_image(info: dict, images_dir: Path, detect: Detect, dataset: CocoDataset,
                 send: str = "file") -> dict:
    """One JSONL record: the image's detections in COCO results format."""
    image = coco_image(images_dir / info["file_name"], info, send)
    # CLASSES may be templated prompts; report the plain COCO names.
    dets = replace(detect(image), class_names=tuple(dataset.category_names))
    return {
        "image_id": info["id"],
        "file_name": info["file_name"],
        "detections": dets.to_coco(info["id"], dataset.category_ids),
    }


def detect_all(
    dataset: CocoDataset,
    images_dir: Path,
    detect: Detect,
    jsonl: Path,
    *,
    concurrency: int = 8,
    progress: bool = True,
    send: str = "file",
) -> dict[int, list[dict]]:
    """Run ``detect`` on every image not yet in ``jsonl``, appending one line per image.

    ``concurrency`` threads call ``detect`` (and decode images) at once; lines are
    written and flushed by this thread only, in completion order.
    """
    from tqdm import tqdm

    done = read_done(jsonl)
    todo_list = [im for im in dataset.images if im["id"] not in done]
    remaining, todo = len(todo_list), iter(todo_list)
    if len(done):
        print(f"coco-eval: resuming, {len(dataset.images) - remaining} of "
              f"{len(dataset.images)} images already done", file=sys.stderr)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="coco-eval")
    pending: set[Future[dict]] = set()
    try:
        with jsonl.open("a") as out, tqdm(
            total=remaining, unit="img", desc="coco-eval", disable=not progress
        ) as bar:
            while True:
                # Submit only what the workers can take, so memory stays flat.
                while len(pending) < concurrency and (info := next(todo, None)) is not None:
                    pending.add(pool.submit(detect_image, info, images_dir, detect, dataset,
                                             send))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                failed = {f for f in finished if f.exception() is not None}
                for fut in finished - failed:
                    record = fut.result()
                    out.write(json.dumps(record) + "\n")
                    out.flush()  # a crash or Ctrl-C after this point loses nothing
                    done[record["image_id"]] = record["detections"]
                    bar.update()
                if failed:  # raised only after this batch's successes are on disk
                    raise next(iter(failed)).exception()
    finally:
        # On errors and Ctrl-C, drop queued work rather than wait for it.
        pool.shutdown(wait=not pending, cancel_futures=True)
    return done


# --- scoring --------------------------------------------------------------------------
def write_results(done: dict[int, list[dict]], image_ids: Sequence[int], path: Path) -> list[dict]:
    results = [det for i in image_ids for det in done.get(i, [])]
    path.write_text(json.dumps(results))
    return results


def _quiet(*args: object, **kwargs: object) -> None:
    """The evaluator's own printout is replaced by `format_table`."""


def evaluate(annotations: Path, results_json: Path, image_ids: Sequence[int],
             iou_type: str = "bbox") -> dict[str, float]:
    """Box (``bbox``) or mask (``segm``) AP of a COCO results file over ``image_ids``
    (fractions; -1 = no such GT)."""
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(str(annotations), print_function=_quiet)
    results: str | list[dict] = str(results_json)
    if iou_type == "segm":
        results = json.loads(results_json.read_text())
        if any("segmentation" not in r for r in results):
            raise ValueError(f"{results_json}: detections without masks cannot be scored "
                             "for mask AP (rerun with --overwrite)")
        # Without its box a result's area is its mask's, so small/medium/large are the
        # masks' sizes, as for the ground truth (what Detectron2 does too).
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    dt = gt.loadRes(results)
    ev = COCOeval_faster(gt, dt, iouType=iou_type, print_function=_quiet)
    ev.params.imgIds = list(image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {name: float(v) for name, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)}


def format_table(metrics: dict[str, float]) -> str:
    head = " ".join(f"{n:>6}" for n in METRIC_NAMES)
    row = " ".join(
        f"{100 * metrics[n]:6.1f}" if metrics[n] >= 0 else f"{'n/a':>6}" for n in METRIC_NAMES
    )
    return f"{head}\n{row}"


def _check_run(output: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to resume a JSONL written with different detection settings (detections with
    masks still serve a run without: they are kept, and remembered as having them)."""
    run_file, jsonl = output / RUN_NAME, output / JSONL_NAME
    if overwrite:
        jsonl.unlink(missing_ok=True)
    elif run_file.exists() and jsonl.exists():
        before = json.loads(run_file.read_text())
        changed = [k for k in _RUN_KEYS if before.get(k) != settings.get(k)]
        if settings.get("masks"):
            changed += [k for k in _MASK_KEYS if before.get(k) != settings.get(k)]
        else:
            settings = settings | {k: before[k] for k in _MASK_KEYS if k in before}
        if changed:
            raise SystemExit(
                f"coco-eval: {jsonl} was made with different {', '.join(changed)}; "
                "use another --output or --overwrite"
            )
    output.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def run(
    images_dir: Path,
    annotations: Path,
    output: Path,
    detect: Detect,
    *,
    dataset: CocoDataset | None = None,
    concurrency: int = 8,
    settings: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    send: str = "file",
    iou_types: Sequence[str] = ("bbox",),
) -> dict[str, Any]:
    """Detect (resumably), write results and metrics JSON, return the metrics record:
    ``metrics`` of the first of ``iou_types``, ``metrics_by_iou_type`` of each."""
    dataset = dataset or CocoDataset.load(annotations)
    settings = {**(settings or {}), "categories": dataset.category_names}
    _check_run(output, settings, overwrite)
    start = time.perf_counter()
    done = detect_all(dataset, images_dir, detect, output / JSONL_NAME,
                      concurrency=concurrency, progress=progress, send=send)
    seconds = time.perf_counter() - start
    results = write_results(done, dataset.image_ids, output / RESULTS_NAME)
    by_type = {t: evaluate(annotations, output / RESULTS_NAME, dataset.image_ids, t)
               for t in iou_types}
    import faster_coco_eval

    record = {
        "metrics": by_type[iou_types[0]],
        "metrics_by_iou_type": by_type,
        "images": len(dataset.images),
        "detections": len(results),
        "seconds_this_run": round(seconds, 3),
        "evaluator": f"faster-coco-eval {faster_coco_eval.__version__}",
        "annotations": str(annotations),
        **{k: v for k, v in settings.items() if k != "categories"},
    }
    (output / METRICS_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


# --- command line ---------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dart-triton coco-eval",
        description="COCO box or mask AP of a `dart` Triton server (resumable: rerun to "
                    "continue).",
    )
    p.add_argument("--images", type=Path, required=True, metavar="DIR",
                   help="image folder, e.g. coco/val2017")
    p.add_argument("--annotations", type=Path, required=True, metavar="JSON",
                   help="e.g. coco/annotations/instances_val2017.json")
    p.add_argument("--output", type=Path, metavar="DIR",
                   help=f"where {JSONL_NAME}, {RESULTS_NAME} and {METRICS_NAME} go "
                        "(default runs/coco-eval/MODEL)")
    p.add_argument("--model", default="dart", help="dart or dart_ensemble (default: dart)")
    p.add_argument("--url", action="append", metavar="HOST:PORT",
                   help="Triton address (default grpc 127.0.0.1:8001, http :8000); repeat it "
                        "to spread the images over several servers (one that fails is set "
                        "aside and its requests go to the others)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--concurrency", "--in-flight", type=int, default=8, metavar="K",
                   help="images in flight (default: 8)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images (by id)")
    p.add_argument("--score-threshold", type=float, default=0.05, metavar="T",
                   help="default 0.05: AP averages precision over all recall levels, so "
                        "low-confidence detections still add recall at little cost in "
                        f"precision; the serving default ({specs.DEFAULT_SCORE_THRESHOLD}) "
                        "would cut the PR curve short and under-report AP")
    p.add_argument("--nms-iou", type=float, metavar="IOU",
                   help=f"server default ({specs.DEFAULT_NMS_IOU}) if not given")
    p.add_argument("--max-detections", type=int, default=100, metavar="N",
                   help="per image; 100 is what COCO AP counts (default: 100)")
    p.add_argument("--prompt-template", default="{}", metavar="TEMPLATE",
                   help="prompt per category, {} = category name (default: name as is)")
    p.add_argument("--iou-type", nargs="+", choices=tuple(IOU_TYPES), default=["bbox"],
                   metavar="TYPE",
                   help="bbox (default): box AP; segm: mask AP (asks the server for masks: "
                        "model dart; the annotations need a segmentation each); both: "
                        "--iou-type bbox segm")
    p.add_argument("--mask-threshold", type=float, default=specs.DEFAULT_MASK_THRESHOLD,
                   metavar="P",
                   help="with segm: mask probability cut, in (0, 1) (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard earlier detections in --output instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--send", choices=("file", "pixels"), default="file",
                   help="file (default): each JPEG, PNG or WebP file goes to the server as its "
                        "bytes; pixels: decoded here and sent as RGB pixels")
    return p


def main(argv: Sequence[str] | None = None, detect: Detect | None = None) -> int:
    """``detect`` replaces the server (tests; it is shown pixels); otherwise a client per
    worker thread is used."""
    args = _parser().parse_args(argv)
    if "{}" not in args.prompt_template:
        print("coco-eval: --prompt-template must contain {}", file=sys.stderr)
        return 2
    if args.concurrency < 1 or (args.limit is not None and args.limit < 1):
        print("coco-eval: --concurrency and --limit must be >= 1", file=sys.stderr)
        return 2
    if not args.images.is_dir() or not args.annotations.is_file():
        print("coco-eval: --images must be a folder and --annotations a file", file=sys.stderr)
        return 2
    iou_types = list(dict.fromkeys(args.iou_type))
    masks = "segm" in iou_types
    if not 0.0 < args.mask_threshold < 1.0:
        print(f"coco-eval: --mask-threshold must be in (0, 1), got {args.mask_threshold}",
              file=sys.stderr)
        return 2
    if masks and args.model == specs.DART_ENSEMBLE:
        print(f"coco-eval: --iou-type segm needs --model {specs.DART}: {specs.DART_ENSEMBLE} "
              "returns boxes only", file=sys.stderr)
        return 2
    dataset = CocoDataset.load(args.annotations, args.limit)
    if masks and dataset.unsegmented:
        print(f"coco-eval: --iou-type segm: {dataset.unsegmented} annotations in "
              f"{args.annotations} have no segmentation", file=sys.stderr)
        return 2
    classes = [args.prompt_template.replace("{}", n) for n in dataset.category_names]
    settings: dict[str, Any] = {
        "model": args.model,
        "imgsz": None,
        "score_threshold": args.score_threshold,
        "nms_iou": args.nms_iou,
        "max_detections": args.max_detections,
        "prompt_template": args.prompt_template,
        **({"masks": True, "mask_threshold": args.mask_threshold} if masks else {}),
    }
    detector = None
    if detect is None:
        from dart_triton.client.thread_local import ThreadLocalDetector

        try:
            detector = detect = ThreadLocalDetector(
                classes, args.url, args.protocol, args.model,
                score_threshold=args.score_threshold, nms_iou=args.nms_iou,
                max_detections=args.max_detections,
                **({"masks": True, "mask_threshold": args.mask_threshold} if masks else {}),
            )
        except ValueError as e:  # an empty --url
            print(f"coco-eval: --url: {e}", file=sys.stderr)
            return 2
        client = detector.client()
        try:  # fail fast, before any image is read, when the model is not there
            client.model_config()
        except DartClientError as e:
            print(f"coco-eval: cannot read the config of model {args.model!r} at "
                  f"{client.url}: {e}", file=sys.stderr)
            detector.close()
            return 1
        for url in client.unready() if len(client.urls) > 1 else ():
            print(f"coco-eval: warning: no model {args.model!r} ready at {url}: its share "
                  "goes to the other servers until it is", file=sys.stderr)
        settings |= {"imgsz": client.imgsz(), "url": client.url, "protocol": args.protocol}
    output = args.output or Path("runs/coco-eval") / args.model
    try:
        record = run(args.images, args.annotations, output, detect, dataset=dataset,
                     concurrency=args.concurrency, settings=settings,
                     overwrite=args.overwrite, progress=not args.no_progress,
                     send=args.send if detector is not None else "pixels",
                     iou_types=iou_types)
    except DartClientError as e:
        print(f"coco-eval: server error: {e}\ncoco-eval: detections so far are kept in "
              f"{output / JSONL_NAME}; rerun the same command to resume", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # a missing/unreadable image, a size mismatch
        print(f"coco-eval: error: {e}\ncoco-eval: detections so far are kept in "
              f"{output / JSONL_NAME}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Exit waits at most for the requests already in flight; queued ones were dropped.
        print(f"\ncoco-eval: interrupted; rerun the same command to resume from "
              f"{output / JSONL_NAME}", file=sys.stderr)
        return 130
    finally:
        if detector is not None:
            detector.close()
    imgsz = f", imgsz {record['imgsz']}" if record.get("imgsz") else ""
    for iou_type, metrics in record["metrics_by_iou_type"].items():
        print(f"COCO {IOU_TYPES[iou_type]} AP, {record['images']} images, model "
              f"{args.model}{imgsz}, score >= {args.score_threshold}:")
        print(format_table(metrics))
    print(f"results: {output / RESULTS_NAME}\nmetrics: {output / METRICS_NAME}")
    return 0
