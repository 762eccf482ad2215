"""The supervisor's metrics endpoint: every process's metrics in one scrape.

:func:`build_registry` combines prometheus-client's ``MultiProcessCollector``
(the counters and histograms every process records, see :mod:`metaleg.metrics`)
with :class:`SupervisorCollector`, which derives gauges from the supervisor's
records at scrape time: process up/restarts, CPU and memory read from
``/proc``, snapshot generations, egress Services by role and source IPs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from metaleg.lifecycle import process_tree
from metaleg.model import NodeDesiredState
from metaleg.supervisor.egress_counters import ACTION_LABELS, CounterKey

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ProcessView(Protocol):
    name: str
    restarts: int

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...


class SupervisorView(Protocol):
    """What the collector reads from the supervisor."""

    def process_views(self) -> list[ProcessView]: ...

    def current_state(self) -> tuple[int, NodeDesiredState | None]: ...

    def applied_generations(self) -> dict[str, int]: ...

    def firewall_backend_name(self) -> str: ...

    def egress_counter_totals(self) -> dict[CounterKey, tuple[int, int]]: ...

    def forkserver_pid(self) -> int | None:
        """The fork server the workers come from (counted as the supervisor's)."""
        ...


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """Direct and indirect children of ``pid`` (the firewall's xtables helpers count as firewall)."""
    tree = process_tree() if tree is None else tree
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in tree.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def process_resources(pid: int, include_children: bool = True) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of a process and its descendants, from ``/proc``."""
    cpu = 0.0
    rss = 0
    for member in [pid, *(descendants(pid) if include_children else [])]:
        try:
            with open(f"/proc/{member}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{member}/statm") as file:
                resident_pages = int(file.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        cpu += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
        rss += resident_pages * _PAGE_SIZE
    return cpu, rss


class SupervisorCollector(Collector):
    """Gauges computed from the supervisor's records at scrape time."""

    def __init__(self, view: SupervisorView) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("metaleg_process_up", "1 if the process runs.", labels=["process"])
        restarts = CounterMetricFamily(
            "metaleg_process_restarts",
            "Restarts of a worker by the supervisor.",
            labels=["process"],
        )
        cpu = CounterMetricFamily(
            "metaleg_process_cpu_seconds",
            "CPU time of the process and its helper children (the supervisor's: the fork server).",
            labels=["process"],
        )
        memory = GaugeMetricFamily(
            "metaleg_process_resident_memory_bytes",
            "Resident memory of the process and its helper children (the supervisor's: the fork server).",
            labels=["process"],
        )
        processes = self.view.process_views()
        up.add_metric(["supervisor"], 1)
        own_cpu, own_rss = process_resources(os.getpid(), include_children=False)
        forkserver = self.view.forkserver_pid()
        if forkserver is not None:
            server_cpu, server_rss = process_resources(forkserver, include_children=False)
            own_cpu += server_cpu
            own_rss += server_rss
        cpu.add_metric(["supervisor"], own_cpu)
        memory.add_metric(["supervisor"], own_rss)
        for process in processes:
            up.add_metric([process.name], 1 if process.running else 0)
            restarts.add_metric([process.name], process.restarts)
            if process.running and process.pid is not None:
                process_cpu, process_rss = process_resources(process.pid)
                cpu.add_metric([process.name], process_cpu)
                memory.add_metric([process.name], process_rss)
        yield from (up, restarts, cpu, memory)

        generation, state = self.view.current_state()
        snapshot = GaugeMetricFamily(
            "metaleg_snapshot_generation",
            "Desired-state generation: the newest one (process=supervisor) and the one each "
            "data-plane worker applied last.",
            labels=["process"],
        )
        snapshot.add_metric(["supervisor"], generation)
        for name, applied in sorted(self.view.applied_generations().items()):
            snapshot.add_metric([name], applied)
        yield snapshot

        services = GaugeMetricFamily(
            "metaleg_egress_services",
            "Labelled Services by this node's role for them.",
            labels=["role"],
        )
        sources = GaugeMetricFamily(
            "metaleg_source_ips",
            "Pod IPs this node handles, by family and action (snat, mark, reject).",
            labels=["family", "action"],
        )
        roles = {"gateway": 0, "forwarder": 0, "reject": 0, "none": 0}
        counts: dict[tuple[str, str], int] = {
            (family, action): 0
            for family in ("ipv4", "ipv6")
            for action in ("snat", "mark", "reject")
        }
        if state is not None:
            for service in state.services:
                roles[str(service.role)] = roles.get(str(service.role), 0) + 1
                for entry in service.families:
                    key = (f"ipv{int(entry.family)}", str(entry.action))
                    counts[key] = counts.get(key, 0) + len(entry.source_ips)
        for role, count in roles.items():
            services.add_metric([role], count)
        for (family, action), count in counts.items():
            sources.add_metric([family, action], count)
        yield services
        yield sources

        backend = GaugeMetricFamily(
            "metaleg_firewall_backend_info", "The firewall backend in use.", labels=["backend"]
        )
        backend.add_metric([self.view.firewall_backend_name()], 1)
        yield backend
        yield from egress_counter_families(self.view.egress_counter_totals())


def egress_counter_families(
    totals: dict[CounterKey, tuple[int, int]],
) -> tuple[CounterMetricFamily, CounterMetricFamily]:
    """``metaleg_egress_packets_total`` and ``metaleg_egress_bytes_total`` per Service,
    family and action (``snat``, ``forward``, ``reject``), from the kernel's counters."""
    labels = ["namespace", "service", "family", "action"]
    packets = CounterMetricFamily(
        "metaleg_egress_packets",
        "Packets of a labelled Service's pods this node treated: SNATed to the LB IP "
        "(snat), marked and routed to the gateway node (forward), rejected because no "
        "gateway is usable (reject).",
        labels=labels,
    )
    size = CounterMetricFamily(
        "metaleg_egress_bytes",
        "Bytes of a labelled Service's pods this node treated, by action (see "
        "metaleg_egress_packets_total).",
        labels=labels,
    )
    for (namespace, name, family, action), (packet_count, byte_count) in sorted(totals.items()):
        values = [namespace, name, f"ipv{int(family)}", ACTION_LABELS[action]]
        packets.add_metric(values, packet_count)
        size.add_metric(values, byte_count)
    return packets, size


def build_registry(view: SupervisorView, multiprocess_dir: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    registry.register(SupervisorCollector(view))
    return registry
