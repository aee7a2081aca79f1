"""Ports, process groups and shared-memory regions: what a tritonserver leaves behind.

tritonserver runs in a process group of its own with its python-backend stubs, and the
stubs' shared-memory regions carry a per-server prefix, so one killpg and one sweep of
/dev/shm leave nothing behind, even after a crash or a SIGKILLed launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dart_triton.serving.binaries import TritonServerError

DEFAULT_HOST = "127.0.0.1"

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


STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    model: str  # the model it serves
    region: str  # its /dev/shm region
    stopped: bool = False  # stopped by a signal (SIGSTOP): it serves nothing until resumed


def stub_processes(pgid: int) -> dict[int, Stub]:
    """The live python-backend stubs of process group ``pgid`` by pid. A stub's arguments
    start with its ``<repository>/<model>/<version>/model.py`` and its shm region."""
    stubs = {}
    for pid in group_members(pgid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if len(args) > 2 and args[0].endswith(STUB.encode()):
            model = Path(args[1].decode(errors="replace")).parent.parent.name
            stubs[pid] = Stub(model, args[2].decode(errors="replace"), _state(pid) in "Tt")
    return stubs


def _state(pid: int) -> str:
    """The one-letter state of ``pid`` (R, S, D, T stopped, Z ...); "?" when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat[stat.rindex(")") + 2]


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


def remove_region(name: str) -> None:
    """Remove one shm region (a dead stub's: its replacement has a region of its own)."""
    if "/" not in name and name:
        with contextlib.suppress(OSError):
            (SHM_DIR / name).unlink()


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


def shm_prefix_arg(args: Sequence[str]) -> str | None:
    """The prefix given by a ``--backend-config=python,shm-region-prefix-name=X`` in ``args``."""
    for arg in args:
        m = re.fullmatch(r"--backend-config=python,shm-region-prefix-name=(.+)", arg)
        if m:
            return m.group(1)
    return None



@functools.cache
def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc Linux: no parent-death signal
        return None


def terminate_with_parent() -> Callable[[], None] | None:
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

