"""The loop of a data-plane worker (firewall or routing) around its :class:`Backend`.

It receives numbered snapshots from the supervisor, applies the newest one
(older ones that queued up meanwhile are skipped: each snapshot is complete),
reports the result, retries failures with exponential back-off, and runs a full
re-sync at start and every RECONCILIATION_INTERVAL. The first application in a
fresh process is always a full re-sync, so a restarted worker repairs whatever
happened while it was away.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from typing import Any

import zmq

from metaleg.backend import Backend, BackendError
from metaleg.config import Config
from metaleg.ipc import (
    Applied,
    Hello,
    MessageError,
    Snapshot,
    StateDecoder,
    connect_worker,
    decode_routes_only,
    encode,
)
from metaleg.lifecycle import HeapTrimmer, SignalWakeup
from metaleg.metrics import APPLY_DURATION, ERRORS, IPC_DROPPED

log = logging.getLogger(__name__)

HELLO_INTERVAL = 2.0
RETRY_INITIAL = 0.5
RETRY_MAX = 30.0


class DataplaneWorker:
    """One data-plane worker process: its socket, its backend and what it has applied."""

    def __init__(
        self, process: str, backend: Backend, config: Config, *, routes_only: bool = False
    ) -> None:
        """``routes_only``: the backend reads only the node, mask and routes of a state (the
        routing worker), so snapshots are decoded without their Services and transit guard."""
        self.process = process
        self.backend = backend
        self.config = config
        self._decode = decode_routes_only if routes_only else StateDecoder().decode
        self.trimmer = HeapTrimmer()
        self.latest: Snapshot | None = None
        self.applied_generation = 0
        self.resynced_once = False
        self.dropped_messages = 0
        self.retry_delay = RETRY_INITIAL
        self.next_attempt = 0.0
        self.next_resync = 0.0

    def run(self) -> int:
        """Serve until SIGTERM; returns the exit status."""
        context: zmq.Context[Any] = zmq.Context()
        socket = connect_worker(context, self.config.run_dir, self.process)
        wakeup = SignalWakeup(signal.SIGTERM, signal.SIGINT)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(wakeup.fileno(), zmq.POLLIN)
        next_hello = 0.0
        log.info("started", extra={"backend": self.backend.name, "pid": os.getpid()})
        try:
            while True:
                now = time.monotonic()
                if self.latest is None and now >= next_hello:
                    socket.send(
                        encode(
                            Hello(
                                self.process,
                                os.getpid(),
                                self.applied_generation,
                                self.backend.name,
                            )
                        )
                    )
                    next_hello = now + HELLO_INTERVAL
                deadlines = [next_hello] if self.latest is None else []
                if self.latest is not None:
                    deadlines.append(max(self.next_attempt, self.next_resync))
                    if self._wants_apply():
                        deadlines.append(self.next_attempt)
                timeout_ms = max(0, int((min(deadlines) - now) * 1000)) if deadlines else None
                events = dict(poller.poll(timeout_ms))
                if wakeup.fileno() in events and {signal.SIGTERM, signal.SIGINT} & set(
                    wakeup.drain()
                ):
                    log.info("stopping on signal; kernel state stays in place")
                    return 0
                if socket in events:
                    self._receive_all(socket)
                self._work(socket)
        finally:
            self.backend.close()
            socket.close(0)
            context.term()

    def _receive_all(self, socket: zmq.Socket[Any]) -> None:
        while True:
            try:
                frame = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = self._decode(frame)
            except MessageError as error:
                self.dropped_messages += 1
                IPC_DROPPED.labels(self.process).inc()
                log.warning("dropped a message", extra={"error": str(error)})
                continue
            if not isinstance(message, Snapshot):
                self.dropped_messages += 1
                IPC_DROPPED.labels(self.process).inc()
                log.warning("dropped an unexpected %s message", type(message).__name__)
                continue
            if self.latest is None or message.generation != self.latest.generation:
                self.latest = message
                self.next_attempt = 0.0
                self.retry_delay = RETRY_INITIAL

    def _wants_apply(self) -> bool:
        return self.latest is not None and self.latest.generation != self.applied_generation

    def _work(self, socket: zmq.Socket[Any]) -> None:
        now = time.monotonic()
        latest = self.latest
        if latest is None:
            return
        if now < self.next_attempt:
            return  # backing off after a failure; a new snapshot resets this
        full = not self.resynced_once or now >= self.next_resync
        if not full and not self._wants_apply():
            return
        started = time.monotonic()
        error = ""
        try:
            if full:
                if self.resynced_once and self._wants_apply():
                    # A snapshot arrived since the last apply: take it the cheap way
                    # first, so that the re-sync compares the kernel with the state it
                    # should hold. Else the pending change reads as drift: a warning
                    # and a rebuild of everything (measured with nftables under churn:
                    # a full table recreated, +2 MiB per re-sync).
                    self.backend.apply(latest.state)
                self.backend.resync(latest.state)
                self.resynced_once = True
                self.next_resync = started + self.config.reconciliation_interval
            else:
                self.backend.apply(latest.state)
        except BackendError as failure:
            error = str(failure)
        except Exception as failure:  # a bug must not kill the worker; report and retry
            log.exception("unexpected error while applying")
            error = f"{type(failure).__name__}: {failure}"
        duration = time.monotonic() - started
        if full:
            # A re-sync reads the whole kernel state: free what it left in reference cycles
            # now (not whenever the oldest generation is next collected), and give the peak
            # back to the kernel.
            gc.collect()
        self.trimmer.after_work(force=full)
        kind = "resync" if full else "apply"
        APPLY_DURATION.labels(self.process, self.backend.name, kind).observe(duration)
        if error:
            ERRORS.labels(self.process, kind).inc()
            self.next_attempt = time.monotonic() + self.retry_delay
            log.error(
                "apply failed; retrying in %.1fs",
                self.retry_delay,
                extra={"generation": latest.generation, "error": error},
            )
            self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)
        else:
            if latest.generation != self.applied_generation:
                log.info(
                    "applied snapshot in %.3fs%s",
                    duration,
                    " (full re-sync)" if full else "",
                    extra={"generation": latest.generation},
                )
            self.applied_generation = latest.generation
            self.retry_delay = RETRY_INITIAL
            self.next_attempt = 0.0
        socket.send(
            encode(Applied(self.process, latest.generation, error, duration, self.backend.name))
        )
