"""`dart-triton serve`: tritonserver on a repository in the foreground, supervised."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from dart_triton import __version__
from dart_triton.contract import specs
from dart_triton.contract.manifest import version_refusal
from dart_triton.serving import health
from dart_triton.serving.processes import DEFAULT_HOST
from dart_triton.serving.server import TritonServer
from dart_triton.serving.supervisor import RestartPolicy, Supervisor, say

GPU_MEMORY_POOL_BYTES = 1 << 30  # --cuda-memory-pool-byte-size per GPU (see serve_main)
DEFAULT_PORTS = specs.DEFAULT_PORTS
# Set on the config of a model loaded again after its stub died (see load_model).
RELOAD_PARAMETER = "dart_triton_reloaded_at"

# `dart-triton serve` ------------------------------------------------------------------

_EPILOG = """\
Supervision: tritonserver runs in a process group of its own. Every --check-interval
seconds one real inference is sent to --check-model (`dart-triton health`); after
--check-failures failures in a row, or when tritonserver dies, it is stopped (SIGTERM,
SIGKILL to its whole group after --stop-timeout), its stubs and /dev/shm regions are
removed, and it is started again on the same ports after a backoff (--restart-backoff,
doubling up to --restart-backoff-max), at most --max-restarts times per --restart-window;
then serve gives up and exits 1. The log says why each restart happened; the exit summary
counts them. A repository without --check-model is supervised for crashes only.

A python-backend stub that dies (tritonserver 2.51 never replaces one) is seen within
0.2 s: its model alone is loaded again through the model-control API, while the other
models keep serving, and only if that fails is the server restarted. For that, serve
runs tritonserver with --model-control-mode=explicit --load-model=* (every model loaded
at start, as in the default mode) unless you pass a --model-control-mode of your own.

Any other option is passed to tritonserver unchanged, e.g. --log-verbose=1 or
--exit-timeout-secs=5. With --model-control-mode=explicit, load every model of the
repository (--load-model=*): `dart` calls the others, so --load-model=dart alone
reports ready while every request fails.

