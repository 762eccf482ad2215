"""The leak counter: continuous streams through a scripted sequence of disruptive events.

Every relay pod (one per node, both families) sends a continuous UDP stream
and keeps a TCP connection sending, several packets a second, to the
internet host, which records the source address of every packet. Once the
Service is labelled and each stream has been seen with the LoadBalancer IP,
any packet of these streams that arrives with another source is a *leak*.
Between events the scenario waits until every stream is seen with the LB IP
again, and it reports, per event, how long each stream was silent (its
outage).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.lab import LB_IP4, LB_IP6, Pod
from tests.lab.agents import EgressLab
from tests.lab.traffic import Record, Stream
from tests.waiting import wait_until

NAMESPACE, SERVICE = "mail", "relay"
LB_IPS = {4: LB_IP4, 6: LB_IP6}
RATE = 10.0


@dataclass
class EventReport:
    name: str
    started: float
    recovered: float
    outage: dict[str, float] = field(default_factory=dict)
    """Per stream (``pod/IPv4/udp``): the longest silence in the event's window, in seconds."""

    @property
    def worst(self) -> float:
        return max(self.outage.values(), default=0.0)


@dataclass
class LeakReport:
    events: list[EventReport]
    leaks: list[Record]
    packets: int

    def table(self) -> str:
        lines = [f"{'EVENT':<44} {'RECOVERED':>9} {'WORST OUTAGE':>12}  (per stream: udp/tcp)"]
        for event in self.events:
            lines.append(
                f"{event.name:<44} {event.recovered - event.started:>8.2f}s {event.worst:>11.2f}s"
            )
        lines.append(
            f"packets from the relay pods after labelling: {self.packets}, leaked: {len(self.leaks)}"
        )
        return "\n".join(lines)


