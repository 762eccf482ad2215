"""The netlink routing backend: pure planning, and the real kernel inside network namespaces.

Kernel tests build a namespace with a veth pair whose addresses make the test
next hops (192.0.2.2-.4, 2001:db8::2-4) on-link, and a default route in
``main`` via 192.0.2.254 / 2001:db8::fe: the path a marked packet would leak
through without the catch-all. The backend runs in a forked child inside the
namespace; the parent checks the result with ``ip -j``.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from metaleg.backend import BackendError
from metaleg.model import Family, GatewayRoute, NodeDesiredState
from metaleg.routing.backend import NetlinkRoutingBackend
from metaleg.routing.plan import (
    CATCHALL_PRIORITY,
    FR_ACT_TO_TBL,
    FR_ACT_UNREACHABLE,
    RULE_PRIORITY,
    KernelRoute,
    KernelRule,
    RouteSpec,
    RuleSpec,
    catchall_rules,
    desired_routing,
    owned_tables,
    owns_rule,
    plan_apply,
    plan_resync,
    table_range,
)
from tests.netns import namespace, run_in_netns, sh
from tests.packet_harness import onlink_test_prefixes
from tests.packet_harness import route as add_route

OFFSET = 100000
MASK = 0x00F00000
V4, V6 = Family.IPV4, Family.IPV6


def gateway(node: str, slot: int, ipv4: str | None = None, ipv6: str | None = None) -> GatewayRoute:
    return GatewayRoute(
        node=node,
        slot=slot,
        fwmark=slot << 20,
        table=OFFSET + slot,
        next_hop_ipv4=ipv4,
        next_hop_ipv6=ipv6,
    )


B = gateway("node-b", 1, "192.0.2.2", "2001:db8::2")
C = gateway("node-c", 2, "192.0.2.3", "2001:db8::3")
C_V4_ONLY = gateway("node-c", 2, "192.0.2.3")


def state(*routes: GatewayRoute, fwmask: int = MASK) -> NodeDesiredState:
    return NodeDesiredState(
        node="node-a",
        fwmask=fwmask,
        exclude_dst_ipv4=("10.0.0.0/8",),
        exclude_dst_ipv6=("fc00::/7",),
        routes=routes,
    )


def mark_rule(family: Family, route: GatewayRoute) -> RuleSpec:
    return RuleSpec(family, RULE_PRIORITY, route.fwmark, MASK, route.table, FR_ACT_TO_TBL, False)


# ---------------------------------------------------------------------------
# Pure tests
# ---------------------------------------------------------------------------


def test_desired_dual_stack_and_ipv4_only() -> None:
    desired = desired_routing(state(B, C_V4_ONLY), OFFSET, MASK)
    assert desired.problems == ()
    assert desired.rules == {
        mark_rule(V4, B),
        mark_rule(V6, B),
        mark_rule(V4, C_V4_ONLY),
        RuleSpec(V4, CATCHALL_PRIORITY, 0, MASK, 0, FR_ACT_UNREACHABLE, True),
        RuleSpec(V6, CATCHALL_PRIORITY, 0, MASK, 0, FR_ACT_UNREACHABLE, True),
    }
    assert desired.routes == {
        RouteSpec(V4, 100001, "192.0.2.2"),
        RouteSpec(V6, 100001, "2001:db8::2"),
        RouteSpec(V4, 100002, "192.0.2.3"),
    }
    assert desired.nodes == {100001: "node-b", 100002: "node-c"}


def test_desired_empty_state_is_only_the_catchalls() -> None:
    desired = desired_routing(state(), OFFSET, MASK)
    assert desired.rules == catchall_rules(MASK)
    assert desired.routes == frozenset()
    assert [rule.describe() for rule in sorted(desired.rules)] == [
        "ipv4 rule 31001: not fwmark 0x0/0xf00000 unreachable",
        "ipv6 rule 31001: not fwmark 0x0/0xf00000 unreachable",
    ]


def test_desired_canonicalises_next_hops_and_drops_disabled_families() -> None:
    route = gateway("node-b", 1, "192.0.2.2", "2001:DB8:0::2")
    desired = desired_routing(state(route), OFFSET, MASK, families=(V4,))
    assert desired.routes == {RouteSpec(V4, 100001, "192.0.2.2")}
    assert all(rule.family == V4 for rule in desired.rules)
    assert desired_routing(state(route), OFFSET, MASK).routes >= {
        RouteSpec(V6, 100001, "2001:db8::2")
    }


def test_desired_reports_and_skips_unsafe_routes() -> None:
    outside = GatewayRoute("node-x", 16, 16 << 20, OFFSET + 16, "192.0.2.9", None)
    foreign_mark = GatewayRoute("node-y", 3, 0x1, OFFSET + 3, "192.0.2.9", None)
    same_table = GatewayRoute("node-z", 1, 5 << 20, OFFSET + 1, "192.0.2.9", None)
    wrong_family = gateway("node-w", 4, "2001:db8::4", "192.0.2.4")
    desired = desired_routing(
        state(B, outside, foreign_mark, same_table, wrong_family), OFFSET, MASK
    )
    assert {route.gateway for route in desired.routes} == {"192.0.2.2", "2001:db8::2"}
    assert desired.rules == {mark_rule(V4, B), mark_rule(V6, B)} | catchall_rules(MASK)
    text = "\n".join(desired.problems)
    assert len(desired.problems) == 5
    assert "node node-x: table 100016" in text and "100001..100015" in text
    assert "node node-y" in text and "outside FIREWALL_MASK" in text
    assert "node node-z" in text and "already used by node node-b" in text
    assert "node node-w" in text and "'2001:db8::4' is not an IPv4" in text
    assert "'192.0.2.4' is not an IPv6" in text


def test_tables_and_ownership() -> None:
    assert table_range(OFFSET, MASK) == range(100001, 100016)
    # The Go original used offset + slot - 1: table `offset` is a leftover of it.
    assert owned_tables(OFFSET, MASK) == range(100000, 100016)
    assert owned_tables(255, MASK) == range(256, 271)  # never the local table
    go_rule = KernelRule(RuleSpec(V4, 32765, 1 << 20, MASK, 100000, FR_ACT_TO_TBL, False))
    other = KernelRule(RuleSpec(V4, 32765, 1, 0xFF, 200, FR_ACT_TO_TBL, False))
    at_our_priority = KernelRule(RuleSpec(V4, RULE_PRIORITY, 1, 0xFF, 200, FR_ACT_TO_TBL, False))
    tables = owned_tables(OFFSET, MASK)
    assert owns_rule(go_rule, tables)
    assert not owns_rule(other, tables)
    assert owns_rule(at_our_priority, tables)


def test_constructor_rejects_reserved_tables_and_empty_mask() -> None:
    with pytest.raises(ValueError, match="reserved"):
        NetlinkRoutingBackend(250, MASK)
    with pytest.raises(ValueError, match="no mark"):
        NetlinkRoutingBackend(OFFSET, 0)


def test_plan_apply_identical_state_is_empty() -> None:
    desired = desired_routing(state(B, C), OFFSET, MASK)
    assert not plan_apply(desired.rules, desired.routes, desired)


def test_plan_apply_first_time_adds_catchalls_first() -> None:
    desired = desired_routing(state(B), OFFSET, MASK)
    plan = plan_apply((), (), desired)
    assert [rule.is_catchall for rule in plan.add_rules] == [True, True, False, False]
    assert set(plan.add_routes) == desired.routes
    assert plan.delete_rules == () and plan.delete_routes == ()


def test_plan_apply_gateway_moved() -> None:
    before = desired_routing(state(B), OFFSET, MASK)
    after = desired_routing(state(C), OFFSET, MASK)
    plan = plan_apply(before.rules, before.routes, after)
    assert set(plan.add_rules) == {mark_rule(V4, C), mark_rule(V6, C)}
    assert set(plan.add_routes) == {
        RouteSpec(V4, 100002, "192.0.2.3"),
        RouteSpec(V6, 100002, "2001:db8::3"),
    }
    assert {rule.spec for rule in plan.delete_rules} == {mark_rule(V4, B), mark_rule(V6, B)}
    assert {route.spec() for route in plan.delete_routes} == {
        RouteSpec(V4, 100001, "192.0.2.2"),
        RouteSpec(V6, 100001, "2001:db8::2"),
    }


def test_plan_apply_next_hop_changed_touches_only_the_route() -> None:
    before = desired_routing(state(B), OFFSET, MASK)
    moved = gateway("node-b", 1, "192.0.2.4", "2001:db8::2")
    plan = plan_apply(before.rules, before.routes, desired_routing(state(moved), OFFSET, MASK))
    assert plan.add_rules == () and plan.delete_rules == ()
    assert plan.add_routes == (RouteSpec(V4, 100001, "192.0.2.4"),)
    assert [route.spec() for route in plan.delete_routes] == [RouteSpec(V4, 100001, "192.0.2.2")]


def test_plan_resync_keeps_desired_and_deletes_the_rest() -> None:
    desired = desired_routing(state(B), OFFSET, MASK)
    missing = RuleSpec(V4, CATCHALL_PRIORITY, 0, MASK, 0, FR_ACT_UNREACHABLE, True)
    present = [KernelRule(spec) for spec in sorted(desired.rules - {missing})]
    duplicate = KernelRule(mark_rule(V4, B))
    with_selector = KernelRule(mark_rule(V4, B), (("src", "10.0.0.0"), ("src_len", 8)))
    stale = KernelRule(mark_rule(V4, C))
    route_ok = KernelRoute(V4, 100001, None, 0, "192.0.2.2")
    route_v6_ok = KernelRoute(V6, 100001, None, 0, "2001:db8::2", priority=1024)
    route_v6_metric = KernelRoute(V6, 100001, None, 0, "2001:db8::2", priority=77)
    route_extra = KernelRoute(V4, 100001, "10.1.0.0", 16, "192.0.2.2")
    route_stale = KernelRoute(V4, 100003, None, 0, "192.0.2.9")
    plan = plan_resync(
        [*present, duplicate, with_selector, stale],
        [route_ok, route_v6_metric, route_extra, route_stale],
        desired,
    )
    assert plan.add_rules == (missing,)
    assert plan.add_routes == (RouteSpec(V6, 100001, "2001:db8::2"),)
    assert plan.delete_rules == (duplicate, with_selector, stale)
    assert plan.delete_routes == (route_v6_metric, route_extra, route_stale)
    # Everything in place (the IPv6 route at the kernel's default metric): nothing to do.
    assert not plan_resync([*present, KernelRule(missing)], [route_ok, route_v6_ok], desired)


def test_kernel_route_shape() -> None:
    assert KernelRoute(V4, 1, None, 0, "192.0.2.2", priority=0).spec() == RouteSpec(
        V4, 1, "192.0.2.2"
    )
    assert KernelRoute(V4, 1, None, 0, "192.0.2.2", priority=5).spec() is None
    assert KernelRoute(V4, 1, None, 0, None, type=7).spec() is None
    assert KernelRoute(V6, 1, None, 0, "2001:db8::2", multipath=True).spec() is None
    assert (
        KernelRoute(V4, 1, "10.0.0.0", 8, "192.0.2.2", priority=5).describe()
        == "ipv4 route table 1: 10.0.0.0/8 via 192.0.2.2 metric 5"
    )


def test_fwmask_mismatch_is_an_error() -> None:
    backend = NetlinkRoutingBackend(OFFSET, MASK)
    with pytest.raises(BackendError, match="0xf000"):
        backend.apply(state(fwmask=0xF000))
    backend.close()


# ---------------------------------------------------------------------------
# Kernel tests
# ---------------------------------------------------------------------------


def make_links(ns: str) -> None:
    """veth v0/v1 with on-link test prefixes, and a default route in main (the leak path)."""
    onlink_test_prefixes(ns)
    add_route(ns, "default", "192.0.2.254")
    add_route(ns, "default", "2001:db8::fe")


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-j", *args], capture_output=True, text=True, timeout=10
    )
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []


def rules(ns: str, family: Family) -> list[str]:
    """The namespace's rules other than the kernel's defaults, in ``ip rule`` words."""
    texts = []
    for rule in ip_json(ns, "-6" if family == V6 else "-4", "rule"):
        if rule.get("table") in ("local", "main", "default") and "fwmark" not in rule:
            continue
        words = [str(rule["priority"])]
        if "not" in rule:
            words.append("not")
        if rule.get("src", "all") != "all":
            words.append(f"from {rule['src']}/{rule.get('srclen')}")
        if "fwmark" in rule:
            mask = f"/{rule['fwmask']}" if "fwmask" in rule else ""  # omitted for 0xffffffff
            words.append(f"fwmark {rule['fwmark']}{mask}")
        words.append(f"lookup {rule['table']}" if "table" in rule else rule.get("action", "?"))
        texts.append(" ".join(words))
    return sorted(texts)


def table(ns: str, family: Family, number: int) -> list[str]:
    """``dst via gateway`` of every route in a table (empty when the table does not exist)."""
    routes = ip_json(ns, "-6" if family == V6 else "-4", "route", "show", "table", str(number))
    return sorted(f"{route['dst']} via {route.get('gateway', '-')}" for route in routes)


def route_get(ns: str, family: Family, mark: int) -> str:
    """Where a packet with ``mark`` to an internet address goes: its gateway, or the error."""
    dst = "2001:db8:ffff::1" if family == V6 else "203.0.113.1"
    result = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-j", "route", "get", dst, "mark", hex(mark)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if result.returncode != 0:
        return result.stderr.strip()
    return f"via {json.loads(result.stdout)[0].get('gateway')}"


CATCHALL = "31001 not fwmark 0/0xf00000 unreachable"
RULE_B = "31000 fwmark 0x100000/0xf00000 lookup 100001"
RULE_C = "31000 fwmark 0x200000/0xf00000 lookup 100002"


class Recorder:
    """Stands in for the backend's IPRoute and records every change request, in order."""

    def __init__(self, ipr: Any) -> None:
        self.ipr = ipr
        self.calls: list[tuple[str, str, int, int | None]] = []

    def _record(self, kind: str, command: str, arguments: dict[str, Any]) -> None:
        if command != "dump":
            table = arguments.get("table")
            self.calls.append((kind, command, int(arguments["family"]), table))

    def rule(self, command: str, **arguments: Any) -> Any:
        self._record("rule", command, arguments)
        return self.ipr.rule(command, **arguments)

    def route(self, command: str, **arguments: Any) -> Any:
        self._record("route", command, arguments)
        return self.ipr.route(command, **arguments)

    def close(self) -> None:
        self.ipr.close()


