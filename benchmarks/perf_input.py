"""Write perf_analyzer's ``--input-data`` JSON for `dart` / `dart_ensemble` from a real
image and a class list.

    python -m dart_triton.benchmarks.perf_input --image street.jpg --classes person car \\
        --output input.json
    python -m dart_triton.benchmarks.perf_input --num-classes 16 --output input16.json
    perf_analyzer -m dart -u 127.0.0.1:8001 -i grpc --input-data input.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dart_triton.benchmarks import common
from dart_triton.contract import specs


def request_tensors(image: np.ndarray, classes: list[str],
                    score_threshold: float | None = None) -> dict:
    tensors: dict = {specs.IMAGE: np.ascontiguousarray(image, dtype=np.uint8),
                     specs.CLASSES: list(classes)}
    if score_threshold is not None:
        tensors[specs.SCORE_THRESHOLD] = np.array([score_threshold], dtype=np.float32)
    return tensors


def write(path: Path, image: np.ndarray, classes: list[str],
          score_threshold: float | None = None) -> Path:
    from dart_triton.benchmarks.perf_analyzer import write_input_data

    return write_input_data(path, request_tensors(image, classes, score_threshold))


def load_classes(args: argparse.Namespace) -> list[str]:
    if args.classes_file:
        from dart_triton.model.text_encoder import read_vocabulary

        names = read_vocabulary(args.classes_file)
        return names[: args.num_classes] if args.num_classes else names
    if args.classes:
        return list(args.classes)
    return common.class_names(args.num_classes or 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dart_triton.benchmarks.perf_input",
                                description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, default=None,
                   help="any RGB image file (default: scikit-image's astronaut photograph)")
    p.add_argument("--classes", nargs="+", default=None, help="class names")
    p.add_argument("--classes-file", type=Path, default=None, help="one class name per line")
    p.add_argument("--num-classes", type=int, default=None,
                   help="take the first N names (of --classes-file, else of COCO's 80)")
    p.add_argument("--score-threshold", type=float, default=None)
    p.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.image:
        from dart_triton.client.images import load_image

        image = load_image(args.image)
    else:
        image = common.test_image()
    classes = load_classes(args)
    path = write(args.output, image, classes, args.score_threshold)
    print(f"wrote {path}: image {image.shape[1]}x{image.shape[0]}, {len(classes)} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
