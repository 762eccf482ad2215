"""The fork server: workers forked from one process that imported their common modules.

Every worker (watcher, firewall, routing, audit) imports the same ~15 MiB of
Python objects before it does anything of its own: msgspec, pyzmq,
prometheus-client and metaleg's model, IPC, config, logging and worker loop;
both data-plane workers import pyroute2 (~11 MiB) too.
Started as ``python -m metaleg.<worker>``, each holds a private copy. The
supervisor instead starts this server once (``python -m metaleg.forkserver``); it
imports those modules, freezes them out of the garbage collector's reach
(``gc.freeze``: a collection would otherwise write to every object's header and
copy its page), and forks a worker whenever the supervisor asks. The children
share those pages with the server and each other until they write to them. At
N=1000 this is the difference between the iptables agent's total PSS above and
below 200 MiB (docs/benchmarks.md). It also makes a restart faster: the child
starts with its imports done.

The workers stay separate OS processes that the supervisor restarts one by
one; only their parent is the server, not the supervisor. So the server reports
their exits (``Exited``), and :class:`ForkedProcess` gives the supervisor what
it used from ``subprocess.Popen``: ``pid``, ``poll``, ``wait``, ``send_signal``,
``kill``. The server must stay single-threaded (it forks): it creates no ZeroMQ
context and no thread, and imports nothing that starts one.

Lifetimes: the server dies with the supervisor (a parent-death signal, and the
end of the channel); a worker dies with the server (its own parent-death signal,
:func:`metaleg.lifecycle.die_with_parent`). If the server dies alone, the
supervisor counts every worker dead, stops what is left of them and starts a
new server with the next restart.

The channel is a ``SOCK_SEQPACKET`` socket pair (one message per packet),
messages are msgspec Structs.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import msgspec

from metaleg.lifecycle import (
    PARENT_ENVIRONMENT,
    die_with_parent,
    process_running,
    set_process_name,
    start_worker,
)

log = logging.getLogger("metaleg.forkserver")  # not __name__: the server runs as __main__

PRELOADED = (
    "msgspec",
    "zmq",
    "prometheus_client",
    "pyroute2",
    "metaleg.backend",
    "metaleg.config",
    "metaleg.ipc",
    "metaleg.lifecycle",
    "metaleg.logs",
    "metaleg.metrics",
    "metaleg.model",
    "metaleg.state_changes",
    "metaleg.worker",
)
"""What the workers import: every one of them, or (``pyroute2``, ~11 MiB) both data-plane
workers, routing at start and the firewall at its first deletion of conntrack entries.
Not ``kubernetes``: only the watcher imports it, a copy in the server would share nothing."""

START_TIMEOUT = 30.0
"""Seconds the server may take to import :data:`PRELOADED` and say it is ready."""
REPLY_TIMEOUT = 10.0
"""Seconds a fork may take to be answered."""
_MAX_MESSAGE = 64 * 1024


class Ready(msgspec.Struct, tag=True, frozen=True):
    """Server -> supervisor: imports done, requests are served."""

    pid: int


class Start(msgspec.Struct, tag=True, frozen=True):
    """Supervisor -> server: fork a child that runs ``python -m <module>``'s code."""

    name: str
    module: str


class Started(msgspec.Struct, tag=True, frozen=True):
    name: str
    pid: int


class StartFailed(msgspec.Struct, tag=True, frozen=True):
    name: str
    error: str


class Exited(msgspec.Struct, tag=True, frozen=True):
    """Server -> supervisor: a child ended (``returncode`` as Popen's: -N for signal N)."""

    pid: int
    returncode: int


Message = Ready | Start | Started | StartFailed | Exited
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ForkServerError(RuntimeError):
    """The server could not be started or did not answer."""


# --- the server process ------------------------------------------------------------------------


