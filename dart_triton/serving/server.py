"""One tritonserver on a model repository: started, waited for, stopped leaving nothing.

`TritonServer` runs one tritonserver (in a process group of its own, so that stopping it
leaves no python-backend stub and no /dev/shm region behind). `serving.supervisor`
keeps one serving; `serving.serve` is the `dart-triton serve` command.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from dart_triton.serving.binaries import (
    TritonServerError,
    find_tritonserver,
    is_bundled,
    prepare_backend_dir,
    server_env,
)
from dart_triton.serving.logs import exit_headline, failure_reasons, fatal_lines, pump_output
from dart_triton.serving.processes import (
    DEFAULT_HOST,
    check_ports_free,
    free_port,
    group_members,
    kill_group,
    remove_shm_regions,
    shm_prefix_arg,
    sweep_orphans,
    terminate_with_parent,
)

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
        self.shm_prefix = shm_prefix_arg(self.extra_args) or (
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
        if shm_prefix_arg(self.extra_args) is None:
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
                preexec_fn=terminate_with_parent(),
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
            target=pump_output, args=(self.process.stdout, log, self.echo), daemon=True
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
                raise TritonServerError(self.failure_message(exit_headline(code)))
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
        headline = exit_headline(self.process.returncode)
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

