"""The supervisor: starts the worker processes, restarts them, and is the hub of their messages.

It outlives every worker, so it holds the current desired state: a restarted
firewall or routing worker gets it at once, even while the watcher itself is
restarting. It applies the watcher's changes to that state (asking the watcher
for a complete one when a change does not follow), numbers each distinct state
(the generation) and forwards each change, encoded once, to the workers that
hold the generation before (a complete snapshot to the others). It records what every worker reports, answers ``metaleg-supervisor status`` on its
control socket and serves the metrics and probe endpoints. On SIGTERM it stops
the workers and exits; kernel state stays in place (the next start re-syncs
it), as the original did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from typing import Any

import msgspec
import zmq
from prometheus_client import multiprocess

from metaleg.config import Config
from metaleg.forkserver import ForkServer, ForkServerError
from metaleg.ipc import (
    Applied,
    AuditCounts,
    EgressCounts,
    Hello,
    MessageError,
    Publish,
    PublishChange,
    ResendRequest,
    Snapshot,
    StateChange,
    StateDecoder,
    StateDelta,
    WatcherStatus,
    bind_control,
    bind_supervisor,
    control_endpoint,
    encode,
    prepare_run_dir,
)
from metaleg.lifecycle import (
    CONFIG_ENVIRONMENT,
    PARENT_ENVIRONMENT,
    HeapTrimmer,
    SignalWakeup,
    become_subreaper,
    reap_orphans,
)
from metaleg.metrics import (
    AUDIT_EVENTS_LOST,
    AUDIT_LINES,
    AUDIT_LINES_DROPPED,
    IPC_DROPPED,
)
from metaleg.model import NodeDesiredState
from metaleg.state_changes import ChangeError, apply_change, diff_states
from metaleg.supervisor import http
from metaleg.supervisor.egress_counters import CounterKey, EgressCounterTotals
from metaleg.supervisor.gate import new_gate
from metaleg.supervisor.metrics import build_registry
from metaleg.supervisor.status import (
    ProcessStatus,
    StatusReport,
    evaluate,
    service_statuses,
)
from metaleg.supervisor.workers import (
    DATAPLANE_WORKERS,
    RESTART_INITIAL,
    RESTART_MAX,
    RESTART_RESET_AFTER,
    STATE_WORKERS,
    WORKERS,
    Worker,
)

log = logging.getLogger(__name__)

STOP_GRACE = 10.0
LOOP_TICK = 1.0
"""The loop wakes at least this often, so /healthz can tell a stuck loop from an idle one."""
METRICS_DIRECTORY = "metrics"
RESEND_REQUEST_INTERVAL = 2.0
"""While the watcher's changes do not follow the state held, ask it again this often."""
LAG_RESEND_AFTER = 10.0
"""A data-plane worker that has not reported the newest generation this long after it was
sent gets the complete state again (a frame lost on the way, e.g. across a reconnection)."""


class AlreadyRunning(RuntimeError):
    """Another supervisor answers on this run directory's control socket."""