def serve(channel: socket.socket) -> Start | None:
    """Fork children on request until the supervisor goes away.

    Returns in a child only, with the request it must run; in the server it returns
    None when the channel ends (the supervisor is gone).
    """
    wakeup_reader, wakeup_writer = socket.socketpair()
    wakeup_reader.setblocking(False)
    wakeup_writer.setblocking(False)
    signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    server = os.getpid()
    if not _send(channel, Ready(server)):
        return None
    while True:
        readable, _, _ = select.select([channel, wakeup_reader], [], [])
        if wakeup_reader in readable:
            with contextlib.suppress(BlockingIOError):
                while wakeup_reader.recv(4096):
                    pass
        if not _report_exits(channel):
            return None
        if channel not in readable:
            continue
        data = channel.recv(_MAX_MESSAGE)
        if not data:
            return None
        try:
            request = _decoder.decode(data)
        except msgspec.DecodeError as error:
            log.warning("dropped a malformed request", extra={"error": str(error)})
            continue
        if not isinstance(request, Start):
            continue
        try:
            pid = os.fork()
        except OSError as error:
            if not _send(channel, StartFailed(request.name, f"fork: {error}")):
                return None
            continue
        if pid == 0:
            # First of all: end with the server, even if it died a moment ago.
            die_with_parent(server)
            os.environ[PARENT_ENVIRONMENT] = str(server)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            wakeup_reader.close()
            wakeup_writer.close()
            channel.close()
            return request
        if not _send(channel, Started(request.name, pid)):
            return None


def _send(channel: socket.socket, message: Message) -> bool:
    """Send ``message``; False when the supervisor is gone (the server then ends, and its
    children with it)."""
    try:
        channel.send(_encoder.encode(message))
    except OSError:
        return False
    return True


