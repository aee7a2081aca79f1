"""`dart-triton check-repository REPO --checkpoint DIR -- BUILD_ARGS`: is REPO what
`dart-triton build` would write now? Exit 0: yes; 1: no, each reason on a line; 2: usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dart_triton.export.backends import check_build
from dart_triton.export.manifest import stale_reasons
from dart_triton.export.options import BuildOptions, packaged_vocabulary
from dart_triton.export.repository import build_parser


def check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dart-triton check-repository",
        description="Exit 0 if REPO is what `dart-triton build --checkpoint DIR --output REPO "
                    "BUILD_ARGS` would write now (same dart-triton version, options, "
                    "checkpoint; TensorRT plans built for this GPU and TensorRT), else print "
                    "why and exit 1.",
        usage="dart-triton check-repository REPO --checkpoint DIR [-- BUILD_ARGS...]")
    p.add_argument("repo", help="model repository written by `dart-triton build`")
    p.add_argument("--checkpoint", required=True,
                   help="the checkpoint the build would read (not compared when absent)")
    p.add_argument("--quiet", action="store_true", help="print nothing when current")
    return p


def check_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = check_parser().parse_args(argv[:split])
    build_args = argv[split + 1:]
    parsed = build_parser().parse_args(
        ["--checkpoint", args.checkpoint, "--output", args.repo, *build_args])
    try:
        build = BuildOptions.from_args(parsed)
        check_build(build)
        vocabulary = build.vocabulary or packaged_vocabulary()
        if not vocabulary.is_file():
            raise ValueError(f"no vocabulary file {vocabulary}")
    except ValueError as exc:
        print(f"dart-triton check-repository: error: {exc}", file=sys.stderr)
        return 2
    reasons = stale_reasons(args.repo, args.checkpoint, build, vocabulary)
    for reason in reasons:
        print(f"stale: {reason}")
    if not reasons and not args.quiet:
        note = "" if Path(args.checkpoint).is_dir() else \
            f" (checkpoint {args.checkpoint} absent: not compared)"
        print(f"{args.repo} is current{note}")
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(check_main())