def apply_then_record(first: NodeDesiredState, second: NodeDesiredState) -> list[Any]:
    """In the namespace: apply ``first``, then ``second``; the netlink changes of the second."""
    backend = NetlinkRoutingBackend(OFFSET, MASK)
    try:
        backend.apply(first)
        recorder = Recorder(backend._socket())
        backend._ipr = recorder
        backend.apply(second)
        return recorder.calls
    finally:
        backend.close()


def apply_states(*states: NodeDesiredState) -> str | None:
    """In the namespace: apply each state in turn; the last BackendError's message, if any."""
    backend = NetlinkRoutingBackend(OFFSET, MASK)
    error = None
    try:
        for desired in states:
            try:
                backend.apply(desired)
                error = None
            except BackendError as raised:
                error = str(raised)
        return error
    finally:
        backend.close()


def resync(desired: NodeDesiredState) -> list[Any]:
    """In the namespace: a fresh backend resyncs; then an apply of the same state must be a no-op."""
    backend = NetlinkRoutingBackend(OFFSET, MASK)
    try:
        backend.resync(desired)
        recorder = Recorder(backend._socket())
        backend._ipr = recorder
        backend.apply(desired)
        return recorder.calls
    finally:
        backend.close()


def cleanup_twice() -> None:
    backend = NetlinkRoutingBackend(OFFSET, MASK)
    try:
        backend.cleanup()
        backend.cleanup()
    finally:
        backend.close()


