"""The watcher process: cluster objects in, this node's desired state out.

One informer thread per resource feed raw events into a queue; the main thread keeps the
parsed objects (:class:`ClusterState`), coalesces bursts, recomputes the
desired state with the pure :func:`compute_node_state` and publishes it to the
supervisor when it changed. Nothing is published before every resource has
been listed once: a half-synced view (say, Services without their
ServiceL2Status) would tear down working kernel state.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import time
from types import FrameType
from typing import Any

import zmq
from kubernetes import client
from kubernetes import config as kube_config

from metaleg.config import Config
from metaleg.ipc import Publish, WatcherStatus, connect_worker, encode
from metaleg.lifecycle import release_memory, start_worker
from metaleg.metrics import ERRORS, PUBLISHED
from metaleg.model import NodeDesiredState, ServiceEgress
from metaleg.watcher.cluster import (
    ClusterState,
    ObjectError,
    Problem,
    parse_endpoint_slice,
    parse_l2_status,
    parse_node,
    parse_pod,
    parse_service,
)
from metaleg.watcher.desired import NodeSettings, compute_node_state
from metaleg.watcher.events import EventPoster, describe_change
from metaleg.watcher.informer import Event, Informer, resource_specs

log = logging.getLogger(__name__)

COALESCE_QUIET = 0.02
"""Publish once no event arrived for this long..."""
COALESCE_MAX = 0.2
"""...or at the latest this long after the first event of a burst."""
REPUBLISH_INTERVAL = 10.0
"""Re-send the unchanged state this often: a liveness signal, and repair of a lost message."""
ALLOCATION_FILE = "allocation.json"

_STOP = Event("", "stop")


def _parsers() -> dict[str, Any]:
    return {
        "services": (parse_service, "services"),
        "endpointslices": (parse_endpoint_slice, "slices"),
        "nodes": (parse_node, "nodes"),
        "servicel2statuses": (parse_l2_status, "l2_statuses"),
        "pods": (parse_pod, "pods"),
    }


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
        self.cluster = ClusterState()
        self.object_problems: dict[tuple[str, str], list[Problem]] = {}
        self.synced: set[str] = set()
        self.errors: dict[str, str] = {}
        self.allocation = self._load_allocation()
        self.published: NodeDesiredState | None = None
        self.reported_problems: set[str] = set()
        self.events: EventPoster | None = None
        self.relisted = False
        """A resource was listed since the last :func:`release_memory`."""

    # --- cluster objects ---------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """Apply one informer event to the parsed cluster state."""
        parse, attribute = _parsers()[event.resource]
        store: dict[str, Any] = getattr(self.cluster, attribute)
        if event.kind == "error":
            self.errors[event.resource] = event.message
            return
        self.errors.pop(event.resource, None)
        if event.kind == "replace":
            store.clear()
            for stale in [k for k in self.object_problems if k[0] == event.resource]:
                del self.object_problems[stale]
            for obj in event.objects:
                self._upsert(event.resource, parse, store, obj)
            self.synced.add(event.resource)
            self.relisted = True
        elif event.kind == "upsert" and event.object is not None:
            self._upsert(event.resource, parse, store, event.object)
        elif event.kind == "delete" and event.object is not None:
            key = _key_of(event.object)
            if key is not None:
                store.pop(key, None)
                self.object_problems.pop((event.resource, key), None)

    def _upsert(
        self, resource: str, parse: Any, store: dict[str, Any], obj: dict[str, Any]
    ) -> None:
        problems: list[Problem] = []
        key = _key_of(obj)
        try:
            info = parse(obj, problems)
        except ObjectError as error:
            log.warning("skipped an object: %s", error, extra={"resource": resource})
            return
        assert key is not None  # parse() succeeded, so the object has a name
        store[key] = info
        if problems:
            self.object_problems[(resource, key)] = problems
        else:
            self.object_problems.pop((resource, key), None)

    # --- desired state -----------------------------------------------------------------------

    def compute(self) -> Publish:
        result = compute_node_state(self.cluster, self.settings, self.allocation)
        if result.allocation != self.allocation:
            self.allocation = dict(result.allocation)
            self._save_allocation()
        problems = [str(p) for ps in self.object_problems.values() for p in ps]
        problems += [str(p) for p in result.problems]
        for problem in sorted(set(problems) - self.reported_problems):
            log.warning("cluster object problem: %s", problem)
        self.reported_problems = set(problems)
        self._log_decisions(result.state)
        return Publish(state=result.state, problems=tuple(sorted(set(problems))))

    def _log_decisions(self, state: NodeDesiredState) -> None:
        """One line per Service whose egress on this node changed, with the reason."""
        before = {s.key: s for s in self.published.services} if self.published else {}
        after = {s.key: s for s in state.services}
        for key in sorted(set(before) | set(after)):
            old, new = before.get(key), after.get(key)
            if old == new:
                continue
            if new is None:
                log.info(
                    "service no longer labelled or gone: egress removed", extra={"service": key}
                )
            else:
                log.info(_describe(new), extra={"service": key, "node": new.gateway_node})
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


def _describe(service: ServiceEgress) -> str:
    parts = []
    for entry in service.families:
        family = f"IPv{int(entry.family)}"
        if entry.action == "snat":
            parts.append(
                f"{family}: gateway here, SNAT {len(entry.source_ips)} sources to {entry.snat_ip}"
            )
        elif entry.action == "mark":
            parts.append(
                f"{family}: forward {len(entry.source_ips)} sources to {service.gateway_node}"
            )
        else:
            parts.append(f"{family}: reject {len(entry.source_ips)} sources ({entry.reason})")
    detail = "; ".join(parts) if parts else "no endpoints on this node"
    return f"service egress {service.role}: {detail}"


def _summary(service: ServiceEgress) -> tuple[object, ...]:
    """What an Event reports: role, gateway, LB IPs and per-family action and reason."""
    return (
        service.role,
        service.gateway_node,
        service.lb_ips,
        tuple((e.family, e.action, e.reason) for e in service.families),
    )


def _key_of(obj: dict[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        return None
    namespace = metadata.get("namespace")
    return (
        f"{namespace}/{metadata['name']}"
        if isinstance(namespace, str) and namespace
        else metadata["name"]
    )


def _api_client(config: Config) -> Any:
    if config.kubeconfig:
        return kube_config.new_client_from_config(config_file=config.kubeconfig)
    kube_config.load_incluster_config()
    return client.ApiClient()


def run(config: Config) -> int:
    """Watch until SIGTERM; returns the exit status."""
    events: queue.Queue[Event] = queue.Queue()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        events.put(_STOP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    watcher = Watcher(config)
    try:
        api = _api_client(config)
    except Exception as error:  # a missing or broken kubeconfig, no in-cluster service account
        ERRORS.labels("watcher", "kubeconfig").inc()
        source = (
            f"KUBECONFIG={config.kubeconfig}" if config.kubeconfig else "in-cluster configuration"
        )
        log.error("cannot load the Kubernetes client configuration (%s): %s", source, error)
        return 1
    watcher.events = EventPoster(_api_client(config), config.node_name)
    watcher.events.start()
    informers = [
        Informer(spec, events)
        for spec in resource_specs(api, config.metallb_namespace, config.node_name)
    ]
    context: zmq.Context[Any] = zmq.Context()
    socket = connect_worker(context, config.run_dir, "watcher")
    for informer in informers:
        informer.start()
    log.info("watching the cluster", extra={"node": config.node_name})
    last_sent = 0.0
    last_status: WatcherStatus | None = None
    last_publish: Publish | None = None
    try:
        while True:
            try:
                event = events.get(timeout=REPUBLISH_INTERVAL)
            except queue.Empty:
                event = None
            if event is _STOP:
                return 0
            changed = event is not None
            if event is not None:
                watcher.handle(event)
                # Coalesce a burst: keep taking events until a short quiet spell.
                deadline = time.monotonic() + COALESCE_MAX
                while (remaining := deadline - time.monotonic()) > 0:
                    try:
                        event = events.get(timeout=min(COALESCE_QUIET, remaining))
                    except queue.Empty:
                        break
                    if event is _STOP:
                        return 0
                    watcher.handle(event)
                # Not kept while idle: a relist's event holds every raw object it listed.
                event = None
            all_synced = len(watcher.synced) == len(informers)
            status = WatcherStatus(
                synced=all_synced, error="; ".join(sorted(watcher.errors.values()))
            )
            if status != last_status:
                socket.send(encode(status))
                last_status = status
            if not all_synced:
                continue
            now = time.monotonic()
            if changed or last_publish is None:
                publish = watcher.compute()
                if publish.state != watcher.published:
                    PUBLISHED.labels("watcher").inc()
                    socket.send(encode(publish))
                    watcher.published = publish.state
                    last_sent = now
                last_publish = publish
                if watcher.relisted:
                    # A relist allocated and freed the raw objects of a whole resource.
                    watcher.relisted = False
                    release_memory()
            if now - last_sent >= REPUBLISH_INTERVAL:
                # Nothing changed: resend what we have (a liveness signal and the repair of a
                # lost message) without recomputing it, so that an idle watcher stays idle.
                socket.send(encode(last_publish))
                last_sent = now
    finally:
        for informer in informers:
            informer.stop()
        socket.close(0)
        context.term()


def main() -> None:
    config = start_worker("watcher")
    raise SystemExit(run(config))
