"""Reading tritonserver's output: the lines that say why it failed or died."""

from __future__ import annotations

import contextlib
import re
import signal
from typing import IO

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


def exit_headline(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"tritonserver was killed by {signal.Signals(-code).name}"
    return f"tritonserver exited with code {code}"


def pump_output(stream: IO[bytes], log: IO[str], echo: IO[str] | None) -> None:
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