@pytest.fixture
def ns() -> Any:
    with namespace("mlrt") as name:
        make_links(name)
        yield name


@pytest.mark.netns
def test_dual_stack_apply_with_an_ipv4_only_gateway(ns: str) -> None:
    assert run_in_netns(ns, apply_states, state(B, C_V4_ONLY)) is None
    assert rules(ns, V4) == [RULE_B, RULE_C, CATCHALL]
    assert rules(ns, V6) == [RULE_B, CATCHALL]  # node-c has no IPv6 next hop: no v6 rule
    assert table(ns, V4, 100001) == ["default via 192.0.2.2"]
    assert table(ns, V6, 100001) == ["default via 2001:db8::2"]
    assert table(ns, V4, 100002) == ["default via 192.0.2.3"]
    assert table(ns, V6, 100002) == []


@pytest.mark.netns
def test_empty_state_installs_the_catchalls(ns: str) -> None:
    assert run_in_netns(ns, apply_states, state()) is None
    assert rules(ns, V4) == [CATCHALL]
    assert rules(ns, V6) == [CATCHALL]


@pytest.mark.netns
def test_apply_twice_is_a_noop(ns: str) -> None:
    assert run_in_netns(ns, apply_then_record, state(B, C), state(B, C)) == []
    assert rules(ns, V4) == [RULE_B, RULE_C, CATCHALL]


