"""Per-Service egress counters: the worker sends the backend's readings when they change, the
supervisor turns them into monotonic totals for /metrics and status (issue 15)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from metaleg.backend import EgressCount, EgressCounting
from metaleg.config import Config
from metaleg.ipc import AuditCounts, EgressCounts, Hello, Snapshot, encode
from metaleg.model import Action, Family, NodeDesiredState
from metaleg.supervisor.egress_counters import EgressCounterTotals
from metaleg.supervisor.metrics import egress_counter_families
from tests.test_ipc_worker import Hub, state
from tests.test_supervisor import Peer, _status, hub  # noqa: F401  (hub is a fixture)
from tests.waiting import wait_until

RELAY = ("mail", "relay", Family.IPV4, Action.SNAT)


def _count(packets: int, size: int, key: tuple[str, str, Family, Action] = RELAY) -> EgressCount:
    return EgressCount(*key, packets, size)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1000)), max_size=30))
def test_totals_only_grow_and_count_every_packet_across_resets(
    steps: list[tuple[bool, int]],
) -> None:
    """Each step either adds traffic to the kernel counter or recreates it (a reset, then
    traffic): the total is all traffic seen, and never goes down."""
    totals = EgressCounterTotals()
    kernel, seen, before = 0, 0, 0
    for reset, traffic in steps:
        if reset:
            kernel = 0
        kernel += traffic
        seen += traffic
        totals.update([_count(kernel, kernel * 100)])
        packets = totals.totals()[RELAY][0]
        assert packets >= before
        before = packets
        # A reset that is followed by more traffic than before it cannot be told from
        # growth: at most that much is missed, never counted twice.
        assert packets <= seen
    if steps and not any(reset for reset, _ in steps):
        assert totals.totals()[RELAY] == (seen, seen * 100)


def test_a_service_missing_from_a_reading_loses_its_series() -> None:
    totals = EgressCounterTotals()
    other = ("mail", "other", Family.IPV6, Action.REJECT)
    totals.update([_count(5, 500), _count(2, 120, other)])
    totals.update([_count(7, 700)])
    assert totals.totals() == {RELAY: (7, 700)}
    totals.update([_count(3, 300), _count(1, 60, other)])  # relay reset, other is new again
    assert totals.totals() == {RELAY: (10, 1000), other: (1, 60)}
    assert totals.per_service() == {
        ("mail", "relay"): {"snat": (10, 1000)},
        ("mail", "other"): {"reject": (1, 60)},
    }
    totals.update([_count(-1, 5)])  # not a reading: ignored, the key is dropped
    assert totals.totals() == {}


def test_the_families_carry_service_family_and_action_labels() -> None:
    packets, size = egress_counter_families(
        {RELAY: (7, 700), ("mail", "relay", Family.IPV6, Action.MARK): (1, 80)}
    )
    assert [(s.name, s.labels, s.value) for s in packets.samples if s.name.endswith("_total")] == [
        (
            "metaleg_egress_packets_total",
            {"namespace": "mail", "service": "relay", "family": "ipv4", "action": "snat"},
            7,
        ),
        (
            "metaleg_egress_packets_total",
            {"namespace": "mail", "service": "relay", "family": "ipv6", "action": "forward"},
            1,
        ),
    ]
    assert [s.value for s in size.samples if s.name.endswith("_total")] == [700, 80]


# --- the worker: reads every COUNT_INTERVAL, sends only what changed -------------------------


class CountingBackend:
    """Applies nothing; its counters are what the test wrote to ``counts_path`` (JSON), and
    reading them fails while that file holds ``"fail"``."""

    name = "counting"

    def __init__(self, counts_path: str) -> None:
        self.counts_path = counts_path

    def apply(self, state: NodeDesiredState) -> None:
        pass

    def resync(self, state: NodeDesiredState) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        pass

    def read_counts(self) -> list[EgressCount]:
        with open(self.counts_path) as file:
            rows = json.load(file)
        if rows == "fail":
            raise OSError("the kernel said no")
        return [EgressCount(n, s, Family(f), Action(a), p, b) for n, s, f, a, p, b in rows]


def _run_counting_worker(run_dir: str, counts_path: str) -> None:
    from metaleg import worker

    worker.COUNT_INTERVAL = 0.1  # read often: the test waits for readings, not for time
    config = Config(node_name="node-a", run_dir=run_dir, reconciliation_interval=3600.0)
    backend = CountingBackend(counts_path)
    assert isinstance(backend, EgressCounting)
    raise SystemExit(worker.DataplaneWorker("firewall", backend, config).run())


@pytest.fixture
def counting_worker() -> Iterator[tuple[Hub, str]]:
    with tempfile.TemporaryDirectory(prefix="mlc") as run_dir:
        hub_ = Hub(run_dir)
        counts_path = os.path.join(run_dir, "counts.json")
        _write(counts_path, [["mail", "relay", 4, "snat", 3, 300]])
        process = multiprocessing.get_context("spawn").Process(
            target=_run_counting_worker, args=(run_dir, counts_path)
        )
        process.start()
        try:
            yield hub_, counts_path
        finally:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(5)
            hub_.close()


def _write(path: str, rows: Any) -> None:
    with open(path + ".new", "w") as file:
        json.dump(rows, file)
    os.replace(path + ".new", path)


def test_the_worker_sends_counts_after_applying_and_only_when_they_change(
    counting_worker: tuple[Hub, str],
) -> None:
    hub_, counts_path = counting_worker
    assert isinstance(hub_.receive(), Hello)
    hub_.send(encode(Snapshot(1, state("10.244.1.10"))))
    message = hub_.receive_until(lambda m: isinstance(m, EgressCounts))
    assert message.counts == (_count(3, 300),)
    # Unchanged readings are not sent again; a failing reading sends nothing and the
    # worker goes on; the next change is sent.
    _write(counts_path, "fail")
    assert not hub_.socket.poll(500) or not isinstance(hub_.receive(), EgressCounts)
    _write(counts_path, [["mail", "relay", 4, "snat", 5, 500]])
    message = hub_.receive_until(lambda m: isinstance(m, EgressCounts))
    assert message.counts == (_count(5, 500),)


# --- the supervisor: status shows the totals ---------------------------------------------------


def test_status_shows_each_services_totals_per_action(
    hub: tuple[str, str, zmq.Context[Any]],  # noqa: F811
) -> None:
    from metaleg.state_changes import ChangePublisher
    from tests.test_supervisor import STATE

    run_dir, _, context = hub
    watcher, firewall = Peer(context, run_dir, "watcher"), Peer(context, run_dir, "firewall")
    try:
        watcher.send(ChangePublisher().frame(STATE))
        reject = ("mail", "relay", Family.IPV6, Action.REJECT)
        firewall.send(EgressCounts("firewall", (_count(10, 1000), _count(2, 160, reject))))
        firewall.send(EgressCounts("firewall", (_count(4, 400), _count(3, 240, reject))))

        def relay() -> dict[str, Any]:
            """The Service's status ({} until the supervisor has taken the watcher's state:
            the two peers' frames may arrive in either order)."""
            report = _status(context, run_dir)
            return next((s for s in report["services"] if s["name"] == "relay"), {})

        from tests.lab.traffic import wait_until

        wait_until(
            lambda: relay().get("egress_packets", {}).get("reject") == 3,
            timeout=10,
            message="counts",
        )
        # 10, then a reset to 4: 14 in all; the reject counter grew by 1.
        assert relay()["egress_packets"] == {"reject": 3, "snat": 14}
        assert relay()["egress_bytes"] == {"reject": 240, "snat": 1400}
    finally:
        watcher.close()
        firewall.close()


