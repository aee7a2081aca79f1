"""Start tritonserver on a model repository: in tests, benchmarks and `dart-triton serve`.

`TritonServer` runs one tritonserver (in a process group of its own, so that stopping it
leaves no python-backend stub and no /dev/shm region behind); `Supervisor` keeps one
serving for `dart-triton serve`: restarted when it dies or fails its deep health check
(`dart_triton.serving.health`), with a backoff and a cap on restarts per window.

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
import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import re
import secrets
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
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dart_triton import __version__
from dart_triton.contract.manifest import version_refusal

DEFAULT_HOST = "127.0.0.1"
GPU_MEMORY_POOL_BYTES = 1 << 30  # --cuda-memory-pool-byte-size per GPU (see serve_main)
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
    checkout = Path(__file__).resolve().parents[2]
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
_CPU_NOISE_ANYWHERE = ("CUDA driver version is insufficient",)
# A crashed tritonserver's last words: its fatal-signal handler's line (2 and 15 are a normal
# shutdown) and an uncaught C++ exception (e.g. boost::interprocess::lock_exception).
_FATAL_LINE = re.compile(
    r"^(Signal \((?!2\)|15\))\d+\) received\.?|terminate called .*|\s*what\(\): .*)$"
)


def _is_noise(message: str) -> bool:
    return message.startswith(_CPU_NOISE) or any(n in message for n in _CPU_NOISE_ANYWHERE)


def fatal_lines(log_text: str) -> list[str]:
    """The lines in which tritonserver said it crashed (``Signal (11) received.``, ...)."""
    return list(
        dict.fromkeys(line.strip() for line in log_text.splitlines() if _FATAL_LINE.match(line))
    )


def failure_reasons(log_text: str, tail: int = 25) -> str:
    """The server's own explanation: a crash, else model load failures, else error lines,
    else the tail of the log."""
    errors = []
    for line in log_text.splitlines():
        if m := _ERROR_LINE.match(line):
            errors.append(_unescape(m.group(1)))
        elif line.startswith("error: "):  # tritonserver's last words before exiting
            errors.append(line)
    errors = [e for e in errors if not _is_noise(e)]
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
    # A crash comes first: start-up errors that the server survived are not why it died.
    reasons = fatal_lines(log_text) or load_failures or errors or log_text.splitlines()[-tail:]
    return "\n".join(dict.fromkeys(reasons))  # keep order, drop repeats


def _unescape(message: str) -> str:
    # Triton quotes messages and escapes their newlines (python tracebacks).
    if len(message) > 1 and message[0] == message[-1] == '"':
        message = message[1:-1]
    return message.replace("\\n", "\n").replace('\\"', '"').rstrip()


# Ports, process groups, shared memory --------------------------------------------------


class PortInUseError(TritonServerError):
    """A port the server must bind is taken; raised before tritonserver starts."""


def free_port(host: str = DEFAULT_HOST) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_ports_free(host: str, ports: Mapping[str, int]) -> None:
    """Raise PortInUseError naming the first of ``ports`` that ``host`` cannot listen on.

    Binds as tritonserver does (SO_REUSEADDR), so a port held only by connections of a
    previous run in TIME_WAIT counts as free, and a listening socket as taken.
    """
    bind_host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    for name, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((bind_host, port))
                s.listen(1)
            except OSError as err:
                raise PortInUseError(
                    f"{name} port {port} on {bind_host} is not available ({err.strerror}): "
                    f"stop what uses it or pick another with --{name}-port"
                ) from err


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, read from /proc (Linux)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process of group ``pgid`` and wait until none is left.

    Stubs outlive a crashed tritonserver (and ignore SIGTERM), so they are killed, not
    asked. Those reparented to this process (it may be PID 1 in a container) are reaped.
    Returns the processes still there after ``timeout`` (none, normally).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return []
        except PermissionError:  # the group id was reused by someone else's processes
            return []
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
                pass
        left = group_members(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


SHM_DIR = Path("/dev/shm")


def shm_regions(prefix: str) -> list[Path]:
    """The python backend's shared-memory regions named with ``prefix``."""
    try:
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def remove_shm_regions(prefix: str) -> None:
    for path in shm_regions(prefix):
        with contextlib.suppress(OSError):
            path.unlink()


