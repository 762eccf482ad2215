"""The audit process's loop: desired state from the supervisor, events from the kernel, lines.

The desired state comes like a data-plane worker's (:mod:`metaleg.worker`): a
complete :class:`~metaleg.ipc.Snapshot` after :class:`~metaleg.ipc.Hello`, then
one :class:`~metaleg.ipc.StateChange` per generation, folded onto the state
held (a change that does not follow it: Hello again). The supervisor sends
without waiting (a full queue only makes it owe this process the complete
state), so the firewall never waits for the audit log. Each state taken is
answered with :class:`~metaleg.ipc.Applied` (``backend`` ``conntrack-events``),
whose ``error`` says why no lines can be written (``nf_conntrack_events`` is 0,
the socket cannot be opened): ``metaleg-supervisor status`` shows it as the
process's last error.

Events are read when the socket is readable, matched to a Service
(:mod:`.records`) and written within ``AUDIT_LOG_RATE`` (:mod:`.ratelimit`) to
the logger ``metaleg.audit.lines`` at level info, whatever ``LOG_LEVEL``
(``AUDIT_LOG=off`` is the switch). Lines over the bound and events the kernel
dropped are counted and reported once per burst. The counts go to the supervisor
(:class:`~metaleg.ipc.AuditCounts`), which exports them: this process loads no
prometheus-client (its imports cost ~6 MiB per process). Nothing here raises out of
the loop for a kernel problem: it is reported and retried every
:data:`CHECK_INTERVAL` seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import zmq

from metaleg.audit.listener import EventListener, conntrack_events_setting
from metaleg.audit.ratelimit import Bursts, TokenBucket
from metaleg.audit.records import SnatIndex, match
from metaleg.config import Config
from metaleg.ipc import (
    Applied,
    AuditCounts,
    Hello,
    MessageError,
    Snapshot,
    StateChange,
    StateDecoder,
    connect_worker,
    encode,
)
from metaleg.lifecycle import SignalWakeup
from metaleg.state_changes import ChangeError, Folded, FollowedState

log = logging.getLogger(__name__)
lines = logging.getLogger("metaleg.audit.lines")
"""The audit lines' logger (level info, whatever LOG_LEVEL)."""

PROCESS = "audit"
BACKEND = "conntrack-events"
HELLO_INTERVAL = 2.0
CHECK_INTERVAL = 30.0
"""Seconds between looks at ``nf_conntrack_events`` and attempts to reopen a failed socket."""
COUNTS_INTERVAL = 1.0
"""Changed counts go to the supervisor at most this often (seconds)."""
TICK = 1.0
"""The loop wakes at least this often (burst reports)."""
COALESCE = 0.02
"""After reading events, the socket is left alone this long, so that a steady stream is read
in batches (at 1000 connections a second: ~20 events per wake-up instead of one); the kernel
queues them meanwhile (well within the socket's buffer)."""


@dataclass
class Counts:
    """The audit process's counts since it started (see :class:`metaleg.ipc.AuditCounts`)."""

    lines: int = 0
    lines_dropped: int = 0
    events_lost: int = 0
    messages_dropped: int = 0

    def message(self) -> AuditCounts:
        return AuditCounts(self.lines, self.lines_dropped, self.events_lost, self.messages_dropped)


