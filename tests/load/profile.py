"""Sampling profiles of a service process with py-spy, and a short summary of them."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def find_py_spy() -> str | None:
    """py-spy from PATH or next to this interpreter (`.venv/bin/pip install py-spy`)."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


class Recording:
    """`py-spy record` of one process for a bounded time, in the raw (folded) format."""

    def __init__(
        self, binary: str, pid: int, seconds: float, out: Path, rate: int = 200, native: bool = False
    ) -> None:
        """Without `native` py-spy reads the process without stopping it; with it (C frames of
        gevent, greenlet, the interpreter) it pauses the process at each sample."""
        self.out = out
        mode = ["--native"] if native else ["--nonblocking"]
        self.process = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                str(rate),
                "--format",
                "raw",
                *mode,
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self, timeout: float = 30, *, now: bool = False) -> str:
        """Wait for the recording (or end it `now`); its summary, or why there is none."""
        err = stop_recorder(self.process, timeout, now=now)
        if self.process.returncode != 0 or not self.out.exists():
            return f"py-spy failed ({self.process.returncode}): {err.decode(errors='replace')[-500:]}"
        return summarize(self.out.read_text())


def stop_recorder(process: subprocess.Popen[bytes], timeout: float, *, now: bool) -> bytes:
    """Wait for a recorder (py-spy, perf) to end, or end it `now` with SIGINT, on which
    both write what they have; killed past `timeout`. Its standard error."""
    if now and process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate(timeout=5)
    return bytes(err or b"")


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)".
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _ = where.rpartition(":")
    parts = Path(path).parts
    tail = "/".join(parts[-2:]) if parts else path
    return f"{name} ({tail})"


def summarize(folded: str, top: int = 15) -> str:
    """Self time by function and inclusive time by function, as shares of all samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self time (where the CPU is spent):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time (the function and what it calls):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)
