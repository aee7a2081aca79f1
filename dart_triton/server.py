"""Start tritonserver on a model repository: in tests, benchmarks and `dart-triton serve`.

Two binaries are supported. A ``tritonserver`` on PATH wins (the NGC container).
Otherwise the one bundled in the ``nvidia-pytriton`` wheel (tritonserver 2.51, python
backend only, runs on CPU) is used; it needs some help to run outside pytriton:

* the python backend expects ``triton_python_backend_stub`` next to
  ``libtriton_python.so``, but the wheel keeps one stub per Python version elsewhere,
  so a backend directory of symlinks is laid out in a scratch directory;
* the stub is an embedded interpreter isolated from PYTHONPATH: it finds its
  environment through ``python3`` on PATH, so that bin dir goes first. The stub is
  built against numpy 1.x and corrupts BYTES tensors under numpy 2, so it runs as
  ``.tools/triton-python`` where scripts/install_triton_tools.sh made one for this
  venv (numpy<2 over this same venv); without it, numpy>=2 here is refused;
* the stub links ``libpython3.X.so.1.0``: it must be this interpreter's build (a
  distro libpython of the same minor version can miss symbols, e.g. ``_PyModule_Add``),
  so sysconfig's LIBDIR goes first on LD_LIBRARY_PATH, then ``nvidia_pytriton.libs``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from dart_triton.export.manifest import version_refusal

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
INSTALL_HINT = "run scripts/install_triton_tools.sh (or pip install 'dart-triton[serve]')"


class TritonServerError(RuntimeError):
    """tritonserver could not be started or did not become ready; the text quotes its log."""


# Locating the binary ------------------------------------------------------------------


def _pytriton_dir() -> Path | None:
    # find_spec does not import pytriton (its import pulls numpy<2-era deps we never use).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def bundled_tritonserver_dir() -> Path | None:
    """``pytriton/tritonserver`` of the installed nvidia-pytriton wheel, if any."""
    root = _pytriton_dir()
    path = root / "tritonserver" if root else None
    return path if path and (path / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> Path:
    """A ``tritonserver`` on PATH (NGC container), else the nvidia-pytriton bundled one."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    bundled = bundled_tritonserver_dir()
    if bundled is None:
        raise FileNotFoundError(f"no tritonserver on PATH nor in nvidia-pytriton: {INSTALL_HINT}")
    return bundled / "bin" / "tritonserver"


def is_bundled(binary: Path) -> bool:
    bundled = bundled_tritonserver_dir()
    return bundled is not None and binary.resolve().is_relative_to(bundled.resolve())