tritonserver defaults that matter here: --exit-on-error=true (a model that fails to
load stops the server, and this command exits non-zero quoting the error) and
--strict-readiness=true (/v2/health/ready is false until every model is ready). To
serve the models that did load, pass --exit-on-error=false --strict-readiness=false.
"""


def _positive(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dart-triton serve",
        description="Run tritonserver on a model repository in the foreground, supervised: "
        "restarted when it dies or fails its deep health check.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model-repository",
        "--model-store",
        action="append",
        required=True,
        metavar="DIR",
        help="model repository (may be repeated)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to bind HTTP, gRPC and metrics to; 0.0.0.0 in a container "
        "(default: %(default)s)",
    )
    for name, port in DEFAULT_PORTS.items():
        p.add_argument(
            f"--{name}-port", type=int, default=port, help=f"default: {port}; 0 picks a free port"
        )
    p.add_argument(
        "--startup-timeout",
        type=_positive(float),
        default=600.0,
        help="seconds to wait for readiness before giving up (default: %(default)s)",
    )
    p.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="also keep the server log here, restarts appended (default: a temporary file)",
    )
    g = p.add_argument_group("supervision")
    g.add_argument(
        "--check-model",
        default="dart",
        help="model the deep health check sends one tiny image to (default: %(default)s)",
    )
    g.add_argument(
        "--check-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between deep health checks; 0 turns them off (default: %(default)s)",
    )
    g.add_argument(
        "--check-timeout",
        type=_positive(float),
        default=30.0,
        metavar="S",
        help="seconds one check may take, generous so that a busy server passes "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--check-failures",
        type=_positive(int),
        default=3,
        metavar="K",
        help="failed checks in a row that restart the server (default: %(default)s)",
    )
    g.add_argument(
        "--no-restart",
        action="store_true",
        help="exit (status 1) when the server dies or fails its checks, instead of restarting",
    )
    g.add_argument(
        "--restart-backoff",
        type=float,
        default=2.0,
        metavar="S",
        help="wait before the first restart in a window; doubles for each further one "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--restart-backoff-max",
        type=float,
        default=60.0,
        metavar="S",
        help="longest wait before a restart (default: %(default)s)",
    )
    g.add_argument(
        "--max-restarts",
        type=_positive(int),
        default=5,
        metavar="N",
        help="give up (exit 1) after N restarts within --restart-window (default: %(default)s)",
    )
    g.add_argument(
        "--restart-window",
        type=_positive(float),
        default=600.0,
        metavar="S",
        help="seconds over which restarts are counted (default: %(default)s)",
    )
    g.add_argument(
        "--stop-timeout",
        type=_positive(float),
        default=30.0,
        metavar="S",
        help="seconds from SIGTERM to SIGKILL of tritonserver's process group "
        "(default: %(default)s)",
    )
    return p


def _check_url(server: TritonServer, passthrough: Sequence[str]) -> tuple[str, str]:
    """(url, protocol) for the checks: gRPC, unless tritonserver was told not to serve it."""
    if re.search(r"--allow-grpc[= ](false|0)\b", " ".join(passthrough)):
        return server.http_url, "http"
    return server.grpc_url, "grpc"


def _model_check(url: str, protocol: str, model: str, timeout: float) -> Callable[[], str | None]:
    def check() -> str | None:
        return health.check(url, protocol, model, timeout)

    return check


def load_model(server: TritonServer, model: str, timeout: float) -> str | None:
    """Load `model` again through tritonserver's model-control API (explicit mode): new
    stubs replace dead ones. None when it is loaded, else why not (one line).

    The request carries the model's own config with a parameter naming this load: a plain
    load of a model tritonserver still counts as ready (a stub killed a moment ago), or a
    load with the config of the last one, is a no-op (tritonserver 2.51); this one is not.
    The models ignore parameters they do not know."""
    base = f"http://{server.http_url}/v2"
    try:
        with urllib.request.urlopen(f"{base}/models/{model}/config", timeout=timeout) as r:
            config = json.loads(r.read())
        config.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": repr(time.time())}
        request = urllib.request.Request(
            f"{base}/repository/models/{model}/load", method="POST",
            data=json.dumps({"parameters": {"config": json.dumps(config)}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        return " ".join(f"HTTP {err.code}: {body}".split())
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def serve_main(argv: list[str]) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    # Port 0 means "any free port": picked here, since the readiness check needs it.
    ports = {n: getattr(args, f"{n}_port") or None for n in DEFAULT_PORTS}
    missing = [r for r in args.model_repository if not Path(r).is_dir()]
    if missing:
        print(f"dart-triton serve: no such model repository: {', '.join(missing)}", file=sys.stderr)
        return 2
    # A repository built by another dart-triton version is refused in one line.
    if refusal := version_refusal(args.model_repository, __version__):
        print(f"dart-triton serve: {refusal}", file=sys.stderr)
        return 2
    # A model whose backend this tritonserver lacks would fail at load (the bundled 2.51
    # even segfaults on it): say so before anything starts.
    from dart_triton.serving.preflight import backend_problem, gpu_ids

    try:
        problem = backend_problem(args.model_repository, binary=None, extra_args=passthrough)
    except FileNotFoundError as err:
        print(f"dart-triton serve: {err}", file=sys.stderr)
        return 2
    if problem:
        print(f"dart-triton serve: {problem}", file=sys.stderr)
        return 2
    if not any(a.startswith("--cuda-memory-pool-byte-size") for a in passthrough):
        # GPU tensors between python models go through Triton's CUDA memory pool (64 MB by
        # default): at 1008 px one frame's pixels and features are ~17 MB, two in flight.
        passthrough += [f"--cuda-memory-pool-byte-size={gpu}:{GPU_MEMORY_POOL_BYTES}"
                        for gpu in sorted(gpu_ids(args.model_repository))]
    explicit = not any(a.startswith("--model-control-mode") for a in passthrough)
    if explicit:  # every model loaded at start, and each one loadable again alone
        passthrough += ["--model-control-mode=explicit", "--load-model=*"]
    for flag in ("check_interval", "restart_backoff", "restart_backoff_max"):
        if getattr(args, flag) < 0:
            option = "--" + flag.replace("_", "-")
            print(f"dart-triton serve: {option} must be >= 0", file=sys.stderr)
            return 2
    try:
        server = TritonServer(
            args.model_repository,
            http_port=ports["http"],
            grpc_port=ports["grpc"],
            metrics_port=ports["metrics"],
            host=args.host,
            extra_args=passthrough,
            log_path=args.log_file,
            echo=sys.stdout,
            startup_timeout=args.startup_timeout,
        )
    except FileNotFoundError as err:
        print(f"dart-triton serve: {err}", file=sys.stderr)
        return 2

    policy = None
    if not args.no_restart:
        policy = RestartPolicy(
            args.restart_backoff, args.restart_backoff_max, args.max_restarts, args.restart_window
        )
    checks = args.check_interval > 0

    def ready(srv: TritonServer) -> None:
        nonlocal checks
        say(
            f"ready  http={srv.http_url}  grpc={srv.grpc_url}  metrics={srv.metrics_url}  "
            f"(Ctrl-C to stop)"
        )
        if checks and supervisor.check is None:
            url, protocol = _check_url(srv, passthrough)
            if health.model_ready(url, protocol, args.check_model):
                supervisor.check = _model_check(url, protocol, args.check_model, args.check_timeout)
                say(
                    f"deep health check: one request to {args.check_model!r} every "
                    f"{args.check_interval:g} s (timeout {args.check_timeout:g} s, restart "
                    f"after {args.check_failures} failures in a row)"
                )
            else:
                checks = False
                say(f"no model {args.check_model!r} is ready: deep health checks are off")

    supervisor = Supervisor(
        server,
        check_interval=args.check_interval,
        check_failures=args.check_failures,
        policy=policy,
        stop_timeout=args.stop_timeout,
        on_ready=ready,
        reload=(lambda model: load_model(server, model, args.startup_timeout)) if explicit
        else None,
    )

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.request_stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = supervisor.run()
        if code == 1 and server.runs == 1 and "failed to load" in server.log_text():
            print(
                "hint: fix the model, or pass --exit-on-error=false "
                "--strict-readiness=false to serve the models that did load",
                file=sys.stderr,
            )
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()