class Supervisor:
    bus_send_hwm = 1000
    """Frames queued per worker on the bus (ZeroMQ's default); a test makes it small."""
    lag_resend_after = LAG_RESEND_AFTER

    def __init__(self, config: Config, workers: dict[str, str] | None = None) -> None:
        self.config = config
        self.workers = {name: Worker(name, module) for name, module in (workers or WORKERS).items()}
        if not config.audit_log:
            self.workers.pop("audit", None)
        self.snapshot: Snapshot | None = None
        self.snapshot_frame = b""
        """``snapshot`` encoded, once per generation for every worker it goes to (only when
        a worker needs the complete state: empty until then)."""
        self.decoder = StateDecoder()
        self.watcher_sequence: int | None = None
        """The watcher's number of the state held (None: none yet, or a change was missed)."""
        self.resend_requested_at: float | None = None
        self.trimmer = HeapTrimmer()
        self.problems: tuple[str, ...] = ()
        self.watcher_status = WatcherStatus(synced=False)
        self.egress_totals = EgressCounterTotals()
        self.audit_counts = AuditCounts(0, 0, 0, 0)
        """The audit process's last reported counts (it exports none itself)."""
        self.stopping = False
        self.started_at = time.monotonic()
        self.loop_tick = time.monotonic()
        self.socket: zmq.Socket[Any] | None = None
        self.metrics_dir = os.path.join(config.run_dir, METRICS_DIRECTORY)
        self.gate = new_gate(config, self.applied_generations)
        """The start-up gate ``/egress?ip=`` (None: no probe server): fed every generation."""
        environment = dict(os.environ)
        environment[CONFIG_ENVIRONMENT] = msgspec.json.encode(config).decode()
        environment[PARENT_ENVIRONMENT] = str(os.getpid())
        self.forkserver = ForkServer(environment, STOP_GRACE)
        """Where the workers are forked from (:mod:`metaleg.forkserver`)."""

    # --- processes ---------------------------------------------------------------------------

    def _start(self, worker: Worker) -> None:
        try:
            worker.process = self.forkserver.start(worker.name, worker.module)
        except ForkServerError as error:
            worker.last_error = str(error)
            worker.crashes.append(time.monotonic())  # failing to start is crash-looping too
            worker.next_start = time.monotonic() + worker.restart_delay
            log.error(
                "cannot start %s; trying again in %.1fs",
                worker.name,
                worker.restart_delay,
                extra={"error": str(error)},
            )
            worker.restart_delay = min(worker.restart_delay * 2, RESTART_MAX)
            return
        worker.started_at = time.monotonic()
        worker.working = False
        log.info("started %s", worker.name, extra={"pid": worker.process.pid})

    def _reap(self) -> None:
        self.forkserver.receive()
        now = time.monotonic()
        for worker in self.workers.values():
            code = worker.process.poll() if worker.process is not None else None
            if worker.process is None or code is None:
                continue
            exit_text = f"signal {-code}" if code < 0 else f"exit status {code}"
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            worker.process = None
            worker.sent_generation = 0
            worker.owes_snapshot = False
            worker.reported_generation = 0
            worker.last_sent_at = 0.0
            if self.stopping:
                continue
            worker.crashes.append(now)
            worker.last_error = f"died ({exit_text})"
            if now - worker.started_at > RESTART_RESET_AFTER:
                worker.restart_delay = RESTART_INITIAL
            worker.next_start = now + worker.restart_delay
            log.error(
                "%s died (%s); restarting in %.1fs",
                worker.name,
                exit_text,
                worker.restart_delay,
                extra={"error": exit_text},
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

    def _send(self, worker: Worker, frame: bytes, generation: int) -> None:
        assert self.socket is not None
        try:
            self.socket.send_multipart([worker.name.encode(), frame], zmq.NOBLOCK)
        except zmq.ZMQError as error:
            # A full queue (Again) or no connection (EHOSTUNREACH: ROUTER_MANDATORY): the
            # frame is lost, so the complete current state is owed; _catch_up sends it
            # once the worker can take it (and a restarted worker asks with Hello).
            if not worker.owes_snapshot:
                # Not connected yet is normal for a worker that is still starting.
                log.log(
                    logging.WARNING if isinstance(error, zmq.Again) else logging.INFO,
                    "could not queue a frame for %s (%s); it gets the complete state when it"
                    " can take it",
                    worker.name,
                    "queue full" if isinstance(error, zmq.Again) else error.strerror,
                )
            worker.sent_generation = 0
            worker.owes_snapshot = True
        else:
            worker.sent_generation = generation
            worker.owes_snapshot = False
            worker.last_sent_at = time.monotonic()

    def _catch_up(self) -> None:
        """Send the complete current state to each running data-plane worker that missed
        a frame (its queue was full), or that has not reported the newest generation for
        ``lag_resend_after`` seconds since the last frame queued for it."""
        if self.snapshot is None:
            return
        now = time.monotonic()
        generation = self.snapshot.generation
        for name in STATE_WORKERS:
            worker = self.workers.get(name)
            if worker is None or not worker.running:
                continue
            if worker.owes_snapshot:
                self._send_snapshot(worker)
                if not worker.owes_snapshot:
                    log.info(
                        "sent %s the complete state it missed",
                        worker.name,
                        extra={"generation": generation},
                    )
            elif (
                worker.reported_generation != generation
                and worker.last_sent_at
                and now - worker.last_sent_at > self.lag_resend_after
            ):
                log.warning(
                    "%s reports generation %d, %.0fs after it was sent generation %d;"
                    " sending the complete state again",
                    worker.name,
                    worker.reported_generation,
                    now - worker.last_sent_at,
                    generation,
                    extra={"generation": generation},
                )
                self._send_snapshot(worker)

    def _send_snapshot(self, worker: Worker) -> None:
        assert self.snapshot is not None
        if not self.snapshot_frame:
            self.snapshot_frame = encode(self.snapshot)
        self._send(worker, self.snapshot_frame, self.snapshot.generation)

    def _new_state(self, state: NodeDesiredState, delta: StateDelta | None) -> None:
        """Number ``state`` and send it on: ``delta`` (from the state before; None: no
        change can say it) to each worker that holds the generation before, encoded once,
        and the complete state to the others."""
        before = self.snapshot.generation if self.snapshot else 0
        generation = before + 1
        self.snapshot = Snapshot(generation, state)
        self.snapshot_frame = b""
        if self.gate is not None:
            self.gate.observe(generation, state, delta)
        log.info("new desired state", extra={"generation": generation})
        change_frame = b""
        for name in STATE_WORKERS:
            worker = self.workers.get(name)
            if worker is None:
                continue
            if delta is not None and before and worker.sent_generation == before:
                if not change_frame:
                    change_frame = encode(StateChange(generation, before, delta))
                self._send(worker, change_frame, generation)
            else:
                self._send_snapshot(worker)
        self.trimmer.after_work()

    def _request_resend(self, reason: str) -> None:
        """Ask the watcher for its complete state, at most every RESEND_REQUEST_INTERVAL."""
        assert self.socket is not None
        now = time.monotonic()
        if (
            self.resend_requested_at is not None
            and now - self.resend_requested_at < RESEND_REQUEST_INTERVAL
        ):
            return
        self.resend_requested_at = now
        with contextlib.suppress(zmq.ZMQError):  # full, or not connected (ROUTER_MANDATORY)
            self.socket.send_multipart([b"watcher", encode(ResendRequest(reason))], zmq.NOBLOCK)

    def _drop(self, text: str, *args: object) -> None:
        IPC_DROPPED.labels("supervisor").inc()
        log.warning(text, *args)

    def _receive_all(self) -> None:
        assert self.socket is not None
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0].decode(errors="replace")
            if len(frames) != 2 or identity not in self.workers:
                self._drop("dropped a message from unexpected peer %r", identity)
                continue
            try:
                message = self.decoder.decode(frames[1])
            except MessageError as error:
                self._drop("dropped a message from %s: %s", identity, error)
                continue
            self._handle(identity, message)

    def _handle(self, sender: str, message: Any) -> None:
        if isinstance(message, Publish) and sender == "watcher":
            self.workers["watcher"].working = True
            self.problems = message.problems
            self.watcher_sequence = message.sequence
            self.resend_requested_at = None
            previous = self.snapshot.state if self.snapshot is not None else None
            state = message.state
            if state != previous:
                # The workers still get a change: a complete Publish comes after the
                # watcher (re)starts, and mostly differs from the state held by a little.
                delta = diff_states(previous, state) if previous is not None else None
                self._new_state(state, delta)
        elif isinstance(message, PublishChange) and sender == "watcher":
            self._take_change(message)
        elif isinstance(message, WatcherStatus) and sender == "watcher":
            if message.error != self.watcher_status.error and message.error:
                log.warning("watcher: %s", message.error)
            self.watcher_status = message
            self.workers["watcher"].last_error = message.error
        elif isinstance(message, Hello) and sender in STATE_WORKERS:
            # A (re)started worker, or one that missed a change: the complete state.
            worker = self.workers[sender]
            worker.backend = message.backend
            worker.sent_generation = 0
            if self.snapshot is not None:
                self._send_snapshot(worker)
        elif isinstance(message, Applied) and sender in STATE_WORKERS:
            worker = self.workers[sender]
            worker.backend = message.backend or worker.backend
            worker.reported_generation = message.generation
            if message.drift:
                worker.drift_repairs += 1
                worker.last_drift = message.drift
                worker.last_drift_at = time.monotonic()
            if message.error:
                worker.last_error = message.error
            else:
                worker.applied_generation = message.generation
                worker.last_error = ""
                worker.unfinished = message.unfinished
                worker.working = True
        elif isinstance(message, EgressCounts) and sender == "firewall":
            self.egress_totals.update(message.counts)
        elif isinstance(message, AuditCounts) and sender == "audit":
            self._count_audit(message)
        else:
            self._drop("dropped an unexpected %s from %s", type(message).__name__, sender)

    def _count_audit(self, counts: AuditCounts) -> None:
        """Add what the audit process counted since its last report to the metrics."""
        before, self.audit_counts = self.audit_counts, counts
        for counter, was, now in (
            (AUDIT_LINES, before.lines, counts.lines),
            (AUDIT_LINES_DROPPED, before.lines_dropped, counts.lines_dropped),
            (AUDIT_EVENTS_LOST, before.events_lost, counts.events_lost),
            (IPC_DROPPED, before.messages_dropped, counts.messages_dropped),
        ):
            # Smaller than before: the audit process restarted and counts from 0 again.
            grown = now if now < was else now - was
            if grown > 0:
                counter.labels("audit").inc(grown)

    def _take_change(self, message: PublishChange) -> None:
        if self.snapshot is None or message.base_sequence != self.watcher_sequence:
            self.watcher_sequence = None  # only a complete state is trusted from here on
            self._drop(
                "dropped a change from the watcher: it follows state %d, not the one held;"
                " asking for the complete state",
                message.base_sequence,
            )
            self._request_resend("a change did not follow the state held")
            return
        try:
            state = apply_change(self.snapshot.state, message.delta)
        except ChangeError as error:
            self.watcher_sequence = None
            self._drop("dropped a change from the watcher: %s", error)
            self._request_resend(str(error))
            return
        self.workers["watcher"].working = True
        self.watcher_sequence = message.sequence
        if message.problems is not None:
            self.problems = message.problems
        if state is not self.snapshot.state and state != self.snapshot.state:
            self._new_state(state, message.delta)

    # --- status, probes, metrics -------------------------------------------------------------

    def status(self) -> StatusReport:
        now = time.monotonic()
        processes = [
            ProcessStatus(
                name="supervisor",
                pid=os.getpid(),
                state="running",
                restarts=0,
                uptime_seconds=now - self.started_at,
                applied_generation=None,
                last_error="",
            )
        ]
        for worker in self.workers.values():
            if worker.running:
                state = "running"
            elif self.stopping:
                state = "stopped"
            else:
                state = "restarting"
            processes.append(
                ProcessStatus(
                    name=worker.name,
                    pid=worker.pid,
                    state=state,
                    restarts=worker.restarts,
                    uptime_seconds=now - worker.started_at if worker.running else 0.0,
                    applied_generation=worker.applied_generation
                    if worker.name in STATE_WORKERS
                    else None,
                    last_error=worker.last_error,
                    crash_looping=worker.crash_looping(now),
                    drift_repairs=worker.drift_repairs,
                    last_drift=worker.last_drift,
                    last_drift_seconds_ago=now - worker.last_drift_at
                    if worker.drift_repairs
                    else None,
                    unfinished=worker.unfinished,
                )
            )
        generation = self.snapshot.generation if self.snapshot else 0
        loop_age = now - self.loop_tick
        healthy, ready, reasons = evaluate(
            tuple(processes), generation, self.watcher_status.synced, loop_age
        )
        return StatusReport(
            node=self.config.node_name,
            generation=generation,
            firewall_backend=self.firewall_backend_name(),
            route_backend=self.workers["routing"].backend or self.config.route_backend
            if "routing" in self.workers
            else self.config.route_backend,
            watcher_synced=self.watcher_status.synced,
            watcher_error=self.watcher_status.error,
            processes=tuple(processes),
            services=tuple(
                service_statuses(
                    self.snapshot.state if self.snapshot else None,
                    self.egress_totals.per_service(),
                )
            ),
            problems=self.problems,
            healthy=healthy,
            ready=ready,
            reasons=reasons,
            loop_age_seconds=loop_age,
        )

    def healthz(self) -> http.ProbeResult:
        report = self.status()
        return report.healthy, report.reasons

    def readyz(self) -> http.ProbeResult:
        report = self.status()
        return report.ready, report.reasons

    def process_views(self) -> list[Any]:
        return list(self.workers.values())

    def forkserver_pid(self) -> int | None:
        process = self.forkserver.process
        return process.pid if process is not None else None

    def current_state(self) -> tuple[int, NodeDesiredState | None]:
        snapshot = self.snapshot
        return (snapshot.generation, snapshot.state) if snapshot else (0, None)

    def egress_counter_totals(self) -> dict[CounterKey, tuple[int, int]]:
        """(packets, bytes) per (namespace, Service, family, action), from the firewall's
        kernel counters (:mod:`metaleg.supervisor.egress_counters`)."""
        return self.egress_totals.totals()

    def applied_generations(self) -> dict[str, int]:
        return {
            name: worker.applied_generation
            for name, worker in self.workers.items()
            if name in DATAPLANE_WORKERS
        }

    def firewall_backend_name(self) -> str:
        worker = self.workers.get("firewall")
        return (worker.backend if worker and worker.backend else "") or self.config.firewall_backend

    def _answer_control(self, control: zmq.Socket[Any]) -> None:
        with contextlib.suppress(zmq.Again):
            request = control.recv(zmq.NOBLOCK)
            if request == b"status":
                control.send(msgspec.json.encode(self.status()))
            else:
                self._drop("dropped an unknown control request %r", request[:40])
                control.send(b'{"error": "unknown request; send status"}')

    # --- main loop ---------------------------------------------------------------------------

    def _check_not_running(self, context: zmq.Context[Any]) -> None:
        if not os.path.exists(control_endpoint(self.config.run_dir).removeprefix("ipc://")):
            return
        probe: zmq.Socket[Any] = context.socket(zmq.REQ)
        probe.setsockopt(zmq.LINGER, 0)
        try:
            probe.connect(control_endpoint(self.config.run_dir))
            probe.send(b"status")
            if probe.poll(500):
                raise AlreadyRunning(
                    f"another supervisor runs with METALEG_RUN_DIR={self.config.run_dir}"
                )
        finally:
            probe.close(0)

    def _start_servers(self) -> list[Any]:
        servers = []
        if self.config.metrics_bind_address is not None:
            registry = build_registry(self, self.metrics_dir)
            servers.append(http.serve_metrics(self.config.metrics_bind_address, registry))
            log.info("metrics on http://%s/metrics", self.config.metrics_bind_address)
        if self.config.health_probe_bind_address is not None:
            servers.append(
                http.serve_probes(
                    self.config.health_probe_bind_address,
                    self.healthz,
                    self.readyz,
                    self.gate.answer if self.gate is not None else None,
                )
            )
            log.info(
                "probes on http://%s/healthz, /readyz and /egress?ip=",
                self.config.health_probe_bind_address,
            )
        return servers

    def run(self) -> int:
        prepare_run_dir(self.config.run_dir)
        become_subreaper()
        context: zmq.Context[Any] = zmq.Context()
        self._check_not_running(context)
        self.socket = bind_supervisor(context, self.config.run_dir, self.bus_send_hwm)
        # A frame that cannot be queued raises (Again, EHOSTUNREACH) instead of vanishing,
        # so that _send knows the worker is owed the complete state.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        control = bind_control(context, self.config.run_dir)
        wakeup = SignalWakeup(signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        poller.register(wakeup.fileno(), zmq.POLLIN)
        servers = self._start_servers()
        log.info(
            "supervisor started",
            extra={"node": self.config.node_name, "backend": self.config.firewall_backend},
        )
        forkserver_fd = -1
        try:
            self._restart_due()
            while True:
                # Workers' exits arrive from the fork server, whose channel changes when
                # it is restarted.
                if self.forkserver.fileno() != forkserver_fd:
                    if forkserver_fd != -1:
                        poller.unregister(forkserver_fd)
                    forkserver_fd = self.forkserver.fileno()
                    if forkserver_fd != -1:
                        poller.register(forkserver_fd, zmq.POLLIN)
                self.loop_tick = time.monotonic()
                pending = [w.next_start for w in self.workers.values() if w.process is None]
                timeout = LOOP_TICK
                if pending:
                    timeout = min(timeout, max(0.0, min(pending) - time.monotonic()))
                events = dict(poller.poll(int(timeout * 1000)))
                if wakeup.fileno() in events:
                    received = wakeup.drain()
                    if signal.SIGTERM in received or signal.SIGINT in received:
                        log.info("stopping workers; kernel state stays in place")
                        self._stop_all()
                        return 0
                    if signal.SIGCHLD in received:
                        server = self.forkserver_pid()
                        for pid in reap_orphans(keep={server} if server else set()):
                            log.debug("collected an orphaned process", extra={"pid": pid})
                self._reap()
                if self.socket in events:
                    self._receive_all()
                self._catch_up()
                if control in events:
                    self._answer_control(control)
                self._restart_due()
        finally:
            self.stopping = True
            for worker in self.workers.values():
                if worker.running:
                    assert worker.process is not None
                    worker.process.kill()
            self.forkserver.close()
            for server in servers:
                server.shutdown()
                server.server_close()
            self.socket.close(0)
            control.close(0)
            context.term()


def prepare_metrics_directory(run_dir: str) -> str:
    """A fresh directory for prometheus-client's multiprocess files; returns its path.

    Must run before prometheus-client is imported anywhere in this process: the
    library picks its storage (memory or files) at import time.
    """
    path = os.path.join(run_dir, METRICS_DIRECTORY)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path