class AuditProcess:
    """The audit process: its bus socket, the event listener, the index and the bounds."""

    def __init__(self, config: Config, listener: EventListener | None = None) -> None:
        self.config = config
        self.listener = listener if listener is not None else EventListener()
        self.listening = False
        self.index = SnatIndex()
        self.decoder = StateDecoder()
        self.followed = FollowedState()
        self.next_hello = 0.0
        self.next_check = 0.0
        self.problem = ""
        """Why no lines can be written now ("" when they can)."""
        self.reported: tuple[int, str] | None = None
        """(generation, problem) of the last Applied sent."""
        self.bucket = TokenBucket(config.audit_log_rate, time.monotonic())
        self.dropped = Bursts()
        self.lost = Bursts()
        self.written = 0
        self.counts = Counts()
        """What the supervisor exports as metrics (:class:`metaleg.ipc.AuditCounts`)."""
        self.sent_counts: AuditCounts | None = None
        self.next_counts = 0.0
        self.resume_reading = 0.0
        """While the socket is left alone after a read (see :data:`COALESCE`): when to resume."""

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM; returns the exit status."""
        lines.setLevel(logging.INFO)
        context: zmq.Context[Any] = zmq.Context()
        socket = connect_worker(context, self.config.run_dir, PROCESS)
        wakeup = SignalWakeup(signal.SIGTERM, signal.SIGINT)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(wakeup.fileno(), zmq.POLLIN)
        log.info(
            "started",
            extra={"backend": BACKEND, "pid": os.getpid(), "rate": self.config.audit_log_rate},
        )
        try:
            while True:
                now = time.monotonic()
                if now >= self.next_check:
                    self.next_check = now + CHECK_INTERVAL
                    if self._check(poller):
                        self._report(socket)
                wants_snapshot = self.followed.wants_snapshot
                if wants_snapshot and now >= self.next_hello:
                    hello = Hello(PROCESS, os.getpid(), self._generation(), BACKEND)
                    socket.send(encode(hello))
                    self.next_hello = now + HELLO_INTERVAL
                if self.resume_reading and now >= self.resume_reading:
                    self.resume_reading = 0.0
                    poller.register(self.listener.fileno(), zmq.POLLIN)
                deadline = min(now + TICK, self.next_check)
                if wants_snapshot:
                    deadline = min(deadline, self.next_hello)
                if self.resume_reading:
                    deadline = min(deadline, self.resume_reading)
                events = dict(poller.poll(max(0, int((deadline - now) * 1000) + 1)))
                if wakeup.fileno() in events and {signal.SIGTERM, signal.SIGINT} & set(
                    wakeup.drain()
                ):
                    log.info("stopping on signal")
                    return 0
                if socket in events:
                    self._receive_all(socket)
                if self.listening and self.listener.fileno() in events and self._drain(poller):
                    # Events came: let the next ones queue up for a while, read them at once.
                    poller.unregister(self.listener.fileno())
                    self.resume_reading = time.monotonic() + COALESCE
                now = time.monotonic()
                self._burst_reports(now)
                self._send_counts(socket, now)
        finally:
            self.listener.close()
            socket.close(0)
            context.term()

    def _send_counts(self, socket: zmq.Socket[Any], now: float) -> None:
        """Send the counts when they changed, at most every :data:`COUNTS_INTERVAL`."""
        if now < self.next_counts:
            return
        counts = self.counts.message()
        if counts == self.sent_counts:
            return
        try:
            socket.send(encode(counts), zmq.NOBLOCK)
        except zmq.Again:
            return  # the supervisor is away; sent again once it reads
        self.sent_counts = counts
        self.next_counts = now + COUNTS_INTERVAL

    def _generation(self) -> int:
        latest = self.followed.latest
        return latest.generation if latest is not None else 0

    # --- the kernel ------------------------------------------------------------------------

    def _check(self, poller: zmq.Poller) -> bool:
        """Open the listener if it is not, look at ``nf_conntrack_events``; True when the
        problem to report changed."""
        problem = ""
        if not self.listening:
            try:
                self.listener.open()
                poller.register(self.listener.fileno(), zmq.POLLIN)
                self.listening = True
                log.info("listening to conntrack NEW events")
            except OSError as error:
                problem = f"cannot listen to conntrack events: {error}; retrying every {CHECK_INTERVAL:.0f}s"
        if not problem and conntrack_events_setting() == 0:
            problem = (
                "net.netfilter.nf_conntrack_events is 0 in this network namespace: the kernel "
                "sends no conntrack events, so no audit lines are written (set it to 1)"
            )
        if problem == self.problem:
            return False
        if problem:
            log.warning("%s", problem, extra={"error": problem})
        elif self.problem:
            log.info("audit lines can be written again")
        self.problem = problem
        return True

    def _drain(self, poller: zmq.Poller) -> bool:
        """Read the queued events, write a line for each SNATed one within the rate bound;
        True when there were any (the socket is still open)."""
        try:
            batch = self.listener.read()
        except OSError as error:
            # Not ENOBUFS (handled by the listener): the socket is broken. Reopen it later.
            poller.unregister(self.listener.fileno())
            self.listener.close()
            self.listening = False
            self.next_check = time.monotonic() + 1.0
            log.error("reading conntrack events failed; reopening", extra={"error": str(error)})
            return False
        now = time.monotonic()
        if batch.lost:
            self.counts.events_lost += batch.lost
            if self.lost.add(batch.lost, now):
                log.warning(
                    "the kernel dropped %d conntrack events (socket buffer full): their "
                    "connections have no audit line; counted in metaleg_audit_events_lost_total",
                    batch.lost,
                )
        written = dropped = 0
        for event in batch.events:
            record = match(self.index, event)
            if record is None:
                continue
            if self.bucket.take(now):
                lines.info(record.message(), extra=record.fields())
                written += 1
            else:
                dropped += 1
        if written:
            self.written += written
            self.counts.lines += written
        if dropped:
            self.counts.lines_dropped += dropped
            if self.dropped.add(dropped, now):
                log.warning(
                    "AUDIT_LOG_RATE=%d lines per second reached: further lines are dropped and "
                    "counted in metaleg_audit_lines_dropped_total",
                    self.config.audit_log_rate,
                )
        return bool(batch.events or batch.lost)

    def _burst_reports(self, now: float) -> None:
        dropped = self.dropped.ended(now)
        if dropped is not None:
            log.warning(
                "%d audit lines were dropped over AUDIT_LOG_RATE=%d in the last burst",
                dropped,
                self.config.audit_log_rate,
            )
        lost = self.lost.ended(now)
        if lost is not None:
            log.warning(
                "%d conntrack events were lost to a full socket buffer in the last burst", lost
            )

    # --- the desired state -----------------------------------------------------------------

    def _receive_all(self, socket: zmq.Socket[Any]) -> None:
        changed = False
        while True:
            try:
                frame = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                message = self.decoder.decode(frame)
            except MessageError as error:
                self._drop("dropped a message", error=str(error))
                continue
            if isinstance(message, Snapshot):
                changed |= self.followed.take_snapshot(message)
            elif isinstance(message, StateChange):
                changed |= self._fold(message)
            else:
                self._drop(f"dropped an unexpected {type(message).__name__} message")
        latest = self.followed.latest
        if changed and latest is not None:
            self.index.update(latest.state)
            log.debug(
                "took the desired state: %d SNAT sources",
                len(self.index),
                extra={"generation": latest.generation},
            )
            self._report(socket)

    def _fold(self, change: StateChange) -> bool:
        """Fold a change onto the state held; True when it was taken. One that does not
        follow it is dropped and the complete state asked for."""
        try:
            folded = self.followed.fold(change)
        except ChangeError as error:
            self.next_hello = 0.0
            self._drop(
                f"dropped change to generation {change.generation}; asking for the complete state",
                error=str(error),
            )
            return False
        if folded == Folded.AWAITED:
            self.counts.messages_dropped += 1  # the complete state on its way includes it
        return folded == Folded.TAKEN

    def _report(self, socket: zmq.Socket[Any]) -> None:
        """Tell the supervisor the generation held and the current problem (once each)."""
        report = (self._generation(), self.problem)
        if report == self.reported:
            return
        self.reported = report
        try:
            socket.send(encode(Applied(PROCESS, report[0], report[1], 0.0, BACKEND)), zmq.NOBLOCK)
        except zmq.Again:
            self.reported = None  # the supervisor is away; the next state reports again

    def _drop(self, text: str, error: str = "") -> None:
        self.counts.messages_dropped += 1
        log.warning(text, extra={"error": error} if error else None)