def prepare_backend_dir(dest: Path, python_version: str | None = None) -> Path:
    """Lay out ``dest/python/`` with the bundled python backend and the stub for this Python.

    Symlinks, not copies: the stub resolves its RPATH from its real location.
    """
    bundled = bundled_tritonserver_dir()
    if bundled is None:
        raise FileNotFoundError(f"nvidia-pytriton is not installed: {INSTALL_HINT}")
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundled / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no python backend stub for Python {version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [*(bundled / "backends" / "python").iterdir(), stub]:
        link = python_dir / src.name
        if src.name != "__pycache__" and not link.exists():
            link.symlink_to(src)
    return dest


def tools_dir() -> Path:
    """Where scripts/install_triton_tools.sh puts its tools: ``$DART_TRITON_TOOLS``, else
    ``.tools`` of the source checkout this runs from, else ``dart-triton-tools`` in this
    environment (an installed wheel: the tools belong to the environment they serve)."""
    env = os.environ.get("DART_TRITON_TOOLS")
    checkout = Path(__file__).resolve().parents[1]
    if env or (checkout / "pyproject.toml").is_file():
        return Path(env) if env else checkout / ".tools"
    return Path(sys.prefix) / "dart-triton-tools"


def stub_python_bin(binary: Path | None = None) -> Path:
    """The bin dir whose ``python3`` the python-backend stubs will run as.

    This interpreter's own (not resolved: a venv's bin, not the base install's), except
    for the bundled stub, which needs numpy<2: then the overlay env made for this venv.
    """
    own = Path(sys.executable).parent
    if binary is not None and not is_bundled(binary):
        return own
    overlay = tools_dir() / "triton-python"
    marker = overlay / "FOR_PREFIX"  # "<venv prefix> numpy==X py3.Y", by the install script
    fields = marker.read_text().split() if marker.is_file() else []
    if fields[:1] == [sys.prefix] and f"py{sys.version_info[0]}.{sys.version_info[1]}" in fields:
        return overlay / "bin"
    numpy_version = importlib.metadata.version("numpy")
    if int(numpy_version.split(".")[0]) >= 2:
        raise TritonServerError(
            f"this environment has numpy {numpy_version}, but the python backend stub "
            "bundled in nvidia-pytriton is built against numpy 1.x and corrupts BYTES "
            f"tensors with numpy 2. Run scripts/install_triton_tools.sh (it prepares "
            f"{overlay}: numpy<2 over this venv) or install numpy<2."
        )
    return own


def server_env(
    binary: Path | None = None,
    base: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for tritonserver so that python-backend stubs run in this environment."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(stub_python_bin(binary)), *_split(env.get("PATH"))])
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    bundled = bundled_tritonserver_dir()
    if bundled is not None and (binary is None or is_bundled(binary)):
        libs.append(str(bundled.parent.parent / "nvidia_pytriton.libs"))
    libs += _split(env.get("LD_LIBRARY_PATH"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env.update(overrides or {})
    return env


def _split(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p]


# Log reading --------------------------------------------------------------------------

# Default log format: "E1125 10:20:30.123456 123 file.cc:45] message".
_ERROR_LINE = re.compile(r"^E\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\] ?(.*)$")
# Errors every CPU-only start logs: not a reason for anything.
_CPU_NOISE = ("CudaDriverHelper has not been initialized",)


def failure_reasons(log_text: str, tail: int = 25) -> str:
    """The server's own explanation: model load failures, else error lines, else the tail."""
    errors = []
    for line in log_text.splitlines():
        if m := _ERROR_LINE.match(line):
            errors.append(_unescape(m.group(1)))
        elif line.startswith("error: "):  # tritonserver's last words before exiting
            errors.append(line)
    errors = [e for e in errors if not e.startswith(_CPU_NOISE)]
    if "Usage: tritonserver" in log_text:  # a bad flag: the complaint is outside the usage text
        errors += [
            line
            for line in log_text.splitlines()
            if line.strip()
            and not line[0].isspace()
            and not line.endswith(":")
            and not line.startswith("Usage: ")
        ]
    # A failed model logs its traceback twice (instance, then model): keep the model line.
    load_failures = [e for e in errors if e.startswith("failed to load") or e.startswith("error: ")]
    reasons = load_failures or errors or log_text.splitlines()[-tail:]
    return "\n".join(dict.fromkeys(reasons))  # keep order, drop repeats


def _unescape(message: str) -> str:
    # Triton quotes messages and escapes their newlines (python tracebacks).
    if len(message) > 1 and message[0] == message[-1] == '"':
        message = message[1:-1]
    return message.replace("\\n", "\n").replace('\\"', '"').rstrip()


# The server ---------------------------------------------------------------------------


def free_port(host: str = DEFAULT_HOST) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _connect_host(bind_host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind_host, bind_host)
    return f"[{host}]" if ":" in host else host


class TritonServer:
    """A tritonserver process; use as a context manager.

    ``http_url`` and ``grpc_url`` are ``host:port`` (what tritonclient and perf_analyzer
    take); ``metrics_url`` is the full ``http://host:port/metrics`` address.
    Ports left as None are free loopback ports picked at start.
    """

    def __init__(
        self,
        model_repository: str | Path | Sequence[str | Path],
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = DEFAULT_HOST,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        echo: IO[str] | None = None,
        startup_timeout: float = 120.0,
        binary: str | Path | None = None,
    ) -> None:
        repos = [model_repository] if isinstance(model_repository, str | Path) else model_repository
        self.model_repositories = [Path(r).resolve() for r in repos]
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.extra_args = list(extra_args)
        self.env_overrides = dict(env or {})
        self.startup_timeout = startup_timeout
        self.binary = Path(binary) if binary else find_tritonserver()
        self.echo = echo
        self._workdir = Path(tempfile.mkdtemp(prefix="dart-triton-server-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        # Shared with the finalizer: a failed start keeps its log for the error message.
        self._log_given = log_path is not None
        self._keep_log = [self._log_given]
        self._finalizer = weakref.finalize(self, _cleanup, None, self._workdir, self._keep_log)

    # URLs
    @property
    def http_url(self) -> str:
        return f"{_connect_host(self.host)}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{_connect_host(self.host)}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.ports['metrics']}/metrics"

    def command(self) -> list[str]:
        cmd = [str(self.binary)]
        cmd += [f"--model-repository={r}" for r in self.model_repositories]
        cmd += [
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-port={self.ports['metrics']}",
        ]
        if is_bundled(self.binary):
            backends = prepare_backend_dir(self._workdir / "backends")
            caches = self.binary.parent.parent / "caches"
            cmd += [f"--backend-directory={backends}", f"--cache-directory={caches}"]
        return cmd + self.extra_args

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # Lifecycle
    def start(self) -> TritonServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        auto = [name for name, port in self.ports.items() if port is None]
        probe_host = DEFAULT_HOST if self.host in ("", "0.0.0.0") else self.host
        for attempt in range(3):
            for name in auto:
                self.ports[name] = free_port(probe_host)
            self._spawn()
            try:
                self.wait_ready(self.startup_timeout)
                return self
            except TritonServerError as err:
                self.stop()
                # A picked port may be taken between picking and binding: pick again.
                # (2.51 says "Socket '127.0.0.1:PORT' already in use".)
                if auto and attempt < 2 and "already in use" in str(err):
                    self.process = None
                    self._keep_log[0] = self._log_given
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        cmd, env = self.command(), server_env(self.binary, overrides=self.env_overrides)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w", encoding="utf-8", errors="replace")
        try:
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError:
            log.close()
            raise
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, _cleanup, self.process, self._workdir, self._keep_log
        )
        self._reader = threading.Thread(
            target=_pump, args=(self.process.stdout, log, self.echo), daemon=True
        )
        self._reader.start()

    def wait_ready(self, timeout: float) -> None:
        """Poll /v2/health/ready; raise with the server's reason if it dies or times out."""
        assert self.process is not None
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self._join_reader()
                headline = f"tritonserver exited with code {code}"
                raise TritonServerError(self.failure_message(headline))
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.2)
        headline = f"tritonserver not ready after {timeout:.0f} s"
        raise TritonServerError(self.failure_message(headline))

    def failure_message(self, headline: str) -> str:
        """``headline`` plus the reasons found in the log; the log file is then kept."""
        self._keep_log[0] = True
        return f"{headline}:\n{failure_reasons(self.log_text())}\n(full log: {self.log_path})"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL after ``timeout``."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._join_reader()
        return proc.returncode

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self._finalizer()

    def __enter__(self) -> TritonServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pump(stream: IO[bytes], log: IO[str], echo: IO[str] | None) -> None:
    """Copy the server's output to the log file (and echo), line by line."""
    with log:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            log.write(line)
            log.flush()
            if echo is not None:
                echo.write(line)
                echo.flush()
    stream.close()


def _cleanup(process: subprocess.Popen[bytes] | None, workdir: Path, keep_log: list[bool]) -> None:
    # Also the last resort when a TritonServer is dropped or the interpreter exits.
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
    shutil.rmtree(workdir / "backends" if keep_log[0] else workdir, ignore_errors=True)
    with contextlib.suppress(OSError):
        workdir.rmdir()  # when empty: the kept log was written elsewhere


# `dart-triton serve` ------------------------------------------------------------------

_EPILOG = """\
Any other option is passed to tritonserver unchanged, e.g. --log-verbose=1,
--exit-timeout-secs=5. With --model-control-mode=explicit, load every model of the
repository (--load-model=*): `dart` calls the others, so --load-model=dart alone
reports ready while every request fails.

tritonserver defaults that matter here: --exit-on-error=true (a model that fails to
load stops the server, and this command exits non-zero quoting the error) and
--strict-readiness=true (/v2/health/ready is false until every model is ready). To
serve the models that did load, pass --exit-on-error=false --strict-readiness=false.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dart-triton serve",
        description="Run tritonserver in the foreground on a model repository.",
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
        help="address to bind HTTP, gRPC and metrics to (default: %(default)s)",
    )
    for name, port in DEFAULT_PORTS.items():
        p.add_argument(
            f"--{name}-port", type=int, default=port, help=f"default: {port}; 0 picks a free port"
        )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for readiness before giving up (default: %(default)s)",
    )
    p.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="also keep the server log here (default: a temporary file)",
    )
    return p


def serve_main(argv: list[str]) -> int:
    args, passthrough = _parser().parse_known_args(argv)
    # Port 0 means "any free port": picked here, since the readiness check needs it.
    ports = {n: getattr(args, f"{n}_port") or None for n in DEFAULT_PORTS}
    missing = [r for r in args.model_repository if not Path(r).is_dir()]
    if missing:
        print(f"dart-triton serve: no such model repository: {', '.join(missing)}", file=sys.stderr)
        return 2
    if refusal := version_refusal(args.model_repository):  # built by another dart-triton
        print(f"dart-triton serve: {refusal}", file=sys.stderr)
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

    # Forward SIGINT/SIGTERM to tritonserver, which unloads the models and exits.
    signals: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        signals.append(signum)
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except TritonServerError as err:
            if signals:  # stopped by the user while starting: not an error
                return 128 + signals[0]
            print(f"\ndart-triton serve: {err}", file=sys.stderr)
            if "failed to load" in str(err):
                print(
                    "hint: fix the model, or pass --exit-on-error=false "
                    "--strict-readiness=false to serve the models that did load",
                    file=sys.stderr,
                )
            return 1
        print(
            f"dart-triton serve: ready  http={server.http_url}  grpc={server.grpc_url}  "
            f"metrics={server.metrics_url}  (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        assert server.process is not None
        code = server.process.wait()
        server.stop()  # joins the log reader
        if code != 0 and not signals:
            message = server.failure_message(f"tritonserver exited with code {code}")
            print(f"dart-triton serve: {message}", file=sys.stderr)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
