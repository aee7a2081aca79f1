"""Model repositories and servers for the served benchmarks (built once, cached).

`served(args, max_classes)` yields a running server's gRPC/HTTP URLs: the one given by
``--url`` (e.g. a test fixture's), or a tritonserver started on a python-backend
repository built from the benchmark checkpoint under ``artifacts/bench``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dart_triton.benchmarks import common


@dataclass(frozen=True)
class Served:
    grpc_url: str
    http_url: str
    metrics_url: str | None = None


def add_server_args(p: argparse.ArgumentParser, max_classes: int = 16) -> None:
    p.add_argument("--max-classes", type=int, default=max_classes,
                   help="prompts per enc_dec pass in the built repository (default %(default)s)")
    p.add_argument("--url", default=None,
                   help="gRPC host:port of a running server to use instead of starting one")
    p.add_argument("--http-url", default=None, help="its HTTP host:port (with --url)")
    p.add_argument("--ort-threads", type=int, default=0,
                   help="intra-op threads per ORT session in the server (0: ORT's default)")


def graphs_dir(checkpoint: Path, imgsz: int, max_classes: int) -> Path:
    """backbone.onnx + enc_dec.onnx for this checkpoint and size (exported once)."""
    from dart_triton.export.onnx_export import GRAPHS_JSON, export_graphs

    out = common.cache_dir() / f"onnx-{checkpoint.name}-{imgsz}-m{max_classes}"
    if not (out / GRAPHS_JSON).is_file():
        print(f"exporting ONNX graphs to {out} (once) ...", flush=True)
        _, agreements = export_graphs(checkpoint, out, imgsz, max_classes, log=print)
        bad = [a for a in agreements if not a.ok]
        if bad:
            raise RuntimeError(f"ONNX Runtime disagrees with PyTorch: {bad}")
    return out


def repository(checkpoint: Path, imgsz: int, max_classes: int) -> Path:
    """A python-backend repository (ORT graphs inside Triton), built once."""
    from dart_triton.export.repository import build_repository

    repo = common.cache_dir() / f"repo-{checkpoint.name}-{imgsz}-m{max_classes}"
    if not (repo / "dart_repository.json").is_file():
        print(f"building model repository {repo} (once) ...", flush=True)
        build_repository(checkpoint, repo, backend="python", imgsz=imgsz,
                         max_classes=max_classes,
                         onnx_dir=graphs_dir(checkpoint, imgsz, max_classes))
    return repo


@contextlib.contextmanager
def served(args: argparse.Namespace, imgsz: int) -> Iterator[Served]:
    if args.url:
        yield Served(args.url, args.http_url or args.url)
        return
    from dart_triton.serving.server import TritonServer

    repo = repository(common.checkpoint_for(args), imgsz, args.max_classes)
    env = {"DART_ORT_THREADS": str(args.ort_threads)} if args.ort_threads else {}
    with TritonServer(repo, startup_timeout=900, env=env) as server:
        yield Served(server.grpc_url, server.http_url, server.metrics_url)