def _audit_metric(metrics_dir: str, name: str) -> float:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return sum(
        sample.value
        for family in registry.collect()
        if family.name == name
        for sample in family.samples
        if sample.name == f"{name}_total" and sample.labels.get("process") == "audit"
    )


@pytest.mark.parametrize("hub", [{"audit_log": True}], indirect=True)
def test_the_supervisor_exports_what_the_audit_process_counted(
    hub: tuple[str, str, zmq.Context[Any]],  # noqa: F811
) -> None:
    """The audit process loads no prometheus-client: it reports its counts, and the
    supervisor's counters grow by what they grew, across a restart of the audit process."""
    run_dir, metrics_dir, context = hub
    audit = Peer(context, run_dir, "audit")
    try:
        audit.send(AuditCounts(5, 2, 1, 0))
        audit.send(AuditCounts(7, 2, 1, 1))
        audit.send(AuditCounts(3, 0, 0, 0))  # restarted: counting from 0 again
        wait_until(
            lambda: _audit_metric(metrics_dir, "metaleg_audit_lines") == 10,
            timeout=10,
            message="audit lines counted by the supervisor",
        )
        assert _audit_metric(metrics_dir, "metaleg_audit_lines_dropped") == 2
        assert _audit_metric(metrics_dir, "metaleg_audit_events_lost") == 1
        assert _audit_metric(metrics_dir, "metaleg_ipc_messages_dropped") == 1
    finally:
        audit.close()
