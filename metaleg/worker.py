"""The loop of a data-plane worker (firewall or routing) around its :class:`Backend`.

It receives a complete numbered snapshot from the supervisor when it starts
(or has missed a change), then one change per generation, which it folds onto
the state it holds (:func:`metaleg.state_changes.apply_change`: unchanged Services are
neither decoded nor compared). It applies the newest state (changes that
queued up meanwhile are folded first, then applied at once), reports the result, retries failures with exponential back-off, and runs a full
re-sync at start and every RECONCILIATION_INTERVAL. The first application in a
fresh process is always a full re-sync, so a restarted worker repairs whatever
happened while it was away.

Between re-syncs, a backend that offers a :class:`metaleg.backend.DriftDetector`
has its kernel objects watched (notifications polled with the bus, or a cheap
periodic check): a change someone else made to them (drift) makes the worker run
the full re-sync at once, which repairs and logs what differs. Each such repair is
logged, counted (``metaleg_drift_repairs_total{kind}``) and reported to the
supervisor in ``Applied.drift``. Repairs that keep being undone are spaced out
(:class:`DriftRepairLimiter`), so a component fighting metaleg cannot make it spin.

A backend that reads per-Service counters (:class:`metaleg.backend.EgressCounting`,
the firewall's) has them read every :data:`COUNT_INTERVAL` seconds once something
is applied, and sent to the supervisor (:class:`metaleg.ipc.EgressCounts`) when they
changed: the supervisor turns them into Prometheus counters and status.

A backend's call can succeed and still leave work undone
(:class:`metaleg.backend.UnfinishedWork`; the firewall: a failed deletion of outdated
conntrack entries): the worker reports it in ``Applied.unfinished`` (shown in the
status) and calls ``apply`` again with the same back-off as after a failure, until
nothing is left.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import time
from typing import Any

import zmq

from metaleg.backend import (
    Backend,
    BackendError,
    Drift,
    DriftDetecting,
    DriftDetector,
    EgressCount,
    EgressCounting,
    UnfinishedWork,
)
from metaleg.config import Config
from metaleg.ipc import (
    Applied,
    EgressCounts,
    Hello,
    MessageError,
    Snapshot,
    StateChange,
    StateDecoder,
    connect_worker,
    decode_routes_only,
    encode,
)
from metaleg.lifecycle import HeapTrimmer, SignalWakeup
from metaleg.metrics import APPLY_DURATION, DRIFT_REPAIRS, ERRORS, IPC_DROPPED
from metaleg.state_changes import ChangeError, Folded, FollowedState

log = logging.getLogger(__name__)

HELLO_INTERVAL = 2.0
COUNT_INTERVAL = 10.0
"""Seconds between readings of the kernel's per-Service counters: under Prometheus's
usual scrape interval, and one reading (~ms at N=1000) per interval costs little."""
RETRY_INITIAL = 0.5
RETRY_MAX = 30.0
FIGHT_WINDOW = 2.0
"""Drift found within this many seconds of the last drift repair counts as a fight..."""
FIGHT_DELAY_INITIAL = 0.5
FIGHT_DELAY_MAX = 60.0
"""...and spaces the next repair out: 0.5 s, doubling up to 60 s, until a quiet window."""


class DriftRepairLimiter:
    """When the next drift repair may run: at once, unless drift keeps coming right back.

    A repair that something undoes within :data:`FIGHT_WINDOW` (a controller that
    owns the same objects, a script in a loop) doubles the wait before the next
    one, from :data:`FIGHT_DELAY_INITIAL` up to :data:`FIGHT_DELAY_MAX`; drift
    after a quiet window is repaired at once again.
    """

    def __init__(self) -> None:
        self.delay = 0.0
        self.last_repair = float("-inf")

    def next_allowed(self, found_at: float) -> float:
        """The earliest time a repair of drift found at ``found_at`` may start."""
        if found_at - self.last_repair > FIGHT_WINDOW + self.delay:
            self.delay = 0.0
        return self.last_repair + self.delay if self.delay else found_at

    def repaired(self, at: float, found_at: float) -> None:
        """Record a repair that ran at ``at`` for drift found at ``found_at``."""
        if found_at - self.last_repair <= FIGHT_WINDOW + self.delay:
            self.delay = min(max(FIGHT_DELAY_INITIAL, self.delay * 2), FIGHT_DELAY_MAX)
        self.last_repair = at


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
        self.followed = FollowedState()
        self.applied_generation = 0
        self.resynced_once = False
        self.dropped_messages = 0
        self.retry_delay = RETRY_INITIAL
        self.next_attempt = 0.0
        self.unfinished = ""
        """What the backend's last successful call left undone, retried like a failure."""
        self.next_resync = 0.0
        self.next_hello = 0.0
        self.detector: DriftDetector | None = None
        self.next_drift_check = float("inf")
        self.drift: list[Drift] = []
        """Drift found and not yet repaired."""
        self.drift_found_at = 0.0
        self.drift_limiter = DriftRepairLimiter()
        self.drift_repairs = 0
        """Drift repairs done by this process."""
        self.drift_check_failing = False
        self.counting = isinstance(backend, EgressCounting)
        self.next_count = 0.0 if self.counting else float("inf")
        self.last_counts: tuple[EgressCount, ...] = ()
        self.count_failing = False

    def run(self) -> int:
        """Serve until SIGTERM; returns the exit status."""
        context: zmq.Context[Any] = zmq.Context()
        socket = connect_worker(context, self.config.run_dir, self.process)
        wakeup = SignalWakeup(signal.SIGTERM, signal.SIGINT)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(wakeup.fileno(), zmq.POLLIN)
        drift_fds = self._start_drift_detection()
        for fd in drift_fds:
            poller.register(fd, zmq.POLLIN)
        log.info("started", extra={"backend": self.backend.name, "pid": os.getpid()})
        try:
            while True:
                now = time.monotonic()
                # Hello until a complete state arrives: at start, and after a missed change.
                wants_snapshot = self.followed.wants_snapshot
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
                    if self.drift:
                        deadlines.append(max(self.next_attempt, self._drift_repair_at()))
                deadlines.append(self.next_drift_check)
                if self.applied_generation:
                    deadlines.append(self.next_count)
                deadline = min(deadlines)
                # Rounded up: woken a fraction of a millisecond early, the loop would spin.
                timeout_ms = (
                    max(0, math.ceil((deadline - now) * 1000)) if deadline != float("inf") else None
                )
                events = dict(poller.poll(timeout_ms))
                if wakeup.fileno() in events and {signal.SIGTERM, signal.SIGINT} & set(
                    wakeup.drain()
                ):
                    log.info("stopping on signal; kernel state stays in place")
                    return 0
                if socket in events:
                    self._receive_all(socket)
                if any(fd in events for fd in drift_fds) or time.monotonic() >= (
                    self.next_drift_check
                ):
                    self._check_drift()
                self._work(socket)
                if self.applied_generation and time.monotonic() >= self.next_count:
                    self._send_counts(socket)
        finally:
            if self.detector is not None:
                self.detector.close()
            self.backend.close()
            socket.close(0)
            context.term()

    def _start_drift_detection(self) -> list[int]:
        """Open the backend's drift detector, if it has one; the descriptors to poll."""
        if not isinstance(self.backend, DriftDetecting):
            return []
        try:
            detector = self.backend.drift_detector()
            fds = detector.fds() if detector is not None else []
        except Exception:  # detection is an optimisation: the periodic re-sync remains
            log.exception("cannot watch for drift; relying on the periodic re-sync")
            return []
        if detector is None:
            return []
        self.detector = detector
        if detector.check_interval is not None:
            self.next_drift_check = time.monotonic() + detector.check_interval
        log.info(
            "watching kernel objects for drift",
            extra={"fds": len(fds), "check_interval": detector.check_interval},
        )
        return fds

    def _check_drift(self) -> None:
        """Ask the detector; drift found once the kernel state is ours becomes a repair to run."""
        detector = self.detector
        if detector is None:
            return
        if detector.check_interval is not None:
            self.next_drift_check = time.monotonic() + detector.check_interval
        try:
            found = detector.check()
        except Exception:
            # Logged once per run of failures, not every check; the periodic re-sync remains.
            if not self.drift_check_failing:
                log.exception("drift check failed; relying on the periodic re-sync until it works")
            self.drift_check_failing = True
            return
        if self.drift_check_failing:
            log.info("drift check works again")
            self.drift_check_failing = False
        if not found or not self.resynced_once:
            return  # before the first re-sync, which repairs everything anyway
        now = time.monotonic()
        if not self.drift:
            self.drift_found_at = now
        self.drift.extend(found)
        for drift in found:
            log.warning(
                "kernel objects changed by someone else",
                extra={"kind": drift.kind, "drift": drift.detail},
            )
        if self._drift_repair_at() > now:
            log.warning(
                "drift keeps coming back; next repair in %.1fs",
                self._drift_repair_at() - now,
            )

    def _drift_repair_at(self) -> float:
        return self.drift_limiter.next_allowed(self.drift_found_at)

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
                if self.followed.take_snapshot(message):
                    self._took_new_state()
            elif isinstance(message, StateChange):
                self._fold(message)
            else:
                self._drop("dropped an unexpected %s message", type(message).__name__)

    @property
    def latest(self) -> Snapshot | None:
        """The newest state received (complete, or folded from changes) and its generation."""
        return self.followed.latest

    def _took_new_state(self) -> None:
        self.next_attempt = 0.0
        self.retry_delay = RETRY_INITIAL

    def _fold(self, change: StateChange) -> None:
        """Fold a change onto the state held, or ask for a complete one (Hello) when it does
        not follow it; never apply a change to another state than its base."""
        try:
            folded = self.followed.fold(change)
        except ChangeError as error:
            self.next_hello = 0.0  # at once
            self._drop(
                "dropped change to generation %d; asking for the complete state",
                change.generation,
                error=str(error),
            )
            return
        if folded == Folded.TAKEN:
            self._took_new_state()
        elif folded == Folded.AWAITED:
            # Changes that arrive while the complete state is on its way: it includes them.
            self.dropped_messages += 1
            IPC_DROPPED.labels(self.process).inc()

    def _wants_apply(self) -> bool:
        return self.latest is not None and (
            self.latest.generation != self.applied_generation or bool(self.unfinished)
        )

    def _work(self, socket: zmq.Socket[Any]) -> None:
        now = time.monotonic()
        latest = self.latest
        if latest is None:
            return
        if now < self.next_attempt:
            return  # backing off after a failure; a new snapshot resets this
        repairing = bool(self.drift) and now >= self._drift_repair_at()
        full = not self.resynced_once or now >= self.next_resync or repairing
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
        drift_report = ""
        if repairing and not error:  # a failed repair is retried with the back-off below
            drift_report = self._repaired_drift(started)
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
            if isinstance(self.backend, UnfinishedWork):
                self.unfinished = self.backend.unfinished_work()
            if self.unfinished:  # the backend logged it; apply again after the back-off
                self.next_attempt = time.monotonic() + self.retry_delay
                self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)
            else:
                self.retry_delay = RETRY_INITIAL
                self.next_attempt = 0.0
        socket.send(
            encode(
                Applied(
                    self.process,
                    latest.generation,
                    error,
                    duration,
                    self.backend.name,
                    drift=drift_report,
                    unfinished=self.unfinished,
                )
            )
        )
        # Consume the notifications of our own writes now, while the detector's idea of the
        # desired state is the one they were made for (and let a periodic check take its new
        # baseline): after the report, so that this work is not part of the change's latency.
        self._check_drift()

    def _send_counts(self, socket: zmq.Socket[Any]) -> None:
        """Read the backend's per-Service counters; send them when they changed."""
        self.next_count = time.monotonic() + COUNT_INTERVAL
        assert isinstance(self.backend, EgressCounting)
        try:
            counts = tuple(self.backend.read_counts())
        except Exception:
            # Logged once per run of failures; the counters stay where they were.
            if not self.count_failing:
                log.exception(
                    "reading the egress counters failed; retrying every %ds", COUNT_INTERVAL
                )
            self.count_failing = True
            ERRORS.labels(self.process, "counters").inc()
            return
        if self.count_failing:
            log.info("reading the egress counters works again")
            self.count_failing = False
        if counts == self.last_counts:
            return
        self.last_counts = counts
        socket.send(encode(EgressCounts(self.process, counts)))

    def _repaired_drift(self, started: float) -> str:
        """Log and count the repair of the drift pending; its one-line report for the status."""
        repaired = self.drift
        self.drift = []
        self.drift_limiter.repaired(started, self.drift_found_at)
        kinds = list(dict.fromkeys(drift.kind for drift in repaired))
        for kind in kinds:
            DRIFT_REPAIRS.labels(self.process, kind).inc()
        self.drift_repairs += 1
        details = list(dict.fromkeys(drift.detail for drift in repaired))
        report = "; ".join(f"{drift.kind}: {drift.detail}" for drift in repaired[:3])
        if len(repaired) > 3:
            report += f"; and {len(repaired) - 3} more"
        log.warning(
            "drift repaired by a full re-sync %.3fs after it was found",
            time.monotonic() - self.drift_found_at,
            extra={"kinds": kinds, "drift": details[:10]},
        )
        return report
