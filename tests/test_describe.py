"""The one rendering of a Service's egress for humans (``metaleg.model.describe_egress``) and
its three readers: the status ``DETAIL`` column, the watcher's log line and the Events."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from metaleg.config import Config
from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    NodeDesiredState,
    Role,
    ServiceEgress,
    describe_egress,
)
from metaleg.supervisor.status import service_statuses
from metaleg.watcher.events import ServiceEvent, describe_change
from metaleg.watcher.main import Watcher
from metaleg.watcher.tracker import TrackerResult

LB4, LB6 = "198.51.100.200", "2001:db8:100::200"
NO_GATEWAY = "no ServiceL2Status names a known gateway node"


def service(role: Role, *families: FamilyEgress, gateway: str | None = "node-b") -> ServiceEgress:
    return ServiceEgress("mail", "relay", role, gateway, (LB4, LB6), families)


def snat(family: Family, *sources: str) -> FamilyEgress:
    return FamilyEgress(family, Action.SNAT, sources, snat_ip=LB4 if family == 4 else LB6)


def mark(family: Family, *sources: str) -> FamilyEgress:
    return FamilyEgress(family, Action.MARK, sources, fwmark=0x100000)


def reject(family: Family, *sources: str, reason: str = NO_GATEWAY) -> FamilyEgress:
    return FamilyEgress(family, Action.REJECT, sources, reason=reason)


GATEWAY = service(
    Role.GATEWAY, snat(Family.IPV4, "10.0.0.1", "10.0.0.2"), snat(Family.IPV6, "fd00::1")
)
FORWARDER = service(Role.FORWARDER, mark(Family.IPV4, "10.0.0.1"), mark(Family.IPV6, "fd00::1"))
REJECTED = service(
    Role.REJECT, reject(Family.IPV4, "10.0.0.1"), reject(Family.IPV6, "fd00::1"), gateway=None
)
HALF = service(
    Role.FORWARDER,
    mark(Family.IPV4, "10.0.0.1"),
    reject(Family.IPV6, "fd00::1", reason="no IPv6 LoadBalancer IP"),
)
NOTHING = service(Role.NONE, gateway=None)


def test_each_action_in_words_with_counts_and_mark() -> None:
    assert describe_egress(GATEWAY) == (
        f"IPv4: egress here as {LB4} (2 sources); IPv6: egress here as {LB6} (1 source)"
    )
    assert describe_egress(FORWARDER) == (
        f"IPv4: egress via node-b as {LB4} (mark 0x100000, 1 source); "
        f"IPv6: egress via node-b as {LB6} (mark 0x100000, 1 source)"
    )
    assert describe_egress(HALF) == (
        f"IPv4: egress via node-b as {LB4} (mark 0x100000, 1 source); "
        "IPv6: egress rejected: no IPv6 LoadBalancer IP (1 source)"
    )
    assert describe_egress(NOTHING) == "no endpoints on this node"


def test_families_that_read_the_same_are_named_together() -> None:
    assert describe_egress(REJECTED) == f"IPv4 and IPv6: egress rejected: {NO_GATEWAY} (1 source)"


def test_brief_leaves_out_counts_and_mark() -> None:
    assert describe_egress(GATEWAY, brief=True) == (
        f"IPv4: egress here as {LB4}; IPv6: egress here as {LB6}"
    )
    assert describe_egress(FORWARDER, brief=True) == (
        f"IPv4: egress via node-b as {LB4}; IPv6: egress via node-b as {LB6}"
    )
    assert describe_egress(REJECTED, brief=True) == f"IPv4 and IPv6: egress rejected: {NO_GATEWAY}"


def test_a_forwarded_family_without_a_loadbalancer_ip_names_only_the_gateway() -> None:
    only_v4 = ServiceEgress(
        "mail", "relay", Role.FORWARDER, "node-b", (LB4,), (mark(Family.IPV6, "fd00::1"),)
    )
    assert describe_egress(only_v4, brief=True) == "IPv6: egress via node-b"


def test_events_carry_the_brief_description() -> None:
    events = {
        name: describe_change("node-a", value, "mail/relay")
        for name, value in [
            ("gateway", GATEWAY),
            ("forwarder", FORWARDER),
            ("rejected", REJECTED),
            ("half", HALF),
        ]
    }
    assert {name: (e.reason, e.warning) for name, e in events.items() if e} == {
        "gateway": ("EgressGateway", False),
        "forwarder": ("EgressForwarding", False),
        "rejected": ("EgressRejected", True),
        "half": ("EgressForwarding", True),
    }
    for name, value in [("gateway", GATEWAY), ("forwarder", FORWARDER), ("half", HALF)]:
        event = events[name]
        assert event is not None and (event.namespace, event.name) == ("mail", "relay")
        assert event.message == f"node-a: {describe_egress(value, brief=True)}"
    assert describe_change("node-a", NOTHING, "mail/relay") is None
    removed = describe_change("node-a", None, "mail/relay")
    assert removed is not None and removed.message == "node-a: egress rules removed"


def test_status_detail_is_the_full_description() -> None:
    state = NodeDesiredState("node-a", 0xF00000, (), (), services=(FORWARDER, NOTHING))
    statuses = service_statuses(state)
    assert [s.detail for s in statuses] == [
        describe_egress(FORWARDER),
        "no endpoints on this node",
    ]
    assert [s.source_ips for s in statuses] == [2, 0]


class _Poster:
    def __init__(self) -> None:
        self.posted: list[ServiceEvent] = []

    def post(self, event: ServiceEvent) -> None:
        self.posted.append(event)


def test_the_watcher_logs_the_full_description_and_posts_the_brief_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = Watcher(Config(node_name="node-a", run_dir=str(tmp_path)))
    poster = _Poster()
    watcher.events = poster  # type: ignore[assignment]
    before = NodeDesiredState("node-a", 0xF00000, (), (), services=(GATEWAY,))
    watcher.published = before
    after = NodeDesiredState("node-a", 0xF00000, (), (), services=(FORWARDER,))
    with caplog.at_level(logging.INFO, logger="metaleg.watcher.main"):
        watcher.log_decisions(TrackerResult(after, {}, (), ("mail/relay",)))
    assert [r.getMessage() for r in caplog.records] == [
        f"service egress forwarder: {describe_egress(FORWARDER)}"
    ]
    assert [(e.reason, e.message) for e in poster.posted] == [
        ("EgressForwarding", f"node-a: {describe_egress(FORWARDER, brief=True)}")
    ]
