"""The loop of a data-plane worker (firewall or routing) around its :class:`Backend`.

It receives a complete numbered snapshot from the supervisor when it starts
(or has missed a change), then one change per generation, which it folds onto
the state it holds (:func:`metaleg.ipc.apply_change`: unchanged Services are
neither decoded nor compared). It applies the newest state (changes that
queued up meanwhile are folded first, then applied at once), reports the result, retries failures with exponential back-off, and runs a full
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
    ChangeError,
    Hello,
    MessageError,
    Snapshot,
    StateChange,
    StateDecoder,
    apply_change,
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
        routing worker), so snapshots are decoded without their Services and transit guard,
        and changes without their Services."""
        self.process = process
        self.backend = backend
        self.config = config
        self._decode = decode_routes_only if routes_only else StateDecoder().decode
        self.trimmer = HeapTrimmer()
        self.latest: Snapshot | None = None
        """The newest state received (complete, or folded from changes) and its generation."""
        self.awaiting_snapshot = False
        """A change did not follow ``latest``: a complete snapshot was asked for (Hello)."""
        self.applied_generation = 0
        self.resynced_once = False
        self.dropped_messages = 0
        self.retry_delay = RETRY_INITIAL
        self.next_attempt = 0.0
        self.next_resync = 0.0
        self.next_hello = 0.0

    def run(self) -> int:
        """Serve until SIGTERM; returns the exit status."""
        context: zmq.Context[Any] = zmq.Context()
        socket = connect_worker(context, self.config.run_dir, self.process)
        wakeup = SignalWakeup(signal.SIGTERM, signal.SIGINT)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(wakeup.fileno(), zmq.POLLIN)
        log.info("started", extra={"backend": self.backend.name, "pid": os.getpid()})
        try:
            while True:
                now = time.monotonic()
                # Hello until a complete state arrives: at start, and after a missed change.
                wants_snapshot = self.latest is None or self.awaiting_snapshot
                if wants_snapshot and now >= self.next_hello:
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
                    self.next_hello = now + HELLO_INTERVAL
                deadlines = [self.next_hello] if wants_snapshot else []
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

    def _drop(self, text: str, *args: object, error: str = "") -> None:
        self.dropped_messages += 1
        IPC_DROPPED.labels(self.process).inc()
        log.warning(text, *args, extra={"error": error} if error else None)

    def _receive_all(self, socket: zmq.Socket[Any]) -> None:
        while True:
            try:
                frame = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = self._decode(frame)
            except MessageError as error:
                self._drop("dropped a message", error=str(error))
                continue
            if isinstance(message, Snapshot):
                self.awaiting_snapshot = False
                if self.latest is None or message.generation != self.latest.generation:
                    self._take(message)
            elif isinstance(message, StateChange):
                self._fold(message)
            else:
                self._drop("dropped an unexpected %s message", type(message).__name__)

    def _take(self, latest: Snapshot) -> None:
        self.latest = latest
        self.next_attempt = 0.0
        self.retry_delay = RETRY_INITIAL

    def _fold(self, change: StateChange) -> None:
        """Fold a change onto the state held, or ask for a complete one (Hello) when it does
        not follow it; never apply a change to another state than its base."""
        latest = self.latest
        if latest is None or change.generation <= latest.generation:
            return  # before the first snapshot (Hello is on its way), or already in it
        if not self.awaiting_snapshot:
            try:
                if change.base_generation != latest.generation:
                    raise ChangeError(
                        f"it follows generation {change.base_generation}, not {latest.generation}"
                    )
                state = apply_change(latest.state, change.delta)
            except ChangeError as error:
                self.awaiting_snapshot = True
                self.next_hello = 0.0  # at once
                self._drop(
                    "dropped change to generation %d; asking for the complete state",
                    change.generation,
                    error=str(error),
                )
                return
            self._take(Snapshot(change.generation, state))
            return
        # Changes that arrive while the complete state is on its way: it includes them.
        self.dropped_messages += 1
        IPC_DROPPED.labels(self.process).inc()

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
