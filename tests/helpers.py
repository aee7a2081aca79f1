"""Small helpers shared by test modules: running a command's entry point in process, and
waiting for a server process to answer readiness."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable


def run_cli(main: Callable, argv, capsys) -> tuple[int, str, list[str]]:
    """(exit status, stdout, non-blank stderr lines) of a command-line entry point."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def wait_http_ready(proc: subprocess.Popen, http_port: int, timeout: float,
                    output: Callable[[], str]) -> None:
    """Until 127.0.0.1:`http_port` answers /v2/health/ready; fails (quoting `output()`)
    when `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n"
                                 f"{output()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready",
                                        timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout:.0f} s:\n{output()[-4000:]}")
