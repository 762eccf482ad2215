"""Process lifecycle helpers shared by the supervisor and the workers."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import select
import signal
import socket
import time
import warnings
from collections.abc import Callable, Container
from types import FrameType

from metaleg.config import Config

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(parent: int | None, signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies.

    A worker must not outlive its supervisor (a new supervisor starts new
    workers); SIGTERM lets it exit cleanly, leaving kernel state in place.

    ``parent`` is the pid the caller was started by, known before it started: if
    the parent pid is another one now, the parent died before ``prctl`` took
    effect (the child was adopted), and the signal is sent at once. Comparing
    with 1 instead would be wrong twice: the supervisor *is* pid 1 in its
    container, and orphans go to the nearest subreaper (:func:`become_subreaper`),
    not always to pid 1. None: not known, no such check.
    """
    libc = _libc()
    if libc is None:
        raise OSError("cannot load the C library for prctl(PR_SET_PDEATHSIG)")
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)


def set_process_name(name: str) -> None:
    """Name this process as ``ps -o comm``, ``top`` and ``/proc/<pid>/comm`` show it (the
    kernel keeps 15 bytes): workers forked by :mod:`metaleg.forkserver` share its command
    line, this tells them apart."""
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (``prctl(PR_SET_CHILD_SUBREAPER)``).

    The supervisor's workers are its fork server's children, and the firewall's
    xtables helpers the firewall's: when their parent dies they are orphans. As
    the container's PID 1 the supervisor gets them anyway; as a subreaper it gets
    them everywhere (tests, a host install), so that they stay in its tree and
    :func:`reap_orphans` can collect them. Returns whether it took effect.
    """
    libc = _libc()
    return libc is not None and libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def process_stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter (``R``, ``S``, ``Z``...) and parent pid from
    ``/proc/<pid>/stat``; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def process_running(pid: int) -> bool:
    """Whether ``pid`` exists and has not ended (a zombie waiting to be collected has)."""
    stat = process_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def process_tree() -> dict[int, list[int]]:
    """Every process's children, from ``/proc`` (parent pid -> child pids)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := process_stat(int(entry))) is not None:
            tree.setdefault(stat[1], []).append(int(entry))
    return tree


def reap_orphans(keep: Container[int]) -> list[int]:
    """Collect this process's children that have ended and that nobody waits for: adopted
    orphans (:func:`become_subreaper`). ``keep``: children that their own handle waits for
    (a ``subprocess.Popen``'s). Returns the pids collected.

    Without it each adopted orphan that ends stays a zombie (an entry in the process
    table) until the supervisor exits."""
    reaped: list[int] = []
    for child in process_tree().get(os.getpid(), []):
        if child in keep or process_running(child):
            continue
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(child, os.WNOHANG)[0]:
                reaped.append(child)
    return reaped


class SignalWakeup:
    """Turns signals into readable bytes on a socket that a poller can wait on.

    Python runs signal handlers only between bytecodes, so a process blocked in
    ``zmq.Poller.poll`` would not notice SIGTERM or SIGCHLD until the timeout;
    with the wake-up fd registered in the poller it wakes at once.
    """

    def __init__(self, *signums: int) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self.received: list[int] = []
        for signum in signums:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def fileno(self) -> int:
        return self.reader.fileno()

    def drain(self) -> list[int]:
        """Empty the socket and return the signals received since the last call."""
        try:
            while self.reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        received, self.received = self.received, []
        return received


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def release_memory() -> bool:
    """Give the free memory of the heap back to the kernel (glibc ``malloc_trim(0)``).

    Called after the large, short-lived allocations of a full list or re-sync: without it
    the freed pages stay resident until malloc happens to reuse them. Returns whether
    memory was released (False without glibc)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    return bool(trim(0))


_M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc ``malloc.h``)."""

MMAP_THRESHOLD = 128 * 1024
"""Blocks from this size up get their own mapping (glibc's initial threshold, kept fixed)."""


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Keep glibc's mmap threshold fixed, so that large blocks are always mapped and unmapped.

    glibc starts with a threshold of 128 KiB and raises it to the size of any
    mapped block that is freed (up to 32 MiB), and its trim threshold to twice
    that. The first freed snapshot frame (~1 MiB at N=1000; the supervisor
    sends a complete state per change) thus moves every later frame, and large
    dict and list tables, into the heap or a thread's arena (ZeroMQ's I/O
    thread receives the frames), where the blocks allocated between them keep
    the freed space resident and free tops below the raised trim threshold are
    never returned. Measured at N=1000 under churn, first 3 minutes: the
    firewall process grew 3.2 MiB with the dynamic threshold, 1.4 MiB with a
    fixed one; the supervisor and routing ~1-2 MiB less each. Mapping a block
    costs a system call and its page faults (~0.3 ms per MiB), a few per
    snapshot.

    Call it first thing in a process (blocks already in the heap stay there).
    Returns whether it took effect (False without glibc).
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


