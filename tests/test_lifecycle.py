"""Process lifecycle helpers: check_in_child (a yes/no check in a forked child) and
map_large_blocks (glibc's mmap threshold), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaleg import lifecycle
from metaleg.lifecycle import ForkedCheckError, SignalWakeup, check_in_child
from tests.processes import process_alive
from tests.waiting import wait_until


@pytest.fixture(params=["pidfd", "pipe"])
def waiting(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the parent waits: on a pidfd, and on the pipe closing (no pidfd_open)."""
    if request.param == "pipe":

        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(lifecycle.os, "pidfd_open", no_pidfd)
    return str(request.param)


def test_the_answer_comes_from_the_child(waiting: str) -> None:
    parent = os.getpid()
    assert check_in_child(lambda: os.getpid() != parent, timeout=30) is True
    assert check_in_child(lambda: os.getpid() == parent, timeout=30) is False


def test_what_the_child_allocates_stays_in_the_child(waiting: str) -> None:
    held: list[bytes] = []

    def allocate() -> bool:
        held.append(b"x" * (8 << 20))
        return len(held) == 1

    assert check_in_child(allocate, timeout=30) is True
    assert check_in_child(allocate, timeout=30) is True  # the first child's list is not ours
    assert held == []


def test_an_exception_is_reported_with_its_type_and_message(waiting: str) -> None:
    def fail() -> bool:
        raise ValueError("listing is not JSON")

    with pytest.raises(ForkedCheckError, match=r"failed: ValueError: listing is not JSON"):
        check_in_child(fail, timeout=30)


def test_an_abnormal_exit_is_reported_with_its_status(waiting: str) -> None:
    with pytest.raises(ForkedCheckError, match=r"ended with status 7"):
        check_in_child(lambda: os._exit(7), timeout=30)


def test_a_slow_child_is_killed_and_reaped(waiting: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    def hang() -> bool:
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)
        return True

    started = time.monotonic()
    with pytest.raises(ForkedCheckError, match=r"took longer than 0.5s; killed"):
        check_in_child(hang, timeout=0.5)
    assert time.monotonic() - started < 30  # not the child's 60 s
    pid = int(pid_file.read_text())
    assert not process_alive(pid), "the child was not killed"
    with pytest.raises(ChildProcessError):  # and reaped: no child of ours is left
        os.waitpid(pid, os.WNOHANG)


@pytest.fixture
def wakeup() -> Iterator[SignalWakeup]:
    """A SignalWakeup in this (test) process, as a worker has one; restored afterwards."""
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.getsignal(s) for s in signums}
    waker = SignalWakeup(*signums)
    try:
        yield waker
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        waker.reader.close()
        waker._writer.close()


def test_the_child_does_not_use_the_parents_signal_handlers(wakeup: SignalWakeup) -> None:
    """SIGTERM ends the child (default action); no signal wakes the parent's poller."""
    with pytest.raises(ForkedCheckError, match=rf"ended with status -{int(signal.SIGTERM)}"):
        check_in_child(lambda: bool(os.kill(os.getpid(), signal.SIGTERM)), timeout=30)

    def signal_itself() -> bool:
        os.kill(os.getpid(), signal.SIGUSR1)  # a handler the child keeps
        return True

    assert check_in_child(signal_itself, timeout=30)
    with pytest.raises(BlockingIOError):  # no wake-up byte reached the parent's socket
        wakeup.reader.recv(4096)


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A worker killed during a check must not leave the child behind."""
    pid_file = tmp_path / "pid"
    script = textwrap.dedent(
        f"""
        import os, pathlib, time
        from metaleg.lifecycle import check_in_child

        def hang():
            pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))
            time.sleep(60)
            return True

        check_in_child(hang, timeout=60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), message="the child")
        child = int(pid_file.read_text())
        parent.kill()
        parent.wait(timeout=10)
        # The child is re-parented (to init or a subreaper) and reaped there.
        wait_until(lambda: not process_alive(child), message="the child to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)


# --- map_large_blocks: glibc's mmap threshold kept fixed ------------------------------------

_MAPPED_AFTER_A_FREE = """
import ctypes, sys
from metaleg.lifecycle import map_large_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    assert map_large_blocks()
frame = bytearray(1 << 20)   # a snapshot frame: mapped (above 128 KiB)
del frame                    # freeing it raises a dynamic threshold to 1 MiB
before = libc.mallinfo2().hblkhd
frame = bytearray(1 << 20)   # the next frame
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.parametrize("threshold", ["dynamic", "fixed"])
def test_large_blocks_stay_mapped_after_a_free(threshold: str) -> None:
    """With glibc's dynamic threshold the second 1 MiB block comes from the heap (where it
    fragments and stays resident); with map_large_blocks it gets its own mapping again."""
    output = subprocess.run(
        [sys.executable, "-c", _MAPPED_AFTER_A_FREE, threshold],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    mapped = int(output)
    if threshold == "fixed":
        assert mapped >= 1 << 20
    else:
        assert mapped < 1 << 20  # the premise: glibc would put it in the heap
