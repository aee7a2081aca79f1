"""`dart-triton health`: a deep health check, one tiny real inference with a deadline.

Triton's own readiness (``/v2/health/ready``) keeps answering 200 when a python-backend
stub has died and every request fails, so this check runs the whole `dart` pipeline on
a small image with one class instead. Exit 0: the model answered in time with a
well-formed response; 1: any failure or timeout (one line naming it); 2: a usage error.

Light to import (tritonclient and numpy, no torch): Docker HEALTHCHECKs and Kubernetes
probes start it every few seconds.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np

from dart_triton.contract import specs

DEFAULT_URLS = {protocol: f"127.0.0.1:{port}" for protocol, port in specs.DEFAULT_PORTS.items()
                if protocol != "metrics"}

# Small (preprocess resizes it anyway) but not flat, so every stage has real work.
_SIDE = 32
_CLASSES = ("object",)


def probe_image() -> np.ndarray:
    y, x = np.mgrid[0:_SIDE, 0:_SIDE]
    return np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)


def _client(url: str, protocol: str, timeout: float):
    """A tritonclient for `protocol` (tritonclient directly: no retries, so that a check
    sees the server as it is)."""
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        return grpcclient, grpcclient.InferenceServerClient(url)
    import tritonclient.http as httpclient

    return httpclient, httpclient.InferenceServerClient(
        url, connection_timeout=timeout, network_timeout=timeout)


def _infer(url: str, protocol: str, model: str, timeout: float) -> None:
    """One request of the public contract; raises unless it is answered, well formed."""
    module, client = _client(url, protocol, timeout)
    try:
        image = probe_image()
        names = np.array([n.encode() for n in _CLASSES], dtype=object)
        inputs = [module.InferInput(specs.IMAGE, list(image.shape), "UINT8"),
                  module.InferInput(specs.CLASSES, [len(names)], "BYTES")]
        inputs[0].set_data_from_numpy(image)
        inputs[1].set_data_from_numpy(names)
        outputs = [module.InferRequestedOutput(n) for n in specs.DETECTION_OUTPUTS]
        kwargs = {"client_timeout": timeout} if protocol == "grpc" else {}
        result = client.infer(model, inputs, outputs=outputs, **kwargs)
        boxes, scores, ids = (result.as_numpy(n) for n in specs.DETECTION_OUTPUTS)
        if boxes is None or boxes.ndim != 2 or boxes.shape[1:] != (4,) or \
                scores is None or ids is None or not len(boxes) == len(scores) == len(ids):
            raise ValueError("the answer is not BOXES [K, 4], SCORES [K], CLASS_IDS [K]")
    finally:
        client.close()


def model_ready(url: str, protocol: str, model: str, timeout: float = 10.0) -> bool:
    """Whether a server at `url` is live with `model` loaded (False when none answers)."""
    try:
        _, client = _client(url, protocol, timeout)
    except Exception:
        return False
    try:
        return bool(client.is_server_live() and client.is_model_ready(model))
    except Exception:
        return False
    finally:
        client.close()


def check(
    url: str, protocol: str = "grpc", model: str = specs.DART, timeout: float = 30.0
) -> str | None:
    """None when ``model`` at ``url`` answers one tiny request within ``timeout`` seconds,
    else the reason (one line)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            _infer(url, protocol, model, timeout)
            outcome.append(None)
        except BaseException as err:  # reported, not raised: the thread's result
            outcome.append(err)

    # The client's own timeout bounds the request; the thread bounds everything else
    # (connecting, a server that trickles its answer).
    worker = threading.Thread(target=run, name="dart-health-check", daemon=True)
    worker.start()
    worker.join(timeout + 2.0)
    if not outcome:
        return f"no answer from {model!r} at {url} in {timeout:g} s"
    err = outcome[0]
    if err is None:
        return None
    status = err.status() if callable(getattr(err, "status", None)) else None
    message = " ".join(str(err).split()) or type(err).__name__
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{model!r} at {url}: {f'[{status}] ' if status else ''}{message}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dart-triton health",
        description="Deep health check: send one tiny real inference (a small image, one "
        "class) and exit 0 if it is answered in time, 1 otherwise.",
    )
    p.add_argument(
        "--url",
        default=None,
        help="Triton host:port (default: 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)",
    )
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default: grpc")
    p.add_argument("--model", default=specs.DART, help="model to query (default: %(default)s)")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds the request may take (default: %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0, got {args.timeout:g}")
    url = args.url or DEFAULT_URLS[args.protocol]
    started = time.monotonic()
    problem = check(url, args.protocol, args.model, args.timeout)
    if problem is not None:
        print(f"dart-triton health: unhealthy: {problem}", file=sys.stderr)
        return 1
    print(
        f"dart-triton health: ok: {args.model!r} at {url} answered in "
        f"{time.monotonic() - started:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