class HeapTrimmer:
    """Calls :func:`release_memory` after work, at most once per ``interval`` seconds.

    Every update decodes a state and computes a change: short-lived allocations
    that glibc keeps in the heap once they are freed, between the long-lived
    objects allocated meanwhile. A busy process's resident memory thus settled
    a few MiB above its size after start-up (measured at N=1000, 5 updates a
    second: +1.5 MiB of free heap in the firewall process within the first
    minute). ``malloc_trim`` costs ~0.1 ms.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = time.monotonic()

    def after_work(self, *, force: bool = False) -> None:
        """Release now if forced (after a large operation) or if ``interval`` has passed."""
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            release_memory()


class ForkedCheckError(Exception):
    """A check run in a forked child gave no answer (not forked, failed or too slow)."""


_CHECK_TRUE, _CHECK_FALSE, _CHECK_FAILED = 0, 1, 2
"""Exit statuses of a :func:`check_in_child` child: its answer, or an exception."""

_ERROR_LIMIT = 4096
"""Bytes of a failed check's message the child writes (well below a pipe's buffer)."""


def check_in_child(check: Callable[[], bool], *, timeout: float) -> bool:
    """Run ``check`` in a short-lived forked child and return its answer.

    For a large, short-lived piece of work whose result is a yes or a no (the
    nftables re-sync's listing and comparison of the whole table): the child
    allocates the peak and the kernel takes it back when the child exits. Done
    in the long-lived process, part of that peak stays resident for good: glibc
    and pymalloc return freed memory only where nothing allocated meanwhile
    pins it (measured at N=1000 under churn: +3.9 MiB kept at the first re-sync).

    The child is a copy of this process (copy on write) running only ``check``,
    in the forking thread: ``check`` must not use what other threads own
    (ZeroMQ sockets, locks) nor sockets it shares with the parent; it should
    open its own (e.g. a fresh libnftables context). The child dies with the
    parent and never runs the parent's exit handlers.

    Raises :class:`ForkedCheckError` when the child cannot be started, raises
    (the message names the exception), or runs longer than ``timeout``
    seconds (it is killed).
    """
    reader, writer = os.pipe()
    parent = os.getpid()
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about forking a process with threads (ZeroMQ's I/O
            # thread, the metrics server): the child only runs ``check`` and exits.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError as error:
        os.close(reader)
        os.close(writer)
        raise ForkedCheckError(f"cannot fork: {error}") from error
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        _run_check(check, reader, writer, parent)
    os.close(writer)
    try:
        return _await_check(pid, reader, timeout)
    finally:
        os.close(reader)


def _run_check(check: Callable[[], bool], reader: int, writer: int, parent: int) -> None:
    """The child's side of :func:`check_in_child`: answer through the exit status."""
    status = _CHECK_FAILED
    try:
        os.close(reader)
        # The parent's signal plumbing is not the child's: no wake-up bytes into the
        # parent's socket, and SIGTERM/SIGINT end the child.
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        die_with_parent(parent, signal.SIGKILL)
        # No collection of the parent's garbage here: finalizers of unreachable objects
        # (sockets of another thread, say) must not run in a copy of the process, and
        # the child lives for one check.
        gc.disable()
        status = _CHECK_TRUE if check() else _CHECK_FALSE
    except BaseException as error:  # reported to the parent, which decides
        message = f"{type(error).__name__}: {error}".encode(errors="replace")
        with contextlib.suppress(OSError):  # the parent reports the exit status then
            os.write(writer, message[:_ERROR_LIMIT])
    finally:
        os._exit(status)


def _await_check(pid: int, reader: int, timeout: float) -> bool:
    """The parent's side of :func:`check_in_child`: wait for the exit status (bounded)."""
    exited = False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = -1  # no pidfd (kernel < 5.3): wait for the pipe to close instead
    try:
        waited_on = pidfd if pidfd >= 0 else reader
        poller = select.poll()
        poller.register(waited_on, select.POLLIN)
        deadline = time.monotonic() + timeout
        while not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                exited = bool(poller.poll(left * 1000))
            except InterruptedError:  # pragma: no cover - PEP 475 retries poll itself
                continue
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    if not exited:
        raise ForkedCheckError(f"the child (pid {pid}) took longer than {timeout:g}s; killed")
    code = os.waitstatus_to_exitcode(wait_status)
    if code == _CHECK_TRUE:
        return True
    if code == _CHECK_FALSE:
        return False
    message = (
        os.read(reader, _ERROR_LIMIT).decode(errors="replace") if code == _CHECK_FAILED else ""
    )
    raise ForkedCheckError(
        f"the child (pid {pid}) failed: {message}"
        if message
        else f"the child (pid {pid}) ended with status {code}"
    )


CONFIG_ENVIRONMENT = "METALEG_WORKER_CONFIG"
"""The environment variable through which the supervisor hands a worker its validated Config."""
PARENT_ENVIRONMENT = "METALEG_PARENT_PID"
"""The pid of the process that started this one (the supervisor for the fork server, the
fork server for a worker), for :func:`die_with_parent`'s check."""


def start_worker(process: str) -> Config:
    """Common start of a worker process: large blocks mapped (:func:`map_large_blocks`), config
    from the supervisor, logging, parent death signal.

    Exits with status 2 and a clear message when started other than by the supervisor.
    """
    import sys

    import msgspec

    from metaleg.logs import setup_logging

    map_large_blocks()
    raw = os.environ.get(CONFIG_ENVIRONMENT)
    if not raw:
        sys.stderr.write(
            f"metaleg {process}: start me with 'metaleg-supervisor run', not directly\n"
        )
        raise SystemExit(2)
    try:
        config = msgspec.json.decode(raw.encode(), type=Config)
    except msgspec.DecodeError as error:
        sys.stderr.write(f"metaleg {process}: invalid {CONFIG_ENVIRONMENT}: {error}\n")
        raise SystemExit(2) from None
    setup_logging(process, config.log_level, config.log_format, config.log_level_libraries)
    parent = os.environ.get(PARENT_ENVIRONMENT, "")
    die_with_parent(int(parent) if parent.isdigit() else None)
    return config