@pytest.mark.netns
def test_gateway_moved_adds_before_it_deletes(ns: str) -> None:
    calls = run_in_netns(ns, apply_then_record, state(B), state(C))
    commands = [command for _, command, _, _ in calls]
    assert sorted(commands) == ["add", "add", "del", "del", "del", "del", "replace", "replace"]
    last_add = max(i for i, command in enumerate(commands) if command in ("add", "replace"))
    first_delete = commands.index("del")
    assert last_add < first_delete, calls
    assert {table for _, command, _, table in calls if command == "del"} == {100001}
    assert rules(ns, V4) == [RULE_C, CATCHALL]
    assert rules(ns, V6) == [RULE_C, CATCHALL]
    assert table(ns, V4, 100001) == [] and table(ns, V6, 100001) == []
    assert table(ns, V4, 100002) == ["default via 192.0.2.3"]
    assert table(ns, V6, 100002) == ["default via 2001:db8::3"]


@pytest.mark.netns
def test_next_hop_changed_replaces_the_route_in_place(ns: str) -> None:
    moved = gateway("node-b", 1, "192.0.2.4", "2001:db8::4")
    calls = run_in_netns(ns, apply_then_record, state(B), state(moved))
    assert [call[:2] for call in calls[:2]] == [("route", "replace"), ("route", "replace")]
    assert all(call[0] == "route" for call in calls)  # the rules stay as they are
    assert rules(ns, V4) == [RULE_B, CATCHALL]
    assert table(ns, V4, 100001) == ["default via 192.0.2.4"]
    assert table(ns, V6, 100001) == ["default via 2001:db8::4"]


