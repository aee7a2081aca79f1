"""`dart-triton label`: a folder of images -> a COCO or YOLO dataset a trainer loads as it is.

Every image goes to the server with the class names as CLASSES. Each answer is appended
to a journal (``DATASET_DIR/.dart-label/journal.jsonl``) as it arrives, so an interrupted
run resumes where it stopped and labels each image once; the dataset files are written
from the journal when every image is done. ``--merge`` only changes how classes become
categories, so it (and ``--format``) may change between runs without detecting again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dart_triton.contract import specs

from .cli_common import (
    Parser,
    UsageError,
    add_mask_args,
    add_send_arg,
    add_server_args,
    check_urls,
    class_names,
    make_client,
    print_out,
    readable_image,
    request_options,
    require,
    say,
    server_ready,
)
from .errors import DartClientError

# What Ultralytics and supervision's YOLO loader both take as images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
STATE_DIR = ".dart-label"
JOURNAL, RUN = "journal.jsonl", "run.json"
COCO_JSON = Path("annotations") / "instances.json"
# Settings that change what the server answers: a journal never mixes two of them.
_RUN_KEYS = ("model", "classes", "score_threshold", "nms_iou", "max_detections", "masks",
             "mask_threshold")


@dataclass(frozen=True)
class Categories:
    names: list[str]  # category names, in order: YOLO index i, COCO id i + 1
    of_class: list[int]  # category index of each --classes name

    @property
    def merged(self) -> bool:
        return len(self.names) < len(self.of_class)


def parse_merge(spec: str | None, classes: Sequence[str]) -> Categories:
    """Categories from ``--merge "car,truck,bus=vehicle;person,rider=human"``.

    Each group becomes one category named after its ``=``; every other class is a
    category of its own. Categories are ordered by their first class in ``classes``.
    A group named like another class (or group) joins it.
    """
    target = {c: c for c in classes}
    grouped: dict[str, str] = {}
    for group in (spec or "").split(";"):
        if not group.strip():
            continue
        members, eq, name = group.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UsageError(f"--merge {group.strip()!r}: write groups as a,b=name "
                             "(groups separated by ;)")
        names = [m.strip() for m in members.split(",")]
        if not all(names):
            raise UsageError(f"--merge {group.strip()!r} has an empty class name")
        for m in names:
            if m not in target:
                raise UsageError(f"--merge: {m!r} is not one of --classes "
                                 f"({', '.join(classes)})")
            if m in grouped:
                raise UsageError(f"--merge: {m!r} is in two groups ({grouped[m]!r} and "
                                 f"{name!r})")
            grouped[m] = target[m] = name
    order = list(dict.fromkeys(target[c] for c in classes))
    return Categories(order, [order.index(target[c]) for c in classes])


def scan_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (subfolders too), by relative path; ``exclude`` skipped."""
    from .streams import natural_key

    skip = exclude.resolve() if exclude is not None else None
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        here = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (here / d).resolve() != skip]
        found += [here / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES
                  and not f.startswith(".")]
    return sorted(found, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def unique_stems(relative: Sequence[str]) -> list[str]:
    """A file-name stem per image, unique: the stem itself when no other image shares it,
    else the relative path with ``/`` as ``__`` (and the extension when that collides too).
    """
    stems = [Path(r).stem for r in relative]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out = []
    for r, s in zip(relative, stems, strict=True):
        if counts[s] > 1:
            p = Path(r)
            s = "__".join((*p.parent.parts, p.stem))
        out.append(s)
    seen: dict[str, int] = {}
    for s in out:
        seen[s] = seen.get(s, 0) + 1
    final, used = [], set()
    for r, s in zip(relative, out, strict=True):
        if seen[s] > 1:  # same stem, same folder, another extension
            s = f"{s}__{Path(r).suffix.lstrip('.').lower()}"
        base, k = s, 1
        while s in used:  # only for names that already look like our own renaming
            k += 1
            s = f"{base}_{k}"
        used.add(s)
        final.append(s)
    return final


# --- journal --------------------------------------------------------------------------------
def read_journal(path: Path) -> dict[str, dict]:
    """Records already on disk, by relative file name.

    A last line cut short by a crash is dropped from the file itself, so the next append
    starts on a line of its own; that image is simply labelled again.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    done: dict[str, dict] = {}
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done[str(record["file"])] = record
        except (ValueError, KeyError, TypeError):
            say("label", f"warning: skipping malformed line {number} of {path}")
    return done


def _check_out(out: Path, images: Path, settings: dict, overwrite: bool) -> Path:
    """The state folder of ``out``; refuses a foreign folder or a journal of other settings."""
    from .cli_common import check_writable_folder, file_in_the_way

    state = out / STATE_DIR
    if out.resolve() == images.resolve():
        raise UsageError(f"--out {out} is the image folder; give a new folder for the dataset")
    if blocker := file_in_the_way(out):
        raise UsageError(f"--out {out}: {blocker} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not state.is_dir():
        raise UsageError(f"--out {out} is a folder that `dart-triton label` did not write; "
                         "give a new or empty folder")
    run_file, journal = state / RUN, state / JOURNAL
    if overwrite:
        journal.unlink(missing_ok=True)
    elif run_file.is_file() and journal.is_file():
        before = json.loads(run_file.read_text())
        changed = [k for k in _RUN_KEYS if before.get(k) != settings.get(k)]
        if changed:
            raise UsageError(f"--out {out} was labelled with different {', '.join(changed)}; "
                             "use another --out, or --overwrite to label again")
    check_writable_folder(state, "--out")
    run_file.write_text(json.dumps(settings, indent=2) + "\n")
    return state


# --- dataset writers ------------------------------------------------------------------------
def _nms(xyxy: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou: float) -> np.ndarray:
    """The server's rule (greedy NMS within each group, by descending score, ties to the
    lower index), with torchvision's NMS: fed in a stable score order, with strictly
    decreasing stand-in scores so that its own sort keeps that order."""
    import torch
    from torchvision.ops import batched_nms

    order = np.argsort(-scores, kind="stable")
    rank = torch.arange(len(order), 0, -1, dtype=torch.float64)
    keep = batched_nms(torch.from_numpy(xyxy[order]), rank,
                       torch.from_numpy(groups[order].astype(np.int64)), iou)
    return order[keep.numpy()]


def _boxes(records: list[dict], categories: Categories, nms_iou: float) -> list[list[dict]]:
    """Each image's detections as categories; boxes of merged classes de-duplicated by NMS
    within their category (a car box and a truck box on one vehicle are one vehicle)."""
    out = []
    for record in records:
        dets = [{**d, "category": categories.of_class[d["class"]]} for d in record["detections"]]
        if categories.merged and len(dets) > 1:
            xywh = np.array([d["bbox"] for d in dets], dtype=np.float64)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            keep = _nms(xyxy, np.array([d["score"] for d in dets]),
                        np.array([d["category"] for d in dets]), nms_iou)
            dets = [dets[i] for i in keep.tolist()]
        out.append(dets)
    return out


def _link(src: Path, dst: Path) -> None:
    """``dst`` -> ``src``: a symbolic link, else a hard link, else a copy."""
    dst.unlink(missing_ok=True)
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _fresh(folder: Path) -> Path:
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _write_json(path: Path, data: object) -> None:
    """Written beside, then renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


