"""The watcher process: cluster objects in, this node's desired state out.

Informer threads (:mod:`metaleg.watcher.feeds`: the labelled Services, MetalLB's
ServiceL2Statuses, and scoped watches of only the EndpointSlices, Pods and Nodes
those need) feed raw events into one queue. The main thread parses them, hands them
to the :class:`~metaleg.watcher.tracker.EgressTracker`, which recomputes only the
Services an event concerns, and sends the supervisor the change
(:class:`~metaleg.state_changes.ChangePublisher`). A lone event is handled at once; events
that arrive while one is handled are taken together (a burst costs one
computation). Nothing is published before every resource and scope has been listed
once: a half-synced view (say, Services without their ServiceL2Status) would tear
down working kernel state.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import queue
import signal
import time
from types import FrameType
from typing import Any

import zmq

from metaleg.config import Config
from metaleg.ipc import MessageError, WatcherStatus, connect_worker, encode
from metaleg.lifecycle import release_memory, start_worker
from metaleg.metrics import ERRORS, IPC_DROPPED, PUBLISHED
from metaleg.model import NodeDesiredState, ServiceEgress, describe_egress
from metaleg.state_changes import ChangePublisher
from metaleg.watcher.desired import NodeSettings
from metaleg.watcher.events import EventPoster, describe_change, describe_problem
from metaleg.watcher.feeds import Feeds
from metaleg.watcher.informer import Event
from metaleg.watcher.kubeclient import api_client
from metaleg.watcher.scopes import ScopeInputs
from metaleg.watcher.tracker import EgressTracker, TrackerResult

log = logging.getLogger(__name__)

REPUBLISH_INTERVAL = 10.0
"""Re-send the unchanged state this often (an empty change of a few bytes): a liveness
signal, and the supervisor's check that it holds the state the watcher holds."""
ALLOCATION_FILE = "allocation.json"
MAX_BATCH = 10000
"""At most this many queued events are taken before computing (a relist is one event)."""

_STOP = Event("", "stop")