@pytest.mark.netns
def test_gateway_removed_keeps_the_catchall(ns: str) -> None:
    assert run_in_netns(ns, apply_states, state(B), state()) is None
    assert rules(ns, V4) == [CATCHALL]
    assert rules(ns, V6) == [CATCHALL]
    assert table(ns, V4, 100001) == [] and table(ns, V6, 100001) == []


@pytest.mark.netns
def test_refused_next_hop_is_reported_and_fails_closed(ns: str) -> None:
    off_link = gateway("node-c", 2, "198.51.100.7", "2001:db8:ffff::7")
    error = run_in_netns(ns, apply_states, state(B, C), state(B, off_link))
    assert error is not None
    assert "node node-c: cannot add ipv4 route table 100002: default via 198.51.100.7" in error
    assert "node node-c: cannot add ipv6 route table 100002: default via 2001:db8:ffff::7" in error
    assert "Network is unreachable" in error
    # Everything else was applied, and node-c's old next hop is gone: fail closed.
    assert table(ns, V4, 100001) == ["default via 192.0.2.2"]
    assert table(ns, V4, 100002) == [] and table(ns, V6, 100002) == []
    assert rules(ns, V4) == [RULE_B, RULE_C, CATCHALL]
    for family in (V4, V6):
        assert route_get(ns, family, 0x200000).endswith("unreachable"), family
    assert route_get(ns, V4, 0x100000) == "via 192.0.2.2"
    assert route_get(ns, V6, 0x100000) == "via 2001:db8::2"