def _yolo_polygon(segmentation: dict, category: int) -> str | None:
    """An Ultralytics segmentation label line ``class x1 y1 x2 y2 ...`` (normalised): the
    outline of the mask's largest part; None when it has none of 3 or more points."""
    from pycocotools import mask as mask_utils

    from .masks import largest_polygon

    polygon = largest_polygon(mask_utils.decode(segmentation).astype(bool))
    if polygon is None:
        return None
    h, w = segmentation["size"]
    xy = np.clip(polygon / np.array([w, h], dtype=np.float64), 0.0, 1.0)
    return f"{category} " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)) + "\n"


def write_dataset(out: Path, images_dir: Path, records: list[dict], names: list[str],
                  categories: Categories, fmt: str, nms_iou: float,
                  masks: bool = False) -> int:
    """``images/`` links plus COCO ``annotations/instances.json`` or YOLO ``labels/`` +
    ``data.yaml``; returns the number of boxes written. With ``masks`` COCO annotations
    carry their RLE ``segmentation`` (``area`` is the mask's) and YOLO labels are
    segmentation labels (a mask without an outline is left out, and counted on stderr)."""
    image_dir = _fresh(out / "images")
    for sub in ("labels", "annotations", "data.yaml"):  # the other format's files
        target = out / sub
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    files = []
    for record, stem in zip(records, names, strict=True):
        name = stem + Path(record["file"]).suffix.lower()
        _link(images_dir / record["file"], image_dir / name)
        files.append(name)
    per_image = _boxes(records, categories, nms_iou)
    boxes = sum(len(d) for d in per_image)
    if fmt == "coco":
        images, annotations = [], []
        for image_id, (record, name, dets) in enumerate(
                zip(records, files, per_image, strict=True), 1):
            images.append({"id": image_id, "file_name": name, "width": record["width"],
                           "height": record["height"], "source_file": record["file"]})
            for d in dets:
                w, h = d["bbox"][2], d["bbox"][3]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": d["category"] + 1, "bbox": d["bbox"],
                                    "area": w * h, "iscrowd": 0, "score": d["score"]})
                if masks:
                    from pycocotools import mask as mask_utils

                    annotations[-1] |= {"segmentation": d["segmentation"],
                                        "area": int(mask_utils.area(d["segmentation"]))}
        _write_json(out / COCO_JSON, {
            "info": {"description": "written by dart-triton label"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": n}
                           for i, n in enumerate(categories.names)],
        })
        return boxes
    label_dir = _fresh(out / "labels")
    outlineless = 0
    for record, stem, dets in zip(records, names, per_image, strict=True):
        w, h = float(record["width"]), float(record["height"])
        lines = []
        for d in dets:
            if masks:
                line = _yolo_polygon(d["segmentation"], d["category"])
                outlineless += line is None
                lines += [line] if line else []
                continue
            x, y, bw, bh = d["bbox"]
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            lines.append(f"{d['category']} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                         f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n")
        (label_dir / f"{stem}.txt").write_text("".join(lines))
    if outlineless:
        say("label", f"warning: {outlineless} of {boxes} masks have no outline of 3 or more "
                     "points (empty or a pixel thin): left out of the YOLO labels")
        boxes -= outlineless
    yaml_names = "\n".join(f"  {i}: {json.dumps(n)}" for i, n in enumerate(categories.names))
    (out / "data.yaml").write_text(
        "# written by dart-triton label\n"
        f"path: {json.dumps(str(out.resolve()))}\n"
        "train: images\nval: images\n"
        f"nc: {len(categories.names)}\nnames:\n{yaml_names}\n")
    return boxes