def _report_exits(channel: socket.socket) -> bool:
    """Reap the children that ended and report them; False when the supervisor is gone."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return True
        if not _send(channel, Exited(pid, os.waitstatus_to_exitcode(status))):
            return False


def main(argv: Sequence[str] = sys.argv) -> None:
    """``python -m metaleg.forkserver <fd>``: preload, then serve on the inherited socket."""
    # What every worker does first (mmap threshold, config, logging, parent-death signal),
    # done before the imports so that the children inherit it.
    start_worker("forkserver")
    set_process_name("metaleg-fork")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the supervisor's to handle
    channel = socket.socket(fileno=int(argv[1]))
    for module in PRELOADED:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()
    request = serve(channel)
    if request is None:
        return
    # This is the child: it becomes the worker, as ``python -m <module>`` would.
    set_process_name(f"metaleg-{request.name}")
    sys.argv = [request.module]
    runpy.run_module(request.module, run_name="__main__", alter_sys=True)


# --- the supervisor's side ---------------------------------------------------------------------


class ForkedProcess:
    """A worker forked by the server: the part of ``subprocess.Popen`` the supervisor uses.

    ``returncode`` is set when :meth:`ForkServer.receive` reads the server's report (the
    supervisor's loop calls it when the channel is readable): :meth:`poll` reads no
    socket, so that the HTTP threads (probes, metrics) may call it.
    """

    def __init__(self, server: ForkServer, name: str, pid: int) -> None:
        self.server = server
        self.name = name
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Read the server's reports until this process ended (the supervisor's thread only)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.server.receive()
        while self.returncode is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(self.name, timeout or 0.0)
            self.server.wait_readable(0.1 if remaining is None else min(remaining, 0.1))
            self.server.receive()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The supervisor's handle on the fork server process (started on first use)."""

    def __init__(
        self, environment: dict[str, str], stop_grace: float, python: str = sys.executable
    ) -> None:
        """``environment``: the server's and so every worker's; ``stop_grace``: how long the
        workers of a lost server may take to exit on SIGTERM (:meth:`reap_lost`)."""
        self.environment = environment
        self.stop_grace = stop_grace
        self.python = python
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: socket.socket | None = None
        self.children: dict[int, ForkedProcess] = {}
        self.lost: list[ForkedProcess] = []
        """Children of a server that died: they get its parent-death signal; the
        supervisor makes sure they are gone before it starts new ones."""

    def fileno(self) -> int:
        """The channel, for a poller (-1 while no server runs)."""
        return self.channel.fileno() if self.channel is not None else -1

    def start(self, name: str, module: str) -> ForkedProcess:
        """Fork a child that runs ``module`` as ``python -m`` would (raises
        :class:`ForkServerError`)."""
        self.receive()  # a server that ended is noticed here, not by a failed request
        if self.lost:
            self.reap_lost(self.stop_grace)
        if self.channel is None:
            self._launch()
        assert self.channel is not None
        try:
            self.channel.send(_encoder.encode(Start(name, module)))
        except OSError as error:
            self._lose(f"cannot send it a request: {error}")
            raise ForkServerError(f"cannot start {name}: the fork server is gone") from error
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            reply = self._next(deadline, f"starting {name}")
            if isinstance(reply, Started):
                child = ForkedProcess(self, reply.name, reply.pid)
                self.children[reply.pid] = child
                return child
            if isinstance(reply, StartFailed):
                raise ForkServerError(f"cannot start {name}: {reply.error}")
            self._apply(reply)

    def receive(self) -> None:
        """Apply what the server reported (children's exits) without blocking."""
        while self.channel is not None:
            try:
                data = self.channel.recv(_MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lose("the fork server ended")
                return
            with contextlib.suppress(msgspec.DecodeError):
                self._apply(_decoder.decode(data))

    def wait_readable(self, timeout: float) -> None:
        if self.channel is None:
            time.sleep(timeout)
            return
        select.select([self.channel], [], [], timeout)

    def close(self) -> None:
        """End the server (it exits when its channel ends); its children are the caller's to
        stop first."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process = None

    # --- internals ---

    def _launch(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [self.python, "-m", "metaleg.forkserver", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=self.environment,
            )
        except OSError as error:
            ours.close()
            raise ForkServerError(f"cannot start the fork server: {error}") from error
        finally:
            theirs.close()
        self.channel = ours
        reply = self._next(time.monotonic() + START_TIMEOUT, "the fork server's start")
        if not isinstance(reply, Ready):
            self._lose("the fork server said something else than ready")
            raise ForkServerError(f"the fork server started with {reply!r}")

    def _next(self, deadline: float, waiting_for: str) -> Message:
        assert self.channel is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._lose(f"no answer to {waiting_for}")
                raise ForkServerError(f"the fork server did not answer {waiting_for}")
            readable, _, _ = select.select([self.channel], [], [], remaining)
            if not readable:
                continue
            data = self.channel.recv(_MAX_MESSAGE)
            if not data:
                self._lose("the fork server ended")
                raise ForkServerError(f"the fork server ended before {waiting_for}")
            try:
                return _decoder.decode(data)
            except msgspec.DecodeError:
                continue

    def _apply(self, message: Message) -> None:
        if isinstance(message, Exited):
            child = self.children.pop(message.pid, None)
            if child is not None:
                child.returncode = message.returncode

    def _lose(self, reason: str) -> None:
        """The server is gone or useless: every child counts as dead (-SIGKILL: it gets the
        parent-death signal or is killed by :meth:`reap_lost`)."""
        log.error("fork server lost (%s): its workers count as dead and are stopped", reason)
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None
        for child in self.children.values():
            child.returncode = -signal.SIGKILL
            self.lost.append(child)
        self.children.clear()

    def reap_lost(self, timeout: float) -> None:
        """Make sure the children of a lost server are gone before new ones start, so that
        no two copies of a worker run: SIGTERM (they had it as their parent-death signal
        if the server died), up to ``timeout`` to exit, then SIGKILL."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for child in self.lost:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)
            deadline = time.monotonic() + timeout
            while any(process_running(c.pid) for c in self.lost) and time.monotonic() < deadline:
                time.sleep(0.01)
        self.lost.clear()


if __name__ == "__main__":
    main()