@pytest.mark.netns
def test_fail_closed_in_the_kernel(ns: str) -> None:
    # Without metaleg a marked packet follows main: this is the leak the catch-all closes.
    assert route_get(ns, V4, 0x100000) == "via 192.0.2.254"
    assert route_get(ns, V6, 0x100000) == "via 2001:db8::fe"
    assert run_in_netns(ns, apply_states, state(B)) is None
    assert route_get(ns, V4, 0x100000) == "via 192.0.2.2"
    assert route_get(ns, V6, 0x100000) == "via 2001:db8::2"
    assert route_get(ns, V4, 0x200000) == "RTNETLINK answers: Network is unreachable"
    assert route_get(ns, V6, 0x200000) == "RTNETLINK answers: Network is unreachable"
    assert route_get(ns, V4, 0) == "via 192.0.2.254"  # unmarked traffic is untouched
    assert route_get(ns, V6, 0x1) == "via 2001:db8::fe"  # a mark outside the mask too
    # The table disappears behind metaleg's back: its marked packets are dropped, not leaked.
    sh("ip", "route", "flush", "table", "100001", netns=ns)
    sh("ip", "-6", "route", "flush", "table", "100001", netns=ns)
    assert route_get(ns, V4, 0x100000) == "RTNETLINK answers: Network is unreachable"
    assert route_get(ns, V6, 0x100000) == "RTNETLINK answers: Network is unreachable"


@pytest.mark.netns
def test_resync_repairs_and_collects_garbage(ns: str) -> None:
    assert run_in_netns(ns, apply_states, state(B, C)) is None

    def ip(command: str) -> None:
        sh("ip", *command.split(), netns=ns)

    ip("rule del pref 31000 fwmark 0x200000/0xf00000 lookup 100002")
    ip("-6 rule del pref 31001")
    ip("rule add pref 31000 fwmark 0x300000/0xf00000 lookup 100003")
    ip("rule add pref 31000 from 10.0.0.0/8 fwmark 0x100000/0xf00000 lookup 100001")
    ip("route add default via 192.0.2.9 table 100003")
    ip("route add 10.1.0.0/16 via 192.0.2.2 table 100001")
    ip("-6 route replace default via 2001:db8::9 table 100002")
    # Leftovers of the Go original: a rule added without a priority, its table `offset`.
    ip("rule add fwmark 0x100000/0xf00000 lookup 100000")
    ip("route add default via 192.0.2.8 table 100000")
    # Not metaleg's: must survive.
    ip("rule add pref 30000 fwmark 0x1 lookup 200")
    ip("route add default via 192.0.2.7 table 200")
    assert "30999 fwmark 0x100000/0xf00000 lookup 100000" in rules(ns, V4)  # before ours!

    assert run_in_netns(ns, resync, state(B, C)) == []  # and then apply has nothing to do
    assert rules(ns, V4) == ["30000 fwmark 0x1 lookup 200", RULE_B, RULE_C, CATCHALL]
    assert rules(ns, V6) == [RULE_B, RULE_C, CATCHALL]
    assert table(ns, V4, 100001) == ["default via 192.0.2.2"]
    assert table(ns, V6, 100002) == ["default via 2001:db8::3"]
    assert table(ns, V4, 100003) == [] and table(ns, V4, 100000) == []
    assert table(ns, V4, 200) == ["default via 192.0.2.7"]


@pytest.mark.netns
def test_cleanup_removes_everything_and_is_idempotent(ns: str) -> None:
    assert run_in_netns(ns, apply_states, state(B, C)) is None
    command = "ip -6 route add 2001:db8:5::/48 via 2001:db8::5 table 100015"
    sh(*command.split(), netns=ns)
    sh("ip", "rule", "add", "pref", "30000", "fwmark", "0x1", "lookup", "200", netns=ns)
    run_in_netns(ns, cleanup_twice)  # a fresh process: no earlier apply
    assert rules(ns, V4) == ["30000 fwmark 0x1 lookup 200"]
    assert rules(ns, V6) == []
    for number in (100001, 100002, 100015):
        assert table(ns, V4, number) == [] and table(ns, V6, number) == []
    assert route_get(ns, V4, 0x100000) == "via 192.0.2.254"  # back to how it was
