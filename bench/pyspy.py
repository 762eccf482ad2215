"""Sampling profiles of running processes with py-spy (optional: ``.venv/bin/pip install py-spy``).

py-spy is not a dependency of metaleg; the benchmarks use it only when asked
to profile (``--profile``) and it is installed. Samples are written in
py-spy's "raw" format (collapsed stacks) and summarised by :func:`collapse`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys


def binary() -> str | None:
    """The py-spy executable (the venv's or one on PATH), or None."""
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(local):
        return local
    return shutil.which("py-spy")


def record(pid: int, path: str, rate: int = 250) -> subprocess.Popen[bytes] | None:
    """Start sampling ``pid`` (and its threads, idle ones left out) into ``path``; None without
    py-spy. Stop with :func:`stop`."""
    executable = binary()
    if executable is None:
        return None
    return subprocess.Popen(
        [executable, "record", "-p", str(pid), "-f", "raw", "-o", path, "-r", str(rate)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a recording; py-spy writes its file on SIGINT."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def collapse(path: str, limit: int = 25) -> str:
    """Top functions by inclusive samples and by own samples, as % of all samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    try:
        with open(path) as file:
            for line in file:
                stack, _, count_text = line.rstrip().rpartition(" ")
                count = int(count_text)
                frames = stack.split(";")
                total += count
                own[frames[-1]] = own.get(frames[-1], 0) + count
                for frame in set(frames):
                    inclusive[frame] = inclusive.get(frame, 0) + count
    except (OSError, ValueError):
        return f"(no py-spy samples in {path})"
    if not total:
        return f"(no py-spy samples in {path})"
    lines = [f"{total} samples", "inclusive:"]
    for frame, count in sorted(inclusive.items(), key=lambda x: -x[1])[:limit]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    lines.append("own:")
    for frame, count in sorted(own.items(), key=lambda x: -x[1])[:limit]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines)