# --- command line ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="dart-triton label",
        description="Auto-label a folder of images (subfolders too) into a COCO or YOLO "
                    "dataset through a Triton `dart` server. Resumable: rerun the same "
                    "command after an interruption and each image is labelled once.",
        epilog="COCO: DATASET_DIR/annotations/instances.json (images, categories, "
               "annotations with bbox, area, iscrowd 0 and score) and DATASET_DIR/images/. "
               "YOLO (Ultralytics layout): DATASET_DIR/images/ (links to the images), "
               "DATASET_DIR/labels/STEM.txt (class cx cy w h, normalised; empty without "
               "detections) and DATASET_DIR/data.yaml; with --masks, segmentation labels "
               "(class x1 y1 x2 y2 ..., normalised). An image that cannot be read is named "
               "on stderr and skipped (exit 1). "
               "Exit status: 0 ok, 1 an image or the server failed, 2 a usage error.",
    )
    p.add_argument("images", type=Path, metavar="IMAGES_DIR")
    add_server_args(p)
    p.add_argument("--out", required=True, type=Path, metavar="DATASET_DIR",
                   help="the dataset folder (created; a rerun resumes in it)")
    p.add_argument("--format", choices=("coco", "yolo"), required=True)
    p.add_argument("--merge", metavar="SPEC",
                   help='classes into one category each group: "car,truck,bus=vehicle;'
                        'person,rider=human" (their boxes de-duplicated by NMS)')
    p.add_argument("--in-flight", type=int, default=4, metavar="K",
                   help="requests kept in flight (default 4)")
    p.add_argument("--overwrite", action="store_true",
                   help="forget the journal in DATASET_DIR and label every image again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_send_arg(p)
    add_mask_args(p, "COCO annotations get an RLE `segmentation` (and the mask's `area`); "
                     "YOLO labels become segmentation labels: the outline of each mask's "
                     "largest part")
    return p


def label_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.in_flight < 1:
            raise UsageError(f"--in-flight must be >= 1, got {args.in_flight}")
        classes = class_names(args.classes)
        categories = parse_merge(args.merge, classes)
        options = request_options(args)
        if args.masks and args.format == "yolo":
            require("cv2", "draw", "--masks --format yolo (outlines of masks)")
        check_urls(args)
        if not args.images.is_dir():
            raise UsageError(f"{args.images}: no such folder" if not args.images.exists()
                             else f"{args.images} is a file; give the folder of images")
        paths = scan_images(args.images, exclude=args.out)
        if not paths:
            raise UsageError(f"{args.images}: no images ({', '.join(IMAGE_SUFFIXES)}) in this "
                             "folder or its subfolders")
        settings = {"model": args.model, "classes": classes, **options,
                    "images": str(args.images.resolve())}
        state = _check_out(args.out, args.images, settings, args.overwrite)
    except UsageError as e:
        say("label", f"error: {e}")
        return 2

    relative = [p.relative_to(args.images).as_posix() for p in paths]
    journal = state / JOURNAL
    done = read_journal(journal)
    todo = [(p, r) for p, r in zip(paths, relative, strict=True) if r not in done]
    if done and todo:
        say("label", f"resuming: {len(paths) - len(todo)} of {len(paths)} images already "
                      "labelled")
    failed = []
    client = make_client(args, concurrency=args.in_flight)
    try:
        if todo:
            if not server_ready(client, "label"):
                return 1
            _detect(client, todo, classes, options, args, journal, done, failed)
    except DartClientError as e:
        say("label", f"server error ({client.url}): {e}; the {len(done)} images labelled so "
                      "far are kept: rerun the same command to resume")
        return 1
    except OSError as e:  # the journal's disk filled up
        say("label", f"error: cannot write {journal}: {e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        say("label", f"interrupted: {len(done)} of {len(paths)} images labelled; rerun the "
                      "same command to resume")
        return 130
    finally:
        client.close()

    labelled = [(done[r], n) for r, n in zip(relative, unique_stems(relative), strict=True)
                if r in done]
    records = [rec for rec, _ in labelled]
    nms_iou = args.nms_iou if args.nms_iou is not None else specs.DEFAULT_NMS_IOU
    boxes = write_dataset(args.out, args.images, records, [n for _, n in labelled],
                          categories, args.format, nms_iou, masks=args.masks)
    where = COCO_JSON if args.format == "coco" else Path("data.yaml")
    kind = "masks" if args.masks else "boxes"
    print_out(f"{args.out}: {len(records)} images, {boxes} {kind}, {len(categories.names)} "
              f"categories ({args.format}: {args.out / where})")
    return 1 if failed else 0


def _detect(client, todo: list[tuple[Path, str]], classes: list[str], options: dict,
            args: argparse.Namespace, journal: Path, done: dict[str, dict],
            failed: list[Path]) -> None:
    """Detect ``todo`` with K requests in flight; one flushed journal line per answer."""
    from tqdm import tqdm

    from .pipeline import in_order
    from .server_errors import RefusalAsResult

    def skip(path: Path, reason: str) -> None:
        failed.append(path)
        reason = reason.replace("IMAGE", "image")
        tqdm.write(f"dart-triton label: skipped {path}: {reason}" if str(path) not in
                   reason else f"dart-triton label: skipped {reason}", file=sys.stderr)

    def readable() -> Iterator[tuple[str, Any]]:
        for path, rel in todo:  # read lazily: only the in-flight images are in memory
            image, reason, _ = readable_image(path, args.send)
            if image is None:
                skip(path, reason)
                continue
            yield rel, image

    with journal.open("a") as out, tqdm(total=len(todo), unit="img", desc="label",
                                        disable=args.no_progress) as bar:
        for (rel, image), dets in in_order(
            readable(), lambda item: RefusalAsResult(
                client.detect_async(item[1].payload, classes, **options)),
            args.in_flight,
        ):
            if isinstance(dets, DartClientError):  # the server refused this file
                skip(image.path, f"the server refused it: {dets}")
                continue
            record = {"file": rel, "width": image.width, "height": image.height,
                      "detections": [{"bbox": d["bbox"], "score": d["score"],
                                      "class": d["category_id"],
                                      **({"segmentation": d["segmentation"]}
                                         if "segmentation" in d else {})}
                                     for d in dets.to_coco(0)]}
            out.write(json.dumps(record) + "\n")
            out.flush()  # a crash or Ctrl-C after this point loses nothing
            done[rel] = record
            bar.update()
        bar.update(len(todo) - bar.n)  # skipped images count as handled