_PREFIX_OWNER = re.compile(r"dart_triton_(\d+)_[0-9a-f]+_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans() -> tuple[int, int]:
    """Kill python-backend stubs and remove /dev/shm regions left by a launcher that died
    without cleaning up (SIGKILLed: tritonserver then exits, but its stubs ignore SIGTERM
    and live on). Ours carry ``dart_triton_<launcher pid>_``; only those whose launcher is
    gone are touched. Returns (stubs killed, regions removed)."""
    def dead_owner(text: str) -> bool:
        m = _PREFIX_OWNER.search(text)
        return m is not None and not _pid_alive(int(m.group(1)))

    killed = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in args)
        if "triton_python_backend_stub" in text and dead_owner(text):
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
    removed = 0
    with contextlib.suppress(OSError):
        for path in SHM_DIR.iterdir():
            if path.name.startswith("dart_triton_") and dead_owner(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
    return killed, removed


def _shm_prefix_arg(args: Sequence[str]) -> str | None:
    """The prefix given by a ``--backend-config=python,shm-region-prefix-name=X`` in ``args``."""
    for arg in args:
        m = re.fullmatch(r"--backend-config=python,shm-region-prefix-name=(.+)", arg)
        if m:
            return m.group(1)
    return None


# The server ---------------------------------------------------------------------------


def _connect_host(bind_host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind_host, bind_host)
    return f"[{host}]" if ":" in host else host


class TritonServer:
    """A tritonserver process; use as a context manager.

    ``http_url`` and ``grpc_url`` are ``host:port`` (what tritonclient and perf_analyzer
    take); ``metrics_url`` is the full ``http://host:port/metrics`` address.
    Ports left as None are free loopback ports picked at start.

    tritonserver runs in a process group of its own with its python-backend stubs, and the
    stubs' shared-memory regions carry a prefix unique to this object (``shm_prefix``):
    `stop` leaves neither a process nor a region behind, even after a crash. A stopped
    server can be started again (`start`), on the same ports; the log file is appended to.
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
        self.shm_prefix = _shm_prefix_arg(self.extra_args) or (
            f"dart_triton_{os.getpid()}_{secrets.token_hex(4)}_"
        )
        self.env_overrides = dict(env or {})
        self.startup_timeout = startup_timeout
        self.binary = Path(binary) if binary else find_tritonserver()
        self.echo = echo
        self._workdir = Path(tempfile.mkdtemp(prefix="dart-triton-server-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0  # how many times tritonserver was spawned
        self._log_start = 0  # where this run's log begins in the log file
        self._reader: threading.Thread | None = None
        # Shared with the finalizer: a failed start keeps its log for the error message.
        self._log_given = log_path is not None
        self._keep_log = [self._log_given]
        self._finalizer = weakref.finalize(
            self, _cleanup, None, self._workdir, self._keep_log, self.shm_prefix
        )

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
        if _shm_prefix_arg(self.extra_args) is None:
            cmd.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if is_bundled(self.binary):
            backends = prepare_backend_dir(self._workdir / "backends")
            caches = self.binary.parent.parent / "caches"
            cmd += [f"--backend-directory={backends}", f"--cache-directory={caches}"]
        return cmd + self.extra_args

    def log_text(self) -> str:
        """The log of the current (or last) run."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def group_pids(self) -> list[int]:
        """tritonserver and its stubs: the live processes of its process group."""
        return group_members(self.process.pid) if self.process is not None else []

    # Lifecycle
    def start(self) -> TritonServer:
        """Start tritonserver and wait until it is ready; again after `stop` (or a crash)."""
        if self.process is not None:
            if self.process.poll() is None:
                raise RuntimeError("server already started")
            self.stop()  # a previous run that died: clear what it left
            self.process = None
        killed, removed = sweep_orphans()
        if killed or removed:
            print(f"dart-triton: removed what a dead launcher left behind: {killed} stub "
                  f"process(es), {removed} /dev/shm region(s)", file=sys.stderr, flush=True)
        auto = [name for name, port in self.ports.items() if port is None]
        probe_host = DEFAULT_HOST if self.host in ("", "0.0.0.0") else self.host
        # Report a busy port now, not after minutes of model loading.
        check_ports_free(self.host, {n: p for n, p in self.ports.items() if n not in auto})
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
        # The first run starts the log afresh; a restart appends to it.
        log = self.log_path.open("a" if self.runs else "w", encoding="utf-8", errors="replace")
        self._log_start = log.tell()
        try:
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Its own process group, which its stubs inherit: one killpg ends them all,
                # and a Ctrl-C meant for a parent does not reach the stubs directly.
                start_new_session=True,
                # Out of the parent's group, it no longer goes down with it (`timeout`
                # signals the group): ask the kernel for a SIGTERM when the parent dies.
                preexec_fn=_terminate_with_parent(),
            )
        except OSError:
            log.close()
            raise
        self.runs += 1
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, _cleanup, self.process, self._workdir, self._keep_log, self.shm_prefix
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
                raise TritonServerError(self.failure_message(_exit_headline(code)))
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

    def death_reason(self) -> str:
        """One line on why tritonserver exited, from its exit status and its last words."""
        assert self.process is not None and self.process.returncode is not None
        self._join_reader()
        text = self.log_text()
        words = fatal_lines(text)
        if not words and self.process.returncode > 0:
            words = failure_reasons(text).splitlines()[-3:]
        headline = _exit_headline(self.process.returncode)
        return f"{headline}: {' '.join(words)}" if words else headline

    def stop(self, timeout: float | None = 30.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL after ``timeout``; then
        SIGKILL whatever is left of its process group and remove its shm regions."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Reaped before kill_group's waitpid(-pgid) could take its exit status.
        kill_group(proc.pid)
        self._join_reader()
        remove_shm_regions(self.shm_prefix)
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


@functools.cache
def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc Linux: no parent-death signal
        return None


def _terminate_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: SIGTERM to the child when the thread that started it exits
    (PR_SET_PDEATHSIG; so start servers from a thread that outlives them, e.g. the main one).

    prctl is looked up here, before the fork: the child only calls it.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    pr_set_pdeathsig = 1

    def child() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return child


def _exit_headline(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"tritonserver was killed by {signal.Signals(-code).name}"
    return f"tritonserver exited with code {code}"


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


def _cleanup(
    process: subprocess.Popen[bytes] | None, workdir: Path, keep_log: list[bool], shm_prefix: str
) -> None:
    # Also the last resort when a TritonServer is dropped or the interpreter exits.
    if process is not None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        kill_group(process.pid)
        remove_shm_regions(shm_prefix)
    shutil.rmtree(workdir / "backends" if keep_log[0] else workdir, ignore_errors=True)
    with contextlib.suppress(OSError):
        workdir.rmdir()  # when empty: the kept log was written elsewhere


# Supervision ---------------------------------------------------------------------------


@dataclass
class RestartPolicy:
    """When to restart a failed tritonserver: exponential backoff, a cap per window.

    The n-th restart within the last ``window`` seconds waits ``backoff * 2**(n-1)``
    seconds (at most ``backoff_max``); once ``max_restarts`` restarts happened within the
    window, the supervisor gives up (and exits non-zero, for an outer restart policy).
    """

    backoff: float = 2.0
    backoff_max: float = 60.0
    max_restarts: int = 5
    window: float = 600.0
    _times: deque[float] = field(default_factory=deque, repr=False)

    def delay(self, now: float) -> float | None:
        """Seconds to wait before a restart at ``now``, or None when the cap is reached."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return None
        return min(self.backoff * 2 ** len(self._times), self.backoff_max)

    def record(self, now: float) -> None:
        self._times.append(now)


@dataclass
class Restart:
    at: float  # time.time()
    reason: str


def _say(message: str) -> None:
    print(f"dart-triton serve: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Keeps a TritonServer serving: restarts it when it dies or fails its health check.

    ``check`` returns None when the server is healthy, else the reason (e.g.
    `dart_triton.serving.health.check`); it runs every ``check_interval`` seconds, and
    ``check_failures`` failures in a row restart the server, as does its death. With
    ``policy`` None nothing is restarted: the supervisor stops and `run` returns 1.
    `request_stop` (from a signal handler or another thread) ends `run`.
    """

    def __init__(
        self,
        server: TritonServer,
        *,
        check: Callable[[], str | None] | None = None,
        check_interval: float = 10.0,
        check_failures: int = 3,
        policy: RestartPolicy | None = None,
        stop_timeout: float = 30.0,
        say: Callable[[str], None] = _say,
        on_ready: Callable[[TritonServer], None] | None = None,
    ) -> None:
        self.server = server
        self.check = check
        self.check_interval = check_interval
        self.check_failures = check_failures
        self.policy = policy
        self.stop_timeout = stop_timeout
        self.say = say
        self.on_ready = on_ready
        self.restarts: list[Restart] = []
        self.stop_signal: int | None = None
        self.outcome = ""  # how supervision ended, for the summary
        self._stopping = False
        self._started = time.monotonic()

    # Stopping: a flag polled by `run` (setting a threading.Event from a signal handler
    # can deadlock on the Event's own lock).
    def request_stop(self, signum: int | None = None) -> None:
        """Stop: the signal goes on to tritonserver at once, a second one kills its group."""
        proc = self.server.process
        alive = proc is not None and proc.returncode is None
        if self._stopping and alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        elif alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum or signal.SIGTERM)
        self.stop_signal = self.stop_signal or signum
        self._stopping = True

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a stop was requested meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self._stopping

    def run(self) -> int:
        """Start the server and supervise it until stopped; returns the exit status."""
        try:
            self.server.start()
        except TritonServerError as err:
            self.server.stop(self.stop_timeout)
            if self._stopping:  # stopped while starting: not an error
                return 128 + (self.stop_signal or 0)
            self.say(str(err))
            return 1
        self._ready()
        try:
            while True:
                reason = self._watch()
                if reason is None:  # stop requested
                    break
                self.say(reason)
                if not self._restart(reason):
                    break
            if self._stopping:
                sig = self.stop_signal
                self.outcome = f"stopped by {signal.Signals(sig).name}" if sig else "stopped"
                return 0
            return 1
        finally:
            self.server.stop(self.stop_timeout)
            self.say(self.summary())

    def _ready(self) -> None:
        if self.on_ready is not None:
            self.on_ready(self.server)

    def _watch(self) -> str | None:
        """Wait for the server to die or fail ``check_failures`` checks in a row: the reason."""
        proc = self.server.process
        assert proc is not None
        failures = 0
        next_check = time.monotonic() + self.check_interval
        while not self._stopping:
            if proc.poll() is not None:
                return self.server.death_reason()
            if self.check is not None and time.monotonic() >= next_check:
                problem = self.check()
                next_check = time.monotonic() + self.check_interval
                if self._stopping:
                    break
                if problem is None:
                    if failures:
                        self.say("health check passes again")
                    failures = 0
                    continue
                if proc.poll() is not None:  # the check failed because the server died
                    return self.server.death_reason()
                failures += 1
                self.say(f"health check failed ({failures}/{self.check_failures}): {problem}")
                if failures >= self.check_failures:
                    return f"health check failed {failures} times in a row: {problem}"
            self._sleep(0.2)
        return None

    def _restart(self, reason: str) -> bool:
        """Stop what is left of the server and start it again; False to stop supervising."""
        self.server.stop(self.stop_timeout)
        if self.policy is None:
            self.say("not restarting (--no-restart)")
            self.outcome = "failed, not restarted (--no-restart)"
            return False
        while not self._stopping:
            delay = self.policy.delay(time.monotonic())
            if delay is None:
                self.say(
                    f"giving up: {self.policy.max_restarts} restarts within "
                    f"{self.policy.window:.0f} s (--max-restarts, --restart-window)"
                )
                self.outcome = "gave up"
                return False
            self.say(f"restart {len(self.restarts) + 1} in {delay:.1f} s")
            if self._sleep(delay):
                return False
            self.policy.record(time.monotonic())
            self.restarts.append(Restart(time.time(), reason))
            # Counted from here (a stop during the backoff above cancels the restart).
            self.say(f"restart {len(self.restarts)}: starting tritonserver")
            try:
                self.server.start()
            except TritonServerError as err:
                self.server.stop(self.stop_timeout)
                if self._stopping:
                    return False
                reason = f"restart failed: {str(err).splitlines()[0]}"
                self.say(f"{reason} (full log: {self.server.log_path})")
                continue
            self.say(f"restart {len(self.restarts)} done")
            self._ready()
            return True
        return False

    def summary(self) -> str:
        """Uptime, restart count and each restart's reason: printed when serve exits."""
        up = time.monotonic() - self._started
        lines = [
            f"exit summary: {self.outcome or 'gave up'} after {up:.0f} s, "
            f"{len(self.restarts)} restart(s)"
        ]
        for n, r in enumerate(self.restarts, 1):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at))
            lines.append(f"  restart {n} at {when}: {r.reason}")
        return "\n".join(lines)


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