class Watcher:
    """The watcher's state between events."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = NodeSettings(
            node_name=config.node_name,
            metallb_namespace=config.metallb_namespace,
            filter_endpoints_for_node=config.filter_endpoints_for_node,
            fwmask=config.firewall_mask,
            route_table_id_offset=config.route_table_id_offset,
            exclude_dst_ipv4=config.exclude_dst_ipv4,
            exclude_dst_ipv6=config.exclude_dst_ipv6,
        )
        self.allocation = self._load_allocation()
        self.tracker = EgressTracker(self.settings, self.allocation)
        self.scope_inputs = ScopeInputs(config.node_name, config.metallb_namespace)
        self.published: NodeDesiredState | None = None
        self.reported_problems: set[str] = set()
        self.events: EventPoster | None = None

    def problems(self, feeds: Feeds, result: TrackerResult) -> tuple[str, ...]:
        """Every problem found in cluster objects, sorted; new ones are logged once."""
        problems = {str(p) for ps in feeds.object_problems.values() for p in ps}
        problems.update(str(p) for p in result.problems)
        for problem in sorted(problems - self.reported_problems):
            log.warning("cluster object problem: %s", problem)
        if self.events is not None:
            # The computation's problems and those found parsing a Service (a bad ingress
            # IP, an invalid destination annotation): the Service's owner sees them there.
            found_in_objects = [p for ps in feeds.object_problems.values() for p in ps]
            for found in [*found_in_objects, *result.problems]:
                if str(found) not in self.reported_problems:
                    event = describe_problem(self.config.node_name, found)
                    if event is not None:
                        self.events.post(event)
        self.reported_problems = problems
        return tuple(sorted(problems))

    def save_allocation(self, result: TrackerResult) -> None:
        if result.allocation != self.allocation:
            self.allocation = dict(result.allocation)
            self._save_allocation()

    def log_decisions(self, result: TrackerResult) -> None:
        """One line per Service whose egress on this node changed, with the reason."""
        if not result.changed:
            return
        before = _by_key(self.published, result.changed)
        after = _by_key(result.state, result.changed)
        for key in result.changed:
            old, new = before.get(key), after.get(key)
            if old == new:
                continue
            if new is None:
                log.info(
                    "service no longer labelled or gone: egress removed", extra={"service": key}
                )
            else:
                log.info(
                    "service egress %s: %s",
                    new.role,
                    describe_egress(new),
                    extra={"service": key, "node": new.gateway_node},
                )
            # An Event on the Service, but not for the first state after start (nothing
            # changed then) nor when only the source IPs changed (no news for `kubectl describe`).
            if self.events is None or self.published is None:
                continue
            if old is not None and new is not None and _summary(old) == _summary(new):
                continue
            event = describe_change(self.config.node_name, new, key)
            if event is not None:
                self.events.post(event)

    def _load_allocation(self) -> dict[str, int]:
        path = os.path.join(self.config.run_dir, ALLOCATION_FILE)
        try:
            with open(path) as file:
                data = json.load(file)
            return {str(k): int(v) for k, v in data.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as error:
            log.warning("ignoring unreadable %s: %s", path, error)
            return {}

    def _save_allocation(self) -> None:
        # Kept so that a restarted watcher gives every gateway node the same mark and table.
        path = os.path.join(self.config.run_dir, ALLOCATION_FILE)
        temporary = f"{path}.tmp"
        try:
            with open(temporary, "w") as file:
                json.dump(self.allocation, file)
            os.replace(temporary, path)
        except OSError as error:
            log.warning("cannot save the mark allocation to %s: %s", path, error)


def _summary(service: ServiceEgress) -> tuple[object, ...]:
    """What an Event reports: role, gateway, LB IPs and per-family action and reason."""
    return (
        service.role,
        service.gateway_node,
        service.lb_ips,
        tuple((e.family, e.action, e.reason) for e in service.families),
    )


def _by_key(state: NodeDesiredState | None, keys: tuple[str, ...]) -> dict[str, ServiceEgress]:
    """The Services of ``state`` with these keys, found by bisection (Services are sorted by
    namespace and name)."""
    found: dict[str, ServiceEgress] = {}
    if state is None:
        return found
    services = state.services
    for key in keys:
        wanted = tuple(key.split("/", 1))
        index = bisect.bisect_left(services, wanted, key=lambda s: (s.namespace, s.name))
        if index < len(services) and services[index].key == key:
            found[key] = services[index]
    return found


def run(config: Config) -> int:
    """Watch until SIGTERM; returns the exit status."""
    events: queue.Queue[Event] = queue.Queue()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        events.put(_STOP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    watcher = Watcher(config)
    try:
        api = api_client(config.kubeconfig)
    except Exception as error:  # a missing or broken kubeconfig, no in-cluster service account
        ERRORS.labels("watcher", "kubeconfig").inc()
        source = (
            f"KUBECONFIG={config.kubeconfig}" if config.kubeconfig else "in-cluster configuration"
        )
        log.error("cannot load the Kubernetes client configuration (%s): %s", source, error)
        return 1
    watcher.events = EventPoster(api_client(config.kubeconfig), config.node_name)
    watcher.events.start()
    feeds = Feeds(
        api,
        events,
        watcher.tracker,
        watcher.scope_inputs,
        config.metallb_namespace,
        config.watch_idle_timeout,
    )
    context: zmq.Context[Any] = zmq.Context()
    socket = connect_worker(context, config.run_dir, "watcher")
    publisher = ChangePublisher()
    feeds.start()
    feeds.follow_scopes()
    log.info("watching the cluster", extra={"node": config.node_name})
    last_sent = 0.0
    last_status: WatcherStatus | None = None
    last_problems: tuple[str, ...] = ()
    try:
        while True:
            now = time.monotonic()
            timeout = REPUBLISH_INTERVAL
            deadline = feeds.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
            try:
                event: Event | None = events.get(timeout=timeout)
            except queue.Empty:
                event = None
            # Everything queued meanwhile is taken too: a burst costs one computation,
            # and a lone event waits for nothing.
            taken = 0
            while event is not None:
                if event is _STOP:
                    return 0
                feeds.handle(event)
                feeds.follow_scopes()
                taken += 1
                if taken >= MAX_BATCH:
                    break
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    event = None
            status = WatcherStatus(
                synced=feeds.synced(time.monotonic()),
                error="; ".join(sorted(set(feeds.errors.values()))),
            )
            if status != last_status:
                socket.send(encode(status))
                last_status = status
            _answer_supervisor(socket, publisher, watcher, last_problems)
            now = time.monotonic()
            if not feeds.may_publish(now):
                continue
            if watcher.tracker.dirty or watcher.published is None or taken:
                result = watcher.tracker.compute()
                watcher.save_allocation(result)
                problems = watcher.problems(feeds, result)
                if result.state != watcher.published or problems != last_problems:
                    watcher.log_decisions(result)
                    PUBLISHED.labels("watcher").inc()
                    socket.send(publisher.frame(result.state, problems))
                    watcher.published = result.state
                    last_problems = problems
                    last_sent = now
                if feeds.relisted:
                    # A relist allocated and freed the raw objects of a whole resource.
                    feeds.relisted = False
                    release_memory()
            if watcher.published is not None and now - last_sent >= REPUBLISH_INTERVAL:
                # Nothing changed: an empty change says so (liveness, and the supervisor's
                # check that it holds our state) without recomputing anything.
                socket.send(publisher.frame(watcher.published, last_problems))
                last_sent = now
    finally:
        feeds.stop()
        socket.close(0)
        context.term()


def _answer_supervisor(
    socket: zmq.Socket[Any],
    publisher: ChangePublisher,
    watcher: Watcher,
    problems: tuple[str, ...],
) -> None:
    """Read what the supervisor sent: a request for the complete state is answered at once."""
    while True:
        try:
            frame = socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            if publisher.handle(frame) and watcher.published is not None:
                socket.send(publisher.frame(watcher.published, problems))
        except MessageError as error:
            IPC_DROPPED.labels("watcher").inc()
            log.warning("dropped a message", extra={"error": str(error)})


def main() -> None:
    config = start_worker("watcher")
    raise SystemExit(run(config))
