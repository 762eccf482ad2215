"""The supervisor: starts the worker processes, restarts them, and is the hub of their messages.

It outlives every worker, so it holds the current desired state: a restarted
firewall or routing worker gets it at once, even while the watcher itself is
restarting. It numbers each distinct state it receives (the generation) and
records what every worker reports. On SIGTERM it stops the workers and exits;
kernel state stays in place (the next start re-syncs it), as the original did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from metaleg.config import Config
from metaleg.ipc import (
    Applied,
    Hello,
    MessageError,
    Publish,
    Snapshot,
    WatcherStatus,
    bind_supervisor,
    decode,
    encode,
    prepare_run_dir,
)
from metaleg.lifecycle import CONFIG_ENVIRONMENT, SignalWakeup

log = logging.getLogger(__name__)

WORKERS = {
    "watcher": "metaleg.watcher",
    "firewall": "metaleg.firewall",
    "routing": "metaleg.routing",
}
DATAPLANE_WORKERS = ("firewall", "routing")
RESTART_INITIAL = 0.5
"""The first restart comes within a second of the crash..."""
RESTART_MAX = 30.0
"""...later ones back off exponentially up to this..."""
RESTART_RESET_AFTER = 60.0
"""...until a worker has stayed up this long."""
STOP_GRACE = 10.0


@dataclass
class Worker:
    """A supervised worker process and what it reported."""

    name: str
    module: str
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_delay: float = RESTART_INITIAL
    next_start: float = 0.0
    applied_generation: int = 0
    last_error: str = ""
    last_exit: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, config: Config, workers: dict[str, str] | None = None) -> None:
        self.config = config
        self.workers = {name: Worker(name, module) for name, module in (workers or WORKERS).items()}
        self.snapshot: Snapshot | None = None
        self.problems: tuple[str, ...] = ()
        self.watcher_status = WatcherStatus(synced=False)
        self.dropped_messages = 0
        self.stopping = False
        self.socket: zmq.Socket[Any] | None = None

    # --- processes ---------------------------------------------------------------------------

    def _start(self, worker: Worker) -> None:
        environment = dict(os.environ)
        environment[CONFIG_ENVIRONMENT] = msgspec.json.encode(self.config).decode()
        worker.process = subprocess.Popen([sys.executable, "-m", worker.module], env=environment)
        worker.started_at = time.monotonic()
        log.info("started %s", worker.name, extra={"pid": worker.process.pid})

    def _reap(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.process is None or worker.process.poll() is None:
                continue
            code = worker.process.returncode
            worker.last_exit = f"signal {-code}" if code < 0 else f"exit status {code}"
            worker.process = None
            if self.stopping:
                continue
            if now - worker.started_at > RESTART_RESET_AFTER:
                worker.restart_delay = RESTART_INITIAL
            worker.next_start = now + worker.restart_delay
            log.error(
                "%s died (%s); restarting in %.1fs",
                worker.name,
                worker.last_exit,
                worker.restart_delay,
                extra={"error": worker.last_exit},
            )
            worker.restart_delay = min(worker.restart_delay * 2, RESTART_MAX)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.process is None and not self.stopping and now >= worker.next_start:
                worker.restarts += 1 if worker.started_at else 0
                self._start(worker)

    def _stop_all(self) -> None:
        self.stopping = True
        for worker in self.workers.values():
            if worker.running:
                assert worker.process is not None
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for worker in self.workers.values():
            if worker.process is None:
                continue
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", worker.name, STOP_GRACE)
                worker.process.kill()
                worker.process.wait()

    # --- messages ----------------------------------------------------------------------------

    def _send(self, worker: str, message: Snapshot) -> None:
        assert self.socket is not None
        # A full queue means that worker is stuck or gone; it asks again with Hello on restart.
        with contextlib.suppress(zmq.Again):
            self.socket.send_multipart([worker.encode(), encode(message)], zmq.NOBLOCK)

    def _receive_all(self) -> None:
        assert self.socket is not None
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0].decode(errors="replace")
            if len(frames) != 2 or identity not in self.workers:
                self.dropped_messages += 1
                log.warning("dropped a message from unexpected peer %r", identity)
                continue
            try:
                message = decode(frames[1])
            except MessageError as error:
                self.dropped_messages += 1
                log.warning("dropped a message from %s: %s", identity, error)
                continue
            self._handle(identity, message)

    def _handle(self, sender: str, message: Any) -> None:
        if isinstance(message, Publish) and sender == "watcher":
            self.problems = message.problems
            if self.snapshot is None or message.state != self.snapshot.state:
                generation = (self.snapshot.generation if self.snapshot else 0) + 1
                self.snapshot = Snapshot(generation, message.state)
                log.info("new desired state", extra={"generation": generation})
                for name in DATAPLANE_WORKERS:
                    self._send(name, self.snapshot)
        elif isinstance(message, WatcherStatus) and sender == "watcher":
            if message.error != self.watcher_status.error and message.error:
                log.warning("watcher: %s", message.error)
            self.watcher_status = message
        elif isinstance(message, Hello) and sender in DATAPLANE_WORKERS:
            if self.snapshot is not None:
                self._send(sender, self.snapshot)
        elif isinstance(message, Applied) and sender in DATAPLANE_WORKERS:
            worker = self.workers[sender]
            if message.error:
                worker.last_error = message.error
            else:
                worker.applied_generation = message.generation
                worker.last_error = ""
        else:
            self.dropped_messages += 1
            log.warning("dropped an unexpected %s from %s", type(message).__name__, sender)

    # --- main loop ---------------------------------------------------------------------------

    def run(self) -> int:
        prepare_run_dir(self.config.run_dir)
        context: zmq.Context[Any] = zmq.Context()
        self.socket = bind_supervisor(context, self.config.run_dir)
        wakeup = SignalWakeup(signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(wakeup.fileno(), zmq.POLLIN)
        log.info(
            "supervisor started",
            extra={"node": self.config.node_name, "backend": self.config.firewall_backend},
        )
        try:
            self._restart_due()
            while True:
                pending = [w.next_start for w in self.workers.values() if w.process is None]
                timeout = None
                if pending:
                    timeout = max(0, int((min(pending) - time.monotonic()) * 1000))
                events = dict(poller.poll(timeout))
                if wakeup.fileno() in events:
                    received = wakeup.drain()
                    if signal.SIGTERM in received or signal.SIGINT in received:
                        log.info("stopping workers; kernel state stays in place")
                        self._stop_all()
                        return 0
                self._reap()
                if self.socket in events:
                    self._receive_all()
                self._restart_due()
        finally:
            self.stopping = True
            for worker in self.workers.values():
                if worker.running:
                    assert worker.process is not None
                    worker.process.kill()
            self.socket.close(0)
            context.term()