class LeakScenario:
    """Runs the sequence against an :class:`EgressLab` whose three agents are ready."""

    def __init__(self, egress: EgressLab, recovery_timeout: float = 30.0) -> None:
        self.egress = egress
        self.lab = egress.lab
        self.cluster = egress.cluster
        self.recovery_timeout = recovery_timeout
        self.pods: list[Pod] = []
        self.streams: dict[str, tuple[Stream, int]] = {}
        self.armed_at: float | None = None
        self.events: list[EventReport] = []

    # --- setup -----------------------------------------------------------------------------------

    def _start_streams(self, pod: Pod) -> None:
        for family in (4, 6):
            stream = self.lab.stream(pod, family, rate=RATE, stall=1.0)  # type: ignore[arg-type]
            self.streams[f"{pod.name}/IPv{family}"] = (stream, family)

    def _publish_endpoints(self) -> None:
        self.cluster.endpoints(NAMESPACE, SERVICE, "IPv4", [(p.ipv4, p.node) for p in self.pods])
        self.cluster.endpoints(NAMESPACE, SERVICE, "IPv6", [(p.ipv6, p.node) for p in self.pods])

    def _announce(self, node: str) -> None:
        self.lab.announce(LB_IP4, node)
        self.lab.announce(LB_IP6, node)

    def _set_gateway(self, node: str | None) -> None:
        self.cluster.gateway(NAMESPACE, SERVICE, node)
        if node is not None:
            self._announce(node)

    # --- observation -----------------------------------------------------------------------------

    def _records(self, since: float) -> dict[str, list[Record]]:
        records = self.lab.records(since=since)
        result: dict[str, list[Record]] = {}
        for name, (stream, _) in self.streams.items():
            result[name] = [r for r in records if (r.token or "").startswith(stream.prefix)]
        return result

    def _all_streams_on_lb(self, since: float) -> bool:
        records = self._records(since)
        return all(
            any(r.src == LB_IPS[family] and r.proto == proto for r in records[name])
            for name, (_, family) in self.streams.items()
            for proto in ("udp", "tcp")
        )

    def _wait_recovered(self, name: str, started: float) -> EventReport:
        # Recovered: every stream delivered packets from the LB IP after the event settled.
        probe_from = time.time()

        def recovered() -> bool:
            return self._all_streams_on_lb(max(probe_from, time.time() - 1.0))

        try:
            wait_until(
                recovered,
                timeout=self.recovery_timeout,
                interval=0.1,
                message=f"streams after {name}",
            )
        except TimeoutError as error:
            raise AssertionError(f"{error}\n{self._diagnosis(time.time() - 2.0)}") from None
        report = EventReport(name, started, time.time())
        records = self._records(started - 0.5)
        for stream_name, stream_records in records.items():
            for proto in ("udp", "tcp"):
                times = sorted(r.time for r in stream_records if r.proto == proto)
                edges = [started, *times, report.recovered]
                gap = max((b - a for a, b in itertools.pairwise(edges)), default=0.0)
                report.outage[f"{stream_name}/{proto}"] = gap
        self.events.append(report)
        return report

    def _diagnosis(self, since: float) -> str:
        """Which streams are stuck, what arrived from them lately, and the nodes' state."""
        records = self._records(since)
        lines = []
        for name, (stream, family) in self.streams.items():
            for proto in ("udp", "tcp"):
                seen = sorted({r.src for r in records[name] if r.proto == proto})
                state = "ok   " if LB_IPS[family] in seen else "STUCK"
                errors = [e.error for e in stream.errors(since=since) if e.proto == proto][-2:]
                lines.append(f"{state} {name}/{proto}: sources {seen} errors {errors}")
        for node in self.lab.nodes:
            table = self.lab.exec(node, "conntrack", "-L", check=False)
            relevant = [line for line in table.splitlines() if "dport=500" in line][:8]
            lines.append(f"--- {node} conntrack towards the recorder:")
            lines.extend(relevant)
            lines.append(f"--- {node} log:\n{self.egress.agents[node].log(1500)}")
        return "\n".join(lines)

    def event(self, name: str, action: Callable[[], None]) -> EventReport:
        started = time.time()
        action()
        return self._wait_recovered(name, started)

    # --- the sequence ----------------------------------------------------------------------------

    def setup(self) -> None:
        for node in ("node-a", "node-b", "node-c"):
            self.pods.append(self.egress.add_pod(node, f"relay-{node[-1]}", {"app": SERVICE}))
        for pod in self.pods:
            self._start_streams(pod)
        # Long-running flows exist (with node IPs) before the Service is labelled.
        wait_until(
            lambda: all(self._records(0)[n] for n in self.streams), timeout=10, message="streams"
        )

    def label(self) -> EventReport:
        def action() -> None:
            self.cluster.service(NAMESPACE, SERVICE, (LB_IP4, LB_IP6))
            self._publish_endpoints()
            self._set_gateway("node-b")

        report = self.event("label (gateway node-b)", action)
        # From here on, every packet of these streams must carry the LB IP.
        self.armed_at = report.recovered
        return report

    def move(self, node: str, delay_new_gateway: float = 0.0) -> EventReport:
        def action() -> None:
            if delay_new_gateway <= 0:
                self._set_gateway(node)
                return
            # Freeze the new gateway's watcher: its agent learns of the change late.
            watcher = self.egress.agents[node].worker_pid("watcher")
            assert watcher is not None
            os.kill(watcher, signal.SIGSTOP)
            try:
                self._set_gateway(node)
                time.sleep(delay_new_gateway)
            finally:
                os.kill(watcher, signal.SIGCONT)

        suffix = f", its agent {delay_new_gateway:.0f}s late" if delay_new_gateway else ""
        return self.event(f"gateway -> {node}{suffix}", action)

    def gateway_unknown_then_known(self, node: str, unknown_for: float = 2.0) -> EventReport:
        def action() -> None:
            self._set_gateway(None)
            time.sleep(unknown_for)
            self._set_gateway(node)

        return self.event(f"gateway unknown {unknown_for:.0f}s, then {node}", action)

    def new_pod(self, node: str) -> EventReport:
        """A Pod whose IP shows on its Pod object 1 s before it sends, and on the
        EndpointSlice 2 s after that (antrea-io/antrea#3361)."""

        def action() -> None:
            pod = self.egress.add_pod(node, f"relay-{node[-1]}2", {"app": SERVICE})
            self.pods.append(pod)
            time.sleep(1.0)
            self._start_streams(pod)
            time.sleep(2.0)
            self._publish_endpoints()

        return self.event(f"new pod on {node}", action)

    def kill_worker(self, node: str, worker: str) -> EventReport:
        def action() -> None:
            pid = self.egress.agents[node].worker_pid(worker)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_until(
                lambda: self.egress.agents[node].worker_pid(worker) not in (None, pid),
                timeout=10,
                message=f"{worker} on {node} restarted",
            )

        return self.event(f"kill -9 {worker} on {node}", action)

    def restart_agent(self, node: str) -> EventReport:
        def action() -> None:
            self.egress.stop_agent(node)
            self.egress.start_agent(node)
            self.egress.wait_ready(node)

        return self.event(f"supervisor restart on {node}", action)

    def leaks(self) -> list[Record]:
        """Packets of the streams with a source other than the LB IP since arming."""
        assert self.armed_at is not None
        records = self._records(self.armed_at)
        return [
            r
            for name, (_, family) in self.streams.items()
            for r in records[name]
            if r.src != LB_IPS[family]
        ]

    def describe_leaks(self, leaks: list[Record]) -> str:
        """Leaks counted per event (the last one started before the packet), stream and source."""
        counts: dict[tuple[str, str, str], int] = {}
        for record in leaks:
            event = next(
                (e.name for e in reversed(self.events) if e.started <= record.time), "before"
            )
            stream = next(
                (
                    f"{name}/{record.proto}"
                    for name, (s, _) in self.streams.items()
                    if (record.token or "").startswith(s.prefix)
                ),
                "?",
            )
            key = (event, stream, record.src)
            counts[key] = counts.get(key, 0) + 1
        return "\n".join(
            f"{count:5d} during {event!r}: {stream} from {src}"
            for (event, stream, src), count in counts.items()
        )

    def report(self) -> LeakReport:
        assert self.armed_at is not None
        records = self._records(self.armed_at)
        return LeakReport(list(self.events), self.leaks(), sum(len(r) for r in records.values()))

    def run_all(self) -> LeakReport:
        """The whole sequence of the issue; returns the report (before the final unlabel)."""
        self.setup()
        self.label()
        self.move("node-c")
        self.move("node-a", delay_new_gateway=2.0)
        self.move("node-b")
        self.gateway_unknown_then_known("node-b")
        self.new_pod("node-c")
        for worker in ("watcher", "firewall", "routing"):
            self.kill_worker("node-a", worker)
            self.kill_worker("node-b", worker)
        self.restart_agent("node-a")
        self.restart_agent("node-b")
        return self.report()

    def unlabel_and_expect_node_ips(self) -> None:
        started = time.time()
        self.cluster.label_service(NAMESPACE, SERVICE, False)

        def node_ips() -> bool:
            records = self._records(max(started, time.time() - 1.0))
            for name, (_, family) in self.streams.items():
                pod = next(p for p in self.pods if name.startswith(p.name + "/"))
                node = self.lab.node(pod.node)
                expected = node.ipv4 if family == 4 else node.ipv6
                if not any(r.src == expected for r in records[name]):
                    return False
            return True

        wait_until(
            node_ips, timeout=self.recovery_timeout, interval=0.2, message="node IPs after unlabel"
        )

    def stop(self) -> None:
        for stream, _ in self.streams.values():
            stream.stop()
