"""Keeping a tritonserver serving: restarted when it dies or fails its health check."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dart_triton.serving.binaries import TritonServerError
from dart_triton.serving.processes import Stub, remove_region, stub_processes
from dart_triton.serving.server import TritonServer

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


# How long a stub may stay stopped (SIGSTOP) before it is killed and replaced.
STOPPED_GRACE = 1.0


def say(message: str) -> None:
    print(f"dart-triton serve: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Keeps a TritonServer serving: restarts it when it dies or fails its health check.

    ``check`` returns None when the server is healthy, else the reason (e.g.
    `dart_triton.serving.health.check`); it runs every ``check_interval`` seconds, and
    ``check_failures`` failures in a row restart the server, as does its death. With
    ``policy`` None nothing is restarted: the supervisor stops and `run` returns 1.
    `request_stop` (from a signal handler or another thread) ends `run`.

    The python-backend stubs of the server's process group are watched every 0.2 s: when
    one dies, ``reload(model)`` (tritonserver's model-control API, in explicit mode) loads
    its model again, new stubs and all, while the other models keep serving; only when
    that fails, or without ``reload``, is the whole server restarted.
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
        say: Callable[[str], None] = say,
        on_ready: Callable[[TritonServer], None] | None = None,
        reload: Callable[[str], str | None] | None = None,
    ) -> None:
        self.server = server
        self.check = check
        self.check_interval = check_interval
        self.check_failures = check_failures
        self.policy = policy
        self.stop_timeout = stop_timeout
        self.say = say
        self.on_ready = on_ready
        self.reload = reload  # model -> None when loaded again, else why not
        self.restarts: list[Restart] = []
        self.reloads: list[Restart] = []  # models loaded again after their stub died
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
        stubs = stub_processes(proc.pid)
        stopped_since: dict[int, float] = {}
        while not self._stopping:
            if proc.poll() is not None:
                return self.server.death_reason()
            current = stub_processes(proc.pid)
            self._kill_stopped(current, stopped_since)
            dead = [stub for pid, stub in stubs.items() if pid not in current]
            stubs = current
            if dead:
                if proc.poll() is not None:  # the stubs went down with the server
                    return self.server.death_reason()
                if (reason := self._replace(dead)) is not None:
                    return reason
                stubs = stub_processes(proc.pid)
                continue
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

    def _kill_stopped(self, stubs: dict[int, Stub], since: dict[int, float]) -> None:
        """A stub stopped (SIGSTOP) for a second serves nothing and holds its requests:
        kill it, so that its model is loaded again like that of a stub that died."""
        now = time.monotonic()
        for pid in [p for p in since if p not in stubs or not stubs[p].stopped]:
            del since[pid]
        for pid, stub in stubs.items():
            if stub.stopped and now - since.setdefault(pid, now) >= STOPPED_GRACE:
                self.say(f"the stub of model {stub.model!r} is stopped (SIGSTOP): killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _replace(self, dead: list[Stub]) -> str | None:
        """Load again each model whose stub died, and remove the dead stubs' shm regions
        (tritonserver leaves them); None when all are back, else the reason the server
        must be restarted."""
        for model in sorted({stub.model for stub in dead}):
            if self.reload is None:
                return f"the python-backend stub of model {model!r} died"
            self.say(f"the stub of model {model!r} died: loading the model again")
            started = time.monotonic()
            if (problem := self.reload(model)) is not None:
                return f"the stub of model {model!r} died and loading it again failed: {problem}"
            self.reloads.append(Restart(time.time(), f"the stub of model {model!r} died"))
            self.say(f"model {model!r} loaded again in {time.monotonic() - started:.1f} s")
        for stub in dead:
            remove_region(stub.region)
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
            f"{len(self.restarts)} restart(s), {len(self.reloads)} model(s) loaded again"
        ]
        for n, r in enumerate(self.restarts, 1):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at))
            lines.append(f"  restart {n} at {when}: {r.reason}")
        return "\n".join(lines)