def _parser() -> argparse.ArgumentParser:
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
    from dart_triton.serving import health  # tritonclient: only when checks are on

    def check() -> str | None:
        return health.check(url, protocol, model, timeout)

    return check


def _has_model(url: str, protocol: str, model: str) -> bool:
    from dart_triton.client.triton_client import DartClient

    with DartClient(url, protocol, model, timeout=10, retries=0) as client:
        return client.is_ready()


def serve_main(argv: list[str]) -> int:
    args, passthrough = _parser().parse_known_args(argv)
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
        _say(
            f"ready  http={srv.http_url}  grpc={srv.grpc_url}  metrics={srv.metrics_url}  "
            f"(Ctrl-C to stop)"
        )
        if checks and supervisor.check is None:
            url, protocol = _check_url(srv, passthrough)
            if _has_model(url, protocol, args.check_model):
                supervisor.check = _model_check(url, protocol, args.check_model, args.check_timeout)
                _say(
                    f"deep health check: one request to {args.check_model!r} every "
                    f"{args.check_interval:g} s (timeout {args.check_timeout:g} s, restart "
                    f"after {args.check_failures} failures in a row)"
                )
            else:
                checks = False
                _say(f"no model {args.check_model!r} is ready: deep health checks are off")

    supervisor = Supervisor(
        server,
        check_interval=args.check_interval,
        check_failures=args.check_failures,
        policy=policy,
        stop_timeout=args.stop_timeout,
        on_ready=ready,
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
