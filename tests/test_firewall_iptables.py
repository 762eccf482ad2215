"""The iptables firewall backend: pure rendering/planning, and the real kernel in namespaces.

Pure tests check what :func:`render` and :func:`plan_sets` produce and, with
fake helpers, the make-before-break order of one change. Kernel tests run the
backend in a forked child inside a fresh network namespace (its xtables helper
processes inherit the namespace) and inspect the result from inside with
``iptables-legacy-save``, ``ip6tables-legacy-save`` and ``ipset save``. The
packet test wires pod, node and server namespaces with veth pairs and pings.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import time
from typing import Any

import msgspec
import pytest

from metaleg.backend import Backend, BackendError
from metaleg.firewall.iptables.backend import (
    IptablesBackend,
    changed_tables,
    without_departing_stale_bindings,
)
from metaleg.firewall.iptables.helper import XtablesServer
from metaleg.firewall.iptables.ipsets import HASH_IP, HASH_NET, SetPlan, SetSpec, plan_sets
from metaleg.firewall.iptables.protocol import (
    Mode,
    ReceivedRequest,
    SyncReply,
    SyncRequest,
    TableResult,
)
from metaleg.firewall.iptables.render import DesiredFirewall, exclude_networks, net_members, render
from metaleg.firewall.iptables.rules import (
    Rule,
    TableSpec,
    jump_rule,
    mark_skip_rule,
    rejected_set_name,
    snat_rule,
    source_return_rule,
    source_set_name,
    transit_set_name,
)
from metaleg.model import Action, Family, FamilyEgress, NodeDesiredState, Role, ServiceEgress
from tests.netns import namespace, run_in_netns, sh
from tests.packet_harness import TCP_CLIENT as TCP_CLIENT
from tests.packet_harness import TCP_LISTENER as TCP_LISTENER
from tests.packet_harness import (
    forward,
    link,
    masquerade,
    ping_from,
    route,
    route_marked,
    script_in,
    tcp_connect,
    wait_listening,
)
from tests.processes import process_alive
from tests.waiting import wait_until

MASK = 0xF00000
MARK1 = 0x100000
MARK2 = 0x200000


# --------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------


def service(namespace_: str, name: str, *entries: FamilyEgress) -> ServiceEgress:
    return ServiceEgress(
        namespace=namespace_,
        name=name,
        role=Role.GATEWAY,
        gateway_node=None,
        lb_ips=(),
        families=entries,
    )


def snat(family: Family, ips: tuple[str, ...], snat_ip: str) -> FamilyEgress:
    return FamilyEgress(family=family, action=Action.SNAT, source_ips=ips, snat_ip=snat_ip)


def mark(family: Family, ips: tuple[str, ...], fwmark: int = MARK1) -> FamilyEgress:
    return FamilyEgress(family=family, action=Action.MARK, source_ips=ips, fwmark=fwmark)


def reject(family: Family, ips: tuple[str, ...]) -> FamilyEgress:
    return FamilyEgress(
        family=family, action=Action.REJECT, source_ips=ips, reason="gateway unknown"
    )


def node_state(
    *services: ServiceEgress,
    exclude4: tuple[str, ...] = ("10.96.0.0/12", "192.168.0.0/16"),
    exclude6: tuple[str, ...] = ("fc00::/7",),
    fwmask: int = MASK,
    transit4: tuple[str, ...] = (),
    transit6: tuple[str, ...] = (),
) -> NodeDesiredState:
    return NodeDesiredState(
        node="node-1",
        fwmask=fwmask,
        exclude_dst_ipv4=exclude4,
        exclude_dst_ipv6=exclude6,
        services=tuple(sorted(services, key=lambda s: (s.namespace, s.name))),
        transit_guard_ipv4=transit4,
        transit_guard_ipv6=transit6,
    )


MAIL = service(
    "default",
    "mail",
    snat(Family.IPV4, ("10.244.1.5",), "192.0.2.10"),
    snat(Family.IPV6, ("fd00:244::5",), "2001:db8::10"),
)
WEB = service(
    "default",
    "web",
    mark(Family.IPV4, ("10.244.1.6", "10.244.1.7")),
    mark(Family.IPV6, ("fd00:244::6",)),
)
LOST = service(
    "shop",
    "lost",
    reject(Family.IPV4, ("10.244.1.8",)),
    reject(Family.IPV6, ("fd00:244::8",)),
)
DUAL_STACK = node_state(MAIL, WEB, LOST)

S4 = {svc.name: source_set_name(Family.IPV4, svc.namespace, svc.name) for svc in (MAIL, WEB, LOST)}
S6 = {svc.name: source_set_name(Family.IPV6, svc.namespace, svc.name) for svc in (MAIL, WEB, LOST)}


def stale_drop(set_name: str, lb_ip: str) -> str:
    """A SNAT Service's stale binding rule, as iptables-save prints it (with MASK)."""
    return (
        f"-m set --match-set {set_name} src -m mark --mark 0x0/0xf00000 -m conntrack "
        f"! --ctrepldst {lb_ip} --ctstatus CONFIRMED --ctdir ORIGINAL -j DROP"
    )


def stray(set_name: str, family: int = 4) -> str:
    """The DROP of stray replies to a Service's sources, as iptables-save prints it."""
    return (
        f"-m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m set --match-set {set_name} dst "
        "! --update-counters "
        f"-m set ! --match-set METALEG-EXCLUDE-DST-{family} src -j DROP"
    )


def reply_drop(set_name: str) -> str:
    """A SNAT Service's DROP of answers in connections opened to its pod IPs."""
    return f"-m set --match-set {set_name} src -m conntrack ! --ctstate DNAT --ctdir REPLY -j DROP"


# The Go original's layout (plus the stale binding rules), spelled out as iptables-save
# prints it: chain -> rules.
EXPECTED_V4 = {
    "mangle": {
        "PREROUTING": ["-j METALEG-RT-MARK"],
        "METALEG-RT-MARK": [
            "-m set --match-set METALEG-EXCLUDE-DST-4 dst -j RETURN",
            "-j SET --map-set METALEG-MARK-4 src --map-mark",
        ],
    },
    "nat": {
        "POSTROUTING": ["-m mark ! --mark 0x0/0xf00000 -j RETURN", "-j METALEG-SNAT"],
        "METALEG-SNAT": [
            "-m set --match-set METALEG-EXCLUDE-DST-4 dst -j RETURN",
            f"-m set --match-set {S4['mail']} src -j SNAT --to-source 192.0.2.10",
        ],
    },
    "filter": {
        "FORWARD": ["-j METALEG-REJECT"],
        "METALEG-REJECT": [
            stray("METALEG-REJECTED-4", 4),
            stray("METALEG-SNATTED-4", 4),
            stray("METALEG-MARK-4", 4),
            "-m set --match-set METALEG-EXCLUDE-DST-4 dst -j RETURN",
            "-m set --match-set METALEG-REJECTED-4 src -j REJECT --reject-with icmp-port-unreachable",
            stale_drop(S4["mail"], "192.0.2.10"),
            reply_drop("METALEG-SNATTED-4"),
        ],
    },
}
EXPECTED_V6 = {
    "mangle": {
        "PREROUTING": ["-j METALEG-RT-MARK"],
        "METALEG-RT-MARK": [
            "-m set --match-set METALEG-EXCLUDE-DST-6 dst -j RETURN",
            "-j SET --map-set METALEG-MARK-6 src --map-mark",
        ],
    },
    "nat": {
        "POSTROUTING": ["-m mark ! --mark 0x0/0xf00000 -j RETURN", "-j METALEG-SNAT"],
        "METALEG-SNAT": [
            "-m set --match-set METALEG-EXCLUDE-DST-6 dst -j RETURN",
            f"-m set --match-set {S6['mail']} src -j SNAT --to-source 2001:db8::10",
        ],
    },
    "filter": {
        "FORWARD": ["-j METALEG-REJECT"],
        "METALEG-REJECT": [
            stray("METALEG-REJECTED-6", 6),
            stray("METALEG-SNATTED-6", 6),
            stray("METALEG-MARK-6", 6),
            "-m set --match-set METALEG-EXCLUDE-DST-6 dst -j RETURN",
            "-m set --match-set METALEG-REJECTED-6 src -j REJECT --reject-with icmp6-port-unreachable",
            stale_drop(S6["mail"], "2001:db8::10"),
            reply_drop("METALEG-SNATTED-6"),
        ],
    },
}
EXPECTED_SETS = {
    "METALEG-EXCLUDE-DST-4": ("hash:net", "inet", {"10.96.0.0/12", "192.168.0.0/16"}),
    "METALEG-EXCLUDE-DST-6": ("hash:net", "inet6", {"fc00::/7"}),
    S4["mail"]: ("hash:ip", "inet", {"10.244.1.5"}),
    S6["mail"]: ("hash:ip", "inet6", {"fd00:244::5"}),
    "METALEG-SNATTED-4": ("hash:ip", "inet", {"10.244.1.5"}),
    "METALEG-SNATTED-6": ("hash:ip", "inet6", {"fd00:244::5"}),
    "METALEG-REJECTED-4": ("hash:ip", "inet", {"10.244.1.8"}),
    "METALEG-REJECTED-6": ("hash:ip", "inet6", {"fd00:244::8"}),
    "METALEG-MARK-4": (
        "hash:ip skbinfo",
        "inet",
        {"10.244.1.6 skbmark 0x100000/0xf00000", "10.244.1.7 skbmark 0x100000/0xf00000"},
    ),
    "METALEG-MARK-6": ("hash:ip skbinfo", "inet6", {"fd00:244::6 skbmark 0x100000/0xf00000"}),
}


def rules_by_chain(desired: DesiredFirewall, family: Family) -> dict[str, dict[str, list[str]]]:
    """What render() asks for, in the shape of :func:`dump_tables` (for kernel comparisons)."""
    result: dict[str, dict[str, list[str]]] = {}
    for name, spec in desired.tables[family].items():
        chains = {chain: [str(rule) for rule in rules] for chain, rules in spec.heads.items()}
        chains.update(
            {chain: [str(rule) for rule in rules] for chain, rules in spec.chains.items()}
        )
        result[name] = chains
    return result


# --------------------------------------------------------------------------
# Pure: rendering and planning
# --------------------------------------------------------------------------


def test_backend_implements_the_protocol() -> None:
    backend: Backend = IptablesBackend()  # mypy checks the structure; nothing starts yet
    assert backend.name == "iptables"
    backend.close()


def test_source_set_name_is_stable_short_and_distinct() -> None:
    name = source_set_name(Family.IPV4, "default", "mail")
    assert name == source_set_name(Family.IPV4, "default", "mail")
    assert name.startswith("METALEG-SRC-4-") and len(name) == len("METALEG-SRC-4-") + 12
    long = source_set_name(Family.IPV6, "n" * 63, "s" * 63)
    assert long.startswith("METALEG-SRC-6-") and len(long) <= 31
    names = {
        source_set_name(Family.IPV4, "default", "mail"),
        source_set_name(Family.IPV6, "default", "mail"),
        source_set_name(Family.IPV4, "default", "web"),
        source_set_name(Family.IPV4, "other", "mail"),
    }
    assert len(names) == 4


def test_render_dual_stack_layout() -> None:
    desired = render(DUAL_STACK)
    assert rules_by_chain(desired, Family.IPV4) == EXPECTED_V4
    assert rules_by_chain(desired, Family.IPV6) == EXPECTED_V6
    assert {
        name: (spec.kind, "inet" if spec.family is Family.IPV4 else "inet6", set(spec.members))
        for name, spec in desired.sets.items()
    } == EXPECTED_SETS


def test_render_without_excludes_or_sources_creates_no_sets() -> None:
    empty_sources = service("default", "idle", snat(Family.IPV4, (), "192.0.2.10"))
    v6_only = service("default", "six", reject(Family.IPV6, ("fd00::1",)))
    desired = render(node_state(empty_sources, v6_only, exclude4=(), exclude6=()))
    assert set(desired.sets) == {rejected_set_name(Family.IPV6)}
    v4 = rules_by_chain(desired, Family.IPV4)
    # Chains and jumps exist even when empty, so that later changes only edit chains.
    assert v4["nat"] == {
        "POSTROUTING": ["-m mark ! --mark 0x0/0xf00000 -j RETURN", "-j METALEG-SNAT"],
        "METALEG-SNAT": [],
    }
    assert v4["filter"]["METALEG-REJECT"] == []
    six = rejected_set_name(Family.IPV6)
    assert rules_by_chain(desired, Family.IPV6)["filter"]["METALEG-REJECT"] == [
        # Without exclusions, every stray is dropped.
        f"-m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m set --match-set {six} dst "
        "! --update-counters -j DROP",
        f"-m set --match-set {six} src -j REJECT --reject-with icmp6-port-unreachable",
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            FamilyEgress(family=Family.IPV4, action=Action.SNAT, source_ips=("10.0.0.1",)),
            "without snat_ip",
        ),
        (snat(Family.IPV4, ("10.0.0.1",), "2001:db8::1"), "is not IPv4"),
        (mark(Family.IPV4, ("10.0.0.1",), fwmark=0x1), "not a non-zero mark within 0xf00000"),
        (
            FamilyEgress(family=Family.IPV4, action=Action.MARK, source_ips=("10.0.0.1",)),
            "fwmark none",
        ),
        (reject(Family.IPV4, ("fd00::1",)), "source IP fd00::1 is not IPv4"),
        (reject(Family.IPV4, ("not-an-ip",)), "invalid source IP"),
    ],
)
def test_render_rejects_invalid_entries(entry: FamilyEgress, message: str) -> None:
    with pytest.raises(BackendError, match=message) as raised:
        render(node_state(service("ns", "bad", entry)))
    assert "service ns/bad IPv4" in str(raised.value)


def test_render_rejects_zero_mask() -> None:
    with pytest.raises(BackendError, match="firewall mask"):
        render(node_state(fwmask=0))


def test_exclude_networks_are_canonical_and_zero_prefix_is_split() -> None:
    assert exclude_networks(("10.1.2.3/8", "192.0.2.1"), Family.IPV4) == {
        "10.0.0.0/8",
        "192.0.2.1/32",
    }
    assert exclude_networks(("0.0.0.0/0",), Family.IPV4) == {"0.0.0.0/1", "128.0.0.0/1"}
    with pytest.raises(BackendError, match=r"METALEG-EXCLUDE-DST-6: 10\.0\.0\.0/8 is not an IPv6"):
        exclude_networks(("10.0.0.0/8",), Family.IPV6)


# Another SNAT Service, sorted after MAIL, to check that every SNAT set gets its exception.
RELAY = service("default", "relay", snat(Family.IPV4, ("10.244.1.20", "10.244.1.21"), "192.0.2.11"))
S4["relay"] = source_set_name(Family.IPV4, "default", "relay")
TRANSIT4 = ("10.244.2.0/24", "10.244.3.7/32")
TRANSIT6 = ("fd00:244:2::/64",)
GUARDED = node_state(MAIL, RELAY, WEB, LOST, transit4=TRANSIT4, transit6=TRANSIT6)
GUARD_V4 = [
    "-m mark ! --mark 0x0/0xf00000 -j RETURN",
    "-m set --match-set METALEG-SNATTED-4 src ! --update-counters -j RETURN",
    "-m conntrack --ctstate NEW -m set --match-set METALEG-TRANSIT-4 src "
    "-j REJECT --reject-with icmp-port-unreachable",
]
GUARD_V6 = [
    "-m mark ! --mark 0x0/0xf00000 -j RETURN",
    "-m set --match-set METALEG-SNATTED-6 src ! --update-counters -j RETURN",
    "-m conntrack --ctstate NEW -m set --match-set METALEG-TRANSIT-6 src "
    "-j REJECT --reject-with icmp6-port-unreachable",
]


def test_render_transit_guard_after_exclude_and_rejects() -> None:
    desired = render(GUARDED)
    v4 = rules_by_chain(desired, Family.IPV4)
    v6 = rules_by_chain(desired, Family.IPV6)
    # Stray DROPs, exclude RETURN, the REJECT, the SNAT Services' stale binding DROPs in
    # Service order (RELAY's after MAIL's) and their reply DROP, then the guard: marked
    # and SNATed sources pass.
    assert v4["filter"]["METALEG-REJECT"] == [
        stray("METALEG-REJECTED-4"),
        stray("METALEG-SNATTED-4"),
        stray("METALEG-MARK-4"),
        "-m set --match-set METALEG-EXCLUDE-DST-4 dst -j RETURN",
        "-m set --match-set METALEG-REJECTED-4 src -j REJECT --reject-with icmp-port-unreachable",
        stale_drop(S4["mail"], "192.0.2.10"),
        stale_drop(S4["relay"], "192.0.2.11"),
        reply_drop("METALEG-SNATTED-4"),
        *GUARD_V4,
    ]
    assert v6["filter"]["METALEG-REJECT"] == [*EXPECTED_V6["filter"]["METALEG-REJECT"], *GUARD_V6]
    assert v4["filter"]["FORWARD"] == ["-j METALEG-REJECT"]
    # The guard changes nothing in mangle and nat.
    assert v4["mangle"] == EXPECTED_V4["mangle"] and v6["nat"] == EXPECTED_V6["nat"]
    assert desired.sets["METALEG-TRANSIT-4"] == SetSpec(
        "METALEG-TRANSIT-4",
        HASH_NET,
        Family.IPV4,
        frozenset({"10.244.2.0/24", "10.244.3.7/32"}),
    )
    assert desired.sets["METALEG-TRANSIT-6"] == SetSpec(
        "METALEG-TRANSIT-6", HASH_NET, Family.IPV6, frozenset({"fd00:244:2::/64"})
    )


def test_render_transit_guard_only_for_families_with_sources() -> None:
    desired = render(node_state(transit6=("fd00:244:2::5/128",), exclude4=(), exclude6=()))
    assert set(desired.sets) == {transit_set_name(Family.IPV6)}
    assert rules_by_chain(desired, Family.IPV4)["filter"]["METALEG-REJECT"] == []
    # No exclude set and no SNAT Service: just the mark exception and the REJECT.
    assert rules_by_chain(desired, Family.IPV6)["filter"]["METALEG-REJECT"] == [
        GUARD_V6[0],
        GUARD_V6[-1],
    ]
    # Without guard sources nothing of the guard is rendered (DUAL_STACK's expectations).
    assert "METALEG-TRANSIT-4" not in render(DUAL_STACK).sets


def test_transit_members_are_canonical_and_errors_name_the_set() -> None:
    assert net_members("METALEG-TRANSIT-4", ("0.0.0.0/0", "10.1.2.3"), Family.IPV4) == {
        "0.0.0.0/1",
        "128.0.0.0/1",
        "10.1.2.3/32",
    }
    assert render(node_state(transit6=("::/0",))).sets["METALEG-TRANSIT-6"].members == {
        "::/1",
        "8000::/1",
    }
    with pytest.raises(BackendError, match=r"ipset METALEG-TRANSIT-4: invalid CIDR 'pods'"):
        render(node_state(transit4=("pods",)))
    with pytest.raises(BackendError, match=r"METALEG-TRANSIT-6: 10\.0\.0\.0/8 is not an IPv6"):
        render(node_state(transit6=("10.0.0.0/8",)))


def test_plan_sets_changes_members_by_difference() -> None:
    current = {
        "METALEG-A": SetSpec(
            "METALEG-A", HASH_IP, Family.IPV4, frozenset({"10.0.0.1", "10.0.0.2"})
        ),
        "METALEG-GONE": SetSpec("METALEG-GONE", HASH_IP, Family.IPV4, frozenset({"10.0.0.9"})),
        "METALEG-TYPE": SetSpec("METALEG-TYPE", HASH_IP, Family.IPV6, frozenset()),
        "METALEG-SAME": SetSpec("METALEG-SAME", HASH_NET, Family.IPV4, frozenset({"10.0.0.0/8"})),
    }
    desired = {
        "METALEG-A": SetSpec(
            "METALEG-A", HASH_IP, Family.IPV4, frozenset({"10.0.0.2", "10.0.0.3"})
        ),
        "METALEG-NEW": SetSpec("METALEG-NEW", HASH_IP, Family.IPV6, frozenset({"fd00::1"})),
        "METALEG-TYPE": SetSpec("METALEG-TYPE", HASH_NET, Family.IPV6, frozenset({"fd00::/8"})),
        "METALEG-SAME": current["METALEG-SAME"],
    }
    plan = plan_sets(current, desired)
    assert [spec.name for spec in plan.create] == ["METALEG-NEW"]
    assert [(spec.name, spec.kind) for spec in plan.recreate] == [("METALEG-TYPE", HASH_NET)]
    assert {(spec.name, members) for spec, members in plan.add} == {
        ("METALEG-A", frozenset({"10.0.0.3"})),
        ("METALEG-NEW", frozenset({"fd00::1"})),
        ("METALEG-TYPE", frozenset({"fd00::/8"})),
    }
    assert [(spec.name, members) for spec, members in plan.remove] == [
        ("METALEG-A", frozenset({"10.0.0.1"}))
    ]
    assert plan.destroy == ("METALEG-GONE",)
    assert plan_sets(desired, desired).empty


def test_the_helper_receives_chain_rules_encoded_and_equal() -> None:
    request = SyncRequest(
        tables=tuple(render(GUARDED).tables[Family.IPV4].values()), mode=Mode.KEEP_OLD
    )
    received = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=ReceivedRequest)
    assert (received.mode, received.collect_garbage) == (Mode.KEEP_OLD, False)
    for sent, got in zip(request.tables, received.tables, strict=True):
        assert (got.name, got.heads) == (sent.name, sent.heads)
        assert {
            chain: tuple(msgspec.msgpack.decode(raw, type=Rule) for raw in rules)
            for chain, rules in got.chains.items()
        } == sent.chains


def test_changed_tables_lists_only_differences() -> None:
    before = render(DUAL_STACK)
    after = render(
        node_state(MAIL, WEB, service("shop", "lost", mark(Family.IPV4, ("10.244.1.8",))))
    )
    changed = changed_tables(before.tables, after.tables)
    # LOST went REJECT -> MARK in IPv4 and disappeared in IPv6: filter changes; mangle does
    # not (marks are members of METALEG-MARK-4, and its one rule is there for WEB already).
    assert [spec.name for spec in changed[Family.IPV4]] == ["filter"]
    assert [spec.name for spec in changed[Family.IPV6]] == ["filter"]
    assert after.sets["METALEG-MARK-4"].members == {
        "10.244.1.6 skbmark 0x100000/0xf00000",
        "10.244.1.7 skbmark 0x100000/0xf00000",
        "10.244.1.8 skbmark 0x100000/0xf00000",
    }
    # The first marked Service of a family brings the mangle rule (and filter the stray
    # DROP for the mark set), the last takes them away.
    unmarked = render(node_state(MAIL, LOST))
    assert [spec.name for spec in changed_tables(unmarked.tables, before.tables)[Family.IPV4]] == [
        "mangle",
        "filter",
    ]
    assert [spec.name for spec in changed_tables(before.tables, unmarked.tables)[Family.IPV6]] == [
        "mangle",
        "filter",
    ]
    assert "METALEG-MARK-4" not in unmarked.sets
    assert changed_tables(before.tables, before.tables) == {Family.IPV4: (), Family.IPV6: ()}
    assert [spec.name for spec in changed_tables(None, before.tables)[Family.IPV4]] == [
        "mangle",
        "nat",
        "filter",
    ]


# --------------------------------------------------------------------------
# Pure: make-before-break order, with fake helpers and a fake ipset client
# --------------------------------------------------------------------------


class FakeIpsets:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def list_sets(self) -> dict[str, SetSpec]:
        return {}

    def create(self, spec: SetSpec) -> None:
        self.log.append(("ipset-create", spec.name))

    def add(self, spec: SetSpec, members: Any) -> None:
        self.log.append(("ipset-add", spec.name, frozenset(members)))

    def remove(self, spec: SetSpec, members: Any) -> None:
        self.log.append(("ipset-remove", spec.name, frozenset(members)))

    def destroy(self, name: str) -> None:
        self.log.append(("ipset-destroy", name))

    def make(self, plan: SetPlan) -> None:
        for spec in plan.recreate:
            self.destroy(spec.name)
            self.create(spec)
        for spec in plan.create:
            self.create(spec)
        for spec, members in plan.add:
            self.add(spec, members)

    def unmake(self, plan: SetPlan) -> list[str]:
        for spec, members in plan.remove:
            self.remove(spec, members)
        for name in plan.destroy:
            self.destroy(name)
        return []

    def close(self) -> None:
        pass


class FakeHelper:
    """Answers like the real helper: KEEP_OLD is exact unless the table loses a rule."""

    def __init__(self, family: Family, log: list[tuple[Any, ...]]) -> None:
        self.family = family
        self.log = log
        self.kernel: dict[str, TableSpec] = {}

    def start(self) -> None:
        pass

    def send(self, request: SyncRequest) -> None:
        self.reply = self.request(request)

    def receive(self) -> SyncReply:
        return self.reply

    def request(self, request: SyncRequest) -> SyncReply:
        results = []
        for spec in request.tables:
            self.log.append((request.mode.value, int(self.family), spec.name))
            old = self.kernel.get(spec.name, TableSpec(name=spec.name))
            old_rules = {rule for rules in old.chains.values() for rule in rules}
            new_rules = {rule for rules in spec.chains.values() for rule in rules}
            exact = request.mode is Mode.EXACT or old_rules <= new_rules
            if exact:
                self.kernel[spec.name] = spec
            results.append(TableResult(name=spec.name, committed=old != spec, exact=exact))
        return SyncReply(results=tuple(results))

    def stop(self) -> None:
        pass


def fake_backend() -> tuple[IptablesBackend, list[tuple[Any, ...]]]:
    log: list[tuple[Any, ...]] = []
    backend = IptablesBackend()
    backend._ipsets = FakeIpsets(log)  # type: ignore[assignment]
    backend._helpers = {family: FakeHelper(family, log) for family in (Family.IPV4, Family.IPV6)}  # type: ignore[misc]
    return backend, log


def test_change_is_make_before_break() -> None:
    backend, log = fake_backend()
    backend.apply(DUAL_STACK)
    log.clear()
    # LOST: REJECT -> MARK (IPv4); its pod 10.244.1.8 also moves into WEB; WEB loses 10.244.1.7.
    web = service(
        "default",
        "web",
        mark(Family.IPV4, ("10.244.1.6", "10.244.1.8")),
        mark(Family.IPV6, ("fd00:244::6",)),
    )
    lost = service("shop", "lost", mark(Family.IPV4, ("10.244.1.8",), fwmark=MARK2))
    backend.apply(node_state(MAIL, web, lost))
    # 10.244.1.8 is in WEB and LOST: the later Service's mark wins (as with one MARK rule
    # per Service, where the last matching rule set the mark). LOST was the only REJECT
    # Service: the shared REJECT sets go once their rules are gone.
    assert log == [
        # LOST's 10.244.1.8 gets MARK2 (mark set) before anything else
        ("ipset-add", "METALEG-MARK-4", frozenset({"10.244.1.8 skbmark 0x200000/0xf00000"})),
        ("keep-old", 4, "filter"),  # REJECT of LOST kept while the marks change
        ("keep-old", 6, "filter"),
        ("exact", 4, "filter"),  # now the REJECT goes
        ("exact", 6, "filter"),
        # 10.244.1.7 loses its mark only after all rules are final
        ("ipset-remove", "METALEG-MARK-4", frozenset({"10.244.1.7 skbmark 0x100000/0xf00000"})),
        ("ipset-destroy", "METALEG-REJECTED-4"),
        ("ipset-destroy", "METALEG-REJECTED-6"),
    ]


def test_guard_exception_goes_before_the_snat_it_stands_for() -> None:
    backend, log = fake_backend()
    backend.apply(node_state(MAIL, transit4=TRANSIT4))
    log.clear()
    # MAIL stops being SNATed here: nat loses the SNAT, filter its stale binding DROP and
    # the guard's exception. The DROPs go first of all (both families); then filter is
    # committed before nat, so in between its pods are rejected, never masqueraded.
    backend.apply(node_state(transit4=TRANSIT4))
    assert [entry for entry in log if entry[0] in ("keep-old", "exact")] == [
        ("exact", 4, "filter"),
        ("exact", 6, "filter"),
        ("keep-old", 4, "nat"),
        ("keep-old", 4, "filter"),
        ("keep-old", 6, "nat"),
        ("keep-old", 6, "filter"),
        ("exact", 4, "filter"),
        ("exact", 4, "nat"),
        ("exact", 6, "filter"),  # the stray and reply DROPs go with the break phase
        ("exact", 6, "nat"),
    ]
    log.clear()
    # And back: the SNAT (nat) exists before its exception (the SNATed set's member) and
    # DROP (filter); all only gain.
    backend.apply(node_state(MAIL, transit4=TRANSIT4))
    assert [entry[:3] for entry in log if entry[0] != "ipset-create"] == [
        ("ipset-add", S4["mail"], frozenset({"10.244.1.5"})),
        ("ipset-add", S6["mail"], frozenset({"fd00:244::5"})),
        ("keep-old", 4, "nat"),
        ("keep-old", 6, "nat"),
        ("ipset-add", "METALEG-SNATTED-4", frozenset({"10.244.1.5"})),
        ("ipset-add", "METALEG-SNATTED-6", frozenset({"fd00:244::5"})),
        ("keep-old", 4, "filter"),
        ("keep-old", 6, "filter"),
    ]
    log.clear()
    # Another SNAT Service leaves while MAIL stays: its sources leave the exception after
    # filter (the exception and the stale binding DROP), before nat (its SNAT).
    backend.apply(node_state(MAIL, RELAY, transit4=TRANSIT4))
    log.clear()
    backend.apply(node_state(MAIL, transit4=TRANSIT4))
    relay = frozenset({"10.244.1.20", "10.244.1.21"})
    assert log == [
        ("exact", 4, "filter"),  # the stale binding DROP, early: filter is final now
        ("keep-old", 4, "nat"),
        ("keep-old", 4, "filter"),  # (compared, nothing to commit)
        ("ipset-remove", "METALEG-SNATTED-4", relay),
        ("exact", 4, "nat"),
        ("ipset-destroy", S4["relay"]),
    ]
    log.clear()
    # The guard goes away: its rules first, then its set.
    backend.apply(node_state(MAIL))
    assert log == [
        ("keep-old", 4, "filter"),
        ("exact", 4, "filter"),
        ("ipset-destroy", "METALEG-TRANSIT-4"),
    ]


def test_stale_binding_drop_goes_before_the_snat_to_a_new_lb_ip() -> None:
    backend, log = fake_backend()
    backend.apply(DUAL_STACK)
    log.clear()
    # MAIL's IPv4 LB IP changes. Kept until the final commit, the DROP allowing only the old
    # LB IP would drop the flows SNATed to the new one, and with the new DROP every flow:
    # filter loses it before anything else (and before nat gains the new SNAT).
    moved = service(
        "default",
        "mail",
        snat(Family.IPV4, ("10.244.1.5",), "192.0.2.20"),
        snat(Family.IPV6, ("fd00:244::5",), "2001:db8::10"),
    )
    backend.apply(node_state(moved, WEB, LOST))
    assert log == [
        ("exact", 4, "filter"),  # old DROP out, nothing else changed
        ("keep-old", 4, "nat"),  # new SNAT next to the old one
        ("keep-old", 4, "filter"),  # new DROP: only gains now
        ("exact", 4, "nat"),  # old SNAT out
    ]
    fake = backend._helpers[Family.IPV4]
    assert isinstance(fake, FakeHelper)
    rejects = EXPECTED_V4["filter"]["METALEG-REJECT"]
    old_drop = rejects.index(stale_drop(S4["mail"], "192.0.2.10"))
    assert str(fake.kernel["filter"].chains["METALEG-REJECT"][old_drop]) == stale_drop(
        S4["mail"], "192.0.2.20"
    )
    # The early commit holds the old filter without the old DROP, and nothing new.
    before, after = render(DUAL_STACK), render(node_state(moved, WEB, LOST))
    (spec,) = without_departing_stale_bindings(
        before.tables[Family.IPV4], (after.tables[Family.IPV4]["filter"],)
    )
    assert [str(rule) for rule in spec.chains["METALEG-REJECT"]] == [
        rule for index, rule in enumerate(rejects) if index != old_drop
    ]
    assert spec.heads == before.tables[Family.IPV4]["filter"].heads
    # A resync does not know the old rules: no early commit (keep-old, then exact).
    log.clear()
    backend.resync(DUAL_STACK)
    assert next(entry for entry in log if entry[0] in ("keep-old", "exact")) == (
        "keep-old",
        4,
        "mangle",
    )


def test_only_additions_skip_the_intermediate_commit_and_same_state_does_nothing() -> None:
    backend, log = fake_backend()
    backend.apply(node_state(MAIL))
    log.clear()
    backend.apply(node_state(MAIL, WEB))
    # The first MARK Service: mangle gains the mark rule, filter the mark set's stray DROP.
    assert [entry[0] for entry in log if entry[0] in ("keep-old", "exact")] == ["keep-old"] * 4
    assert ("keep-old", 4, "mangle") in log and ("keep-old", 6, "mangle") in log
    assert ("keep-old", 4, "filter") in log and ("keep-old", 6, "filter") in log
    log.clear()
    backend.apply(node_state(MAIL, WEB))
    assert log == []
    assert backend.last_changes == ()


# --------------------------------------------------------------------------
# Kernel helpers (run inside the namespace, in the forked child)
# --------------------------------------------------------------------------


def dump_tables(family: int) -> dict[str, dict[str, list[str]]]:
    """table -> chain -> rules, for metaleg's chains and the built-in chains it uses.

    Built-in chains are listed whole (foreign rules included) so that positions
    can be checked; other chains only if they are metaleg's.
    """
    command = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    text = subprocess.run([command], capture_output=True, text=True, check=True).stdout
    tables: dict[str, dict[str, list[str]]] = {}
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line.startswith(":METALEG-"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, rest = line.split(" ", 2)
            if chain.startswith("METALEG-") or chain in ("PREROUTING", "POSTROUTING", "FORWARD"):
                table.setdefault(chain, []).append(rest)
    return {name: chains for name, chains in tables.items() if chains}


def dump_sets() -> dict[str, tuple[str, str, set[str], str]]:
    """name -> (type, family, members, initval) of every set, from ``ipset save``."""
    text = subprocess.run(["ipset", "save"], capture_output=True, text=True, check=True).stdout
    sets: dict[str, tuple[str, str, set[str], str]] = {}
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["create"]:
            flags = {"skbinfo", "counters", "comment", "forceadd"}
            options = [word for word in words[3:] if word not in flags]
            header = dict(zip(options[0::2], options[1::2], strict=False))
            kind = f"{words[2]} skbinfo" if "skbinfo" in words[3:] else words[2]
            sets[words[1]] = (kind, header["family"], set(), header.get("initval", ""))
        elif words[:1] == ["add"]:
            # ipset prints host entries of hash:net sets without /32 (/128).
            kind = sets[words[1]][0]
            member = str(ipaddress.ip_network(words[2])) if kind == "hash:net" else words[2]
            if "skbmark" in words:  # after "packets N bytes N" in a counted set
                member = f"{member} skbmark {words[words.index('skbmark') + 1]}"
            sets[words[1]][2].add(member)
    return sets


def kernel_view(
    sets: dict[str, tuple[str, str, set[str], str]],
) -> dict[str, tuple[str, str, set[str]]]:
    return {name: (kind, family, members) for name, (kind, family, members, _) in sets.items()}


Step = tuple[str, NodeDesiredState | None]


def run_steps(steps: list[Step]) -> list[dict[str, Any]]:
    """In the namespace: run backend calls in one backend; after each, record the kernel."""
    backend = IptablesBackend()
    records = []
    try:
        for action, state in steps:
            error = ""
            try:
                if action == "apply":
                    assert state is not None
                    backend.apply(state)
                elif action == "resync":
                    assert state is not None
                    backend.resync(state)
                elif action == "cleanup":
                    backend.cleanup()
                elif action == "shell":
                    continue
            except BackendError as raised:
                error = str(raised)
            records.append(
                {
                    "changes": backend.last_changes,
                    "error": error,
                    "v4": dump_tables(4),
                    "v6": dump_tables(6),
                    "sets": dump_sets(),
                }
            )
    finally:
        backend.close()
    return records


def run(ns: str, *steps: Step) -> list[dict[str, Any]]:
    return run_in_netns(ns, run_steps, list(steps), timeout=60)


def expected_tables(state: NodeDesiredState, family: Family) -> dict[str, dict[str, list[str]]]:
    return rules_by_chain(render(state), family)


def expected_sets(state: NodeDesiredState) -> dict[str, tuple[str, str, set[str]]]:
    return {
        name: (spec.kind, "inet" if spec.family is Family.IPV4 else "inet6", set(spec.members))
        for name, spec in render(state).sets.items()
    }


# --------------------------------------------------------------------------
# Kernel: apply, change, resync, cleanup
# --------------------------------------------------------------------------


@pytest.mark.netns
def test_apply_dual_stack_then_again_is_a_no_op() -> None:
    with namespace("mlfw") as ns:
        first, second, third = run(
            ns, ("apply", DUAL_STACK), ("apply", DUAL_STACK), ("resync", DUAL_STACK)
        )
        assert first["error"] == ""
        assert first["v4"] == EXPECTED_V4
        assert first["v6"] == EXPECTED_V6
        assert kernel_view(first["sets"]) == EXPECTED_SETS
        assert second["changes"] == ()
        # A resync against an unchanged kernel finds nothing to commit either.
        assert third["changes"] == ()
        assert first["sets"] == second["sets"] == third["sets"]  # initval equal: nothing recreated
        assert first["v4"] == third["v4"] and first["v6"] == third["v6"]


@pytest.mark.netns
def test_incremental_change_touches_only_what_differs() -> None:
    # One IP added to WEB, MAIL removed, LOST REJECT -> MARK (other mark), IPv6 only.
    web = service(
        "default",
        "web",
        mark(Family.IPV4, ("10.244.1.6", "10.244.1.7", "10.244.1.9")),
        mark(Family.IPV6, ("fd00:244::6",)),
    )
    lost = service(
        "shop",
        "lost",
        reject(Family.IPV4, ("10.244.1.8",)),
        mark(Family.IPV6, ("fd00:244::8",), MARK2),
    )
    changed = node_state(web, lost)
    with namespace("mlfw") as ns:
        before, after = run(ns, ("apply", DUAL_STACK), ("apply", changed))
        assert after["error"] == ""
        assert after["v4"] == expected_tables(changed, Family.IPV4)
        assert after["v6"] == expected_tables(changed, Family.IPV6)
        assert kernel_view(after["sets"]) == expected_sets(changed)
        assert S4["mail"] not in after["sets"] and S6["mail"] not in after["sets"]
        # Untouched sets were not recreated (same hash seed), the changed one edited in place.
        for name in ("METALEG-REJECTED-4", "METALEG-MARK-4", "METALEG-EXCLUDE-DST-4"):
            assert after["sets"][name][3] == before["sets"][name][3]
        # First MAIL's stale binding DROPs go (both families); mangle is untouched in both
        # families: WEB's new IP and LOST's IPv6 source get their marks as members of the
        # mark sets, before anything else; nothing only gains rules (no keep-old commit);
        # then the tables that lose rules (the SNATed sets' stray and reply DROPs, MAIL's
        # SNAT, IPv6's REJECT, its only REJECT source gone) are committed (exact, filter
        # first); the sets no rule uses any more go last.
        assert after["changes"] == (
            "iptables table filter: commit",
            "ip6tables table filter: commit",
            "ipset METALEG-MARK-4: +1",
            "ipset METALEG-MARK-6: +1",
            "iptables table filter: commit",
            "iptables table nat: commit",
            "ip6tables table filter: commit",
            "ip6tables table nat: commit",
            *(
                f"ipset {name}: destroy"
                for name in sorted(
                    {S4["mail"], S6["mail"], "METALEG-SNATTED-4", "METALEG-SNATTED-6"}
                    | {"METALEG-REJECTED-6"}
                )
            ),
        )
        assert "fd00:244::8 skbmark 0x200000/0xf00000" in after["sets"]["METALEG-MARK-6"][2]


@pytest.mark.netns
def test_transit_guard_appears_changes_by_difference_and_goes() -> None:
    # One guard source replaced (host route), RELAY no longer SNATed here, IPv6 guard gone.
    changed = node_state(
        MAIL, WEB, LOST, transit4=("10.244.2.0/24", "10.244.4.0/24", "10.244.5.9/32")
    )
    without = node_state(MAIL, WEB, LOST)
    with namespace("mlfw") as ns:
        first, again, second, resynced, third = run(
            ns,
            ("apply", GUARDED),
            ("resync", GUARDED),
            ("apply", changed),
            ("resync", changed),
            ("apply", without),
        )
        assert first["error"] == ""
        assert first["v4"] == expected_tables(GUARDED, Family.IPV4)
        assert first["v6"] == expected_tables(GUARDED, Family.IPV6)
        assert first["v4"]["filter"]["METALEG-REJECT"][-3:] == GUARD_V4
        assert first["v6"]["filter"]["METALEG-REJECT"][-3:] == GUARD_V6
        assert kernel_view(first["sets"]) == expected_sets(GUARDED)
        assert kernel_view(first["sets"])["METALEG-TRANSIT-4"] == (
            "hash:net",
            "inet",
            {"10.244.2.0/24", "10.244.3.7/32"},
        )
        # The kernel reads back as rendered (conntrack match, /32 members): nothing to do.
        assert again["error"] == "" and again["changes"] == ()

        assert second["error"] == ""
        assert second["v4"] == expected_tables(changed, Family.IPV4)
        assert second["v6"] == expected_tables(changed, Family.IPV6)
        assert kernel_view(second["sets"]) == expected_sets(changed)
        # Edited in place (same hash seed), not recreated.
        assert second["sets"]["METALEG-TRANSIT-4"][3] == first["sets"]["METALEG-TRANSIT-4"][3]
        # RELAY's stale binding DROP goes first (IPv4 filter is final then). Tables only
        # lose rules, so keep-old leaves them as they are; exact commits IPv6 filter (its
        # guard goes), then RELAY's sources leave the guard's exception (the SNATed set),
        # then nat loses the SNAT it stood for.
        assert second["changes"] == (
            "iptables table filter: commit",
            "ipset METALEG-TRANSIT-4: +2",
            "ip6tables table filter: commit",
            "ipset METALEG-SNATTED-4: -2",
            "iptables table nat: commit",
            "ipset METALEG-TRANSIT-4: -1",
            f"ipset {S4['relay']}: destroy",
            "ipset METALEG-TRANSIT-6: destroy",
        )
        assert resynced["error"] == "" and resynced["changes"] == ()

        assert third["error"] == ""
        assert third["v4"] == EXPECTED_V4 and third["v6"] == EXPECTED_V6
        assert kernel_view(third["sets"]) == EXPECTED_SETS
        assert third["changes"][-1] == "ipset METALEG-TRANSIT-4: destroy"


def keep_old_then_exact(steps: list[tuple[str, TableSpec]]) -> list[dict[str, Any]]:
    """In the namespace: drive the xtables helper code directly, dumping nat after each step."""
    subprocess.run(["ipset", "create", "METALEG-T-A", "hash:ip"], check=True)
    subprocess.run(["ipset", "create", "METALEG-T-B", "hash:ip"], check=True)
    server = XtablesServer(4, "/run/xtables.lock")
    dumps: list[dict[str, Any]] = []
    for mode, spec in steps:
        reply = server.sync(SyncRequest(tables=(spec,), mode=Mode(mode)))
        dumps.append(
            {"results": [str(result) for result in reply.results], **dump_tables(4)["nat"]}
        )
    return dumps


@pytest.mark.netns
def test_keep_old_keeps_old_rules_until_exact() -> None:
    old = TableSpec(
        name="nat",
        chains={"METALEG-SNAT": (snat_rule("METALEG-T-A", "192.0.2.1"),)},
        heads={"POSTROUTING": (jump_rule("METALEG-SNAT"),)},
    )
    new = TableSpec(
        name="nat",
        chains={"METALEG-SNAT": (snat_rule("METALEG-T-B", "192.0.2.2"),)},
        heads={"POSTROUTING": (mark_skip_rule(MASK), jump_rule("METALEG-SNAT"))},
    )
    with namespace("mlfw") as ns:
        dumps = run_in_netns(
            ns,
            keep_old_then_exact,
            [("exact", old), ("keep-old", new), ("exact", new), ("exact", new)],
        )
    a = "-m set --match-set METALEG-T-A src -j SNAT --to-source 192.0.2.1"
    b = "-m set --match-set METALEG-T-B src -j SNAT --to-source 192.0.2.2"
    skip, jump = "-m mark ! --mark 0x0/0xf00000 -j RETURN", "-j METALEG-SNAT"
    assert dumps[0]["METALEG-SNAT"] == [a]
    assert dumps[0]["POSTROUTING"] == [jump]
    # Keep-old: new rules added (in place, at the top for built-in chains), old ones kept.
    assert dumps[1]["METALEG-SNAT"] == [b, a]
    assert dumps[1]["POSTROUTING"] == [skip, jump, jump]
    assert dumps[1]["results"] == ["TableResult(name='nat', committed=True, exact=False)"]
    assert dumps[2]["METALEG-SNAT"] == [b]
    assert dumps[2]["POSTROUTING"] == [skip, jump]
    assert dumps[2]["results"] == ["TableResult(name='nat', committed=True, exact=True)"]
    assert dumps[3]["results"] == ["TableResult(name='nat', committed=False, exact=True)"]


@pytest.mark.netns
def test_keep_old_keeps_old_rules_in_place() -> None:
    a = snat_rule("METALEG-T-A", "192.0.2.1")
    b = snat_rule("METALEG-T-B", "192.0.2.2")
    last = source_return_rule("METALEG-T-B")  # like the guard's REJECT: must stay last

    def nat(*rules: Rule) -> TableSpec:
        return TableSpec(name="nat", chains={"METALEG-SNAT": rules})

    with namespace("mlfw") as ns:
        dumps = run_in_netns(
            ns,
            keep_old_then_exact,
            [("exact", nat(a, last)), ("keep-old", nat(last)), ("keep-old", nat(b, last))],
        )
    texts = {str(rule): name for name, rule in (("a", a), ("b", b), ("last", last))}
    chains = [[texts[rule] for rule in dump["METALEG-SNAT"]] for dump in dumps]
    assert chains == [["a", "last"], ["a", "last"], ["b", "a", "last"]]
    # A table that only loses rules is not committed before the final (exact) step.
    assert dumps[1]["results"] == ["TableResult(name='nat', committed=False, exact=False)"]


def tamper(ns: str) -> None:
    """What drift looks like: deleted rules, displaced and duplicated jumps, leftovers."""
    for command in [
        "iptables-legacy -t nat -D METALEG-SNAT 2",
        "iptables-legacy -t filter -I FORWARD 1 -s 10.1.0.0/16 -j ACCEPT",  # like kube-router
        "iptables-legacy -t mangle -A PREROUTING -j METALEG-RT-MARK",  # duplicate, not first
        "iptables-legacy -t nat -I POSTROUTING 3 -m mark ! --mark 0x0/0xf0000 -j RETURN",  # old mask
        "iptables-legacy -t nat -A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE",  # foreign
        "iptables-legacy -t nat -N METALEG-OLD",
        "iptables-legacy -t nat -A METALEG-OLD -j RETURN",
        "iptables-legacy -t nat -A POSTROUTING -j METALEG-OLD",
        "ip6tables-legacy -t mangle -F METALEG-RT-MARK",
        "ip6tables-legacy -t filter -D FORWARD -j METALEG-REJECT",
        "iptables-legacy -t raw -N METALEG-RAW",
        "iptables-legacy -t raw -A PREROUTING -j METALEG-RAW",
        "ipset create METALEG-OLD hash:ip",
        "ipset create inet6:METALEG-SRC-0123 hash:ip family inet6",
        "ipset create KEEP-ME hash:ip",
        "ipset del METALEG-REJECTED-4 10.244.1.8",
        "ipset add METALEG-REJECTED-4 10.244.1.99",
        "ipset add METALEG-SNATTED-4 10.244.1.98",  # an exception too many
        "ipset del METALEG-SNATTED-6 fd00:244::5",  # and one missing
        f"ipset create {S4['lost']} hash:ip",  # a REJECT Service has no source set
        "ipset del METALEG-MARK-4 10.244.1.7",
        "ipset add METALEG-MARK-4 10.244.1.6 skbmark 0x300000/0xf00000 -exist",
        f"ipset create {S4['web']} hash:ip",  # a MARK Service has no source set
    ]:
        sh(*command.split(), netns=ns)


@pytest.mark.netns
def test_resync_repairs_drift_and_collects_garbage() -> None:
    with namespace("mlfw") as ns:
        run(ns, ("apply", DUAL_STACK))
        tamper(ns)
        (repaired,) = run(ns, ("resync", DUAL_STACK))
        assert repaired["error"] == ""
        v4 = repaired["v4"]
        assert v4["filter"]["FORWARD"] == ["-j METALEG-REJECT", "-s 10.1.0.0/16 -j ACCEPT"]
        assert v4["nat"]["POSTROUTING"] == [
            *EXPECTED_V4["nat"]["POSTROUTING"],
            "-s 10.244.0.0/16 -j MASQUERADE",
        ]
        assert v4["nat"]["METALEG-SNAT"] == EXPECTED_V4["nat"]["METALEG-SNAT"]
        assert "METALEG-OLD" not in v4["nat"]
        assert v4["mangle"] == EXPECTED_V4["mangle"]
        assert "raw" not in v4  # its METALEG-RAW chain and the jump to it are gone
        assert "METALEG-RAW" not in sh("iptables-legacy-save", "-t", "raw", netns=ns)
        assert repaired["v6"] == EXPECTED_V6
        sets = kernel_view(repaired["sets"])
        assert sets.pop("KEEP-ME") == ("hash:ip", "inet", set())  # not ours: left alone
        assert sets == EXPECTED_SETS


GO_ORIGINAL_V4 = """*mangle
:METALEG-RT-MARK - [0:0]
-A PREROUTING -s 192.0.2.99/32 -j ACCEPT
-A PREROUTING -j METALEG-RT-MARK
-A METALEG-RT-MARK -m set --match-set METALEG-EXCLUDE-DST-4 dst -j RETURN
-A METALEG-RT-MARK -m set --match-set METALEG-SRC-0a1b2c src -j MARK --set-xmark 0x100000/0xf00000
COMMIT
*nat
:METALEG-SNAT - [0:0]
-A POSTROUTING -m mark ! --mark 0x0/0xf00000 -j RETURN
-A POSTROUTING -j METALEG-SNAT
-A METALEG-SNAT -m set --match-set METALEG-EXCLUDE-DST-4 dst -j RETURN
COMMIT
*filter
:METALEG-REJECT - [0:0]
-A FORWARD -j METALEG-REJECT
COMMIT
"""


@pytest.mark.netns
def test_first_apply_takes_over_the_go_originals_layout() -> None:
    with namespace("mlfw") as ns:
        # What MetalEG v0.2.1 leaves: sets made by the ipset binary with "timeout 0",
        # IPv6 sets named "inet6:...", its jump appended after another rule.
        for command in [
            "ipset create METALEG-EXCLUDE-DST-4 hash:net family inet timeout 0",
            "ipset add METALEG-EXCLUDE-DST-4 10.0.0.0/8",
            "ipset add METALEG-EXCLUDE-DST-4 192.168.0.0/16",
            "ipset create METALEG-SRC-0a1b2c hash:ip family inet timeout 0",
            "ipset add METALEG-SRC-0a1b2c 10.244.1.6",
            "ipset create inet6:METALEG-SRC-0a1b2c hash:ip family inet6 timeout 0",
        ]:
            sh(*command.split(), netns=ns)
        subprocess.run(
            ["ip", "netns", "exec", ns, "iptables-legacy-restore"],
            input=GO_ORIGINAL_V4,
            text=True,
            check=True,
            timeout=10,
        )
        (record,) = run(ns, ("apply", DUAL_STACK))
        assert record["error"] == ""
        assert record["v4"]["mangle"]["PREROUTING"] == [
            "-j METALEG-RT-MARK",
            "-s 192.0.2.99/32 -j ACCEPT",
        ]
        assert record["v4"]["mangle"]["METALEG-RT-MARK"] == EXPECTED_V4["mangle"]["METALEG-RT-MARK"]
        assert {name: chains for name, chains in record["v4"].items() if name != "mangle"} == {
            name: chains for name, chains in EXPECTED_V4.items() if name != "mangle"
        }
        assert record["v6"] == EXPECTED_V6
        # The exclude set is kept (same type) and corrected; the Go source sets are gone.
        assert kernel_view(record["sets"]) == EXPECTED_SETS


def readd_after_other_sets_took_the_indexes() -> list[dict[str, Any]]:
    """MAIL goes (its sets are destroyed), other sets take their kernel indexes, MAIL comes
    back: its rules must name its new sets, not whatever holds the old indexes now."""
    backend = IptablesBackend()
    records = []
    try:
        backend.apply(DUAL_STACK)
        backend.apply(node_state(WEB, LOST))
        for name in ("other-1", "other-2"):
            subprocess.run(["ipset", "create", name, "hash:ip"], check=True)
        backend.apply(DUAL_STACK)
        records.append({"v4": dump_tables(4), "v6": dump_tables(6)})
        backend.resync(DUAL_STACK)
        records.append({"changes": backend.last_changes})
    finally:
        backend.close()
    return records


@pytest.mark.netns
def test_rules_follow_sets_that_were_created_again() -> None:
    with namespace("mlfw") as ns:
        again, resync = run_in_netns(ns, readd_after_other_sets_took_the_indexes)
    assert again["v4"] == EXPECTED_V4
    assert again["v6"] == EXPECTED_V6
    assert resync["changes"] == ()


@pytest.mark.netns
def test_cleanup_removes_everything_and_is_idempotent() -> None:
    with namespace("mlfw") as ns:
        run(ns, ("apply", DUAL_STACK))
        sh(
            "iptables-legacy",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.244.0.0/16",
            "-j",
            "MASQUERADE",
            netns=ns,
        )
        sh("iptables-legacy", "-t", "raw", "-N", "METALEG-RAW", netns=ns)
        sh("ipset", "create", "KEEP-ME", "hash:ip", netns=ns)
        cleaned, again = run(ns, ("cleanup", None), ("cleanup", None))
        assert cleaned["error"] == "" and again["error"] == ""
        for family in (4, 6):
            save = sh("iptables-legacy-save" if family == 4 else "ip6tables-legacy-save", netns=ns)
            assert "METALEG" not in save
        assert cleaned["v4"] == {"nat": {"POSTROUTING": ["-s 10.244.0.0/16 -j MASQUERADE"]}}
        assert set(cleaned["sets"]) == {"KEEP-ME"}
        assert again["changes"] == ()
        assert any("destroy" in change for change in cleaned["changes"])


@pytest.mark.netns
def test_cleanup_in_untouched_namespace_creates_nothing() -> None:
    with namespace("mlfw") as ns:
        (record,) = run(ns, ("cleanup", None))
        assert record["error"] == "" and record["changes"] == ()
        # No legacy table was instantiated just to look for leftovers.
        assert (
            sh("cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names", netns=ns).split()
            == []
        )


@pytest.mark.netns
def test_errors_name_the_object() -> None:
    with namespace("mlfw") as ns:
        run(ns, ("apply", DUAL_STACK))
        # A rule outside metaleg's chains keeps the REJECT set busy (LOST its only Service).
        sh(
            "iptables-legacy",
            "-A",
            "INPUT",
            "-m",
            "set",
            "--match-set",
            "METALEG-REJECTED-4",
            "src",
            "-j",
            "ACCEPT",
            netns=ns,
        )
        without_lost = node_state(MAIL, WEB)
        gone, retried, cleaned = run(
            ns, ("apply", without_lost), ("apply", without_lost), ("cleanup", None)
        )
        assert (
            "ipset METALEG-REJECTED-4: cannot destroy, a rule outside metaleg's chains still uses it"
            in gone["error"]
        )
        # Everything else was done; the next apply is a full resync and says the same.
        assert gone["v4"] == expected_tables(without_lost, Family.IPV4)
        assert "METALEG-REJECTED-6" not in gone["sets"]
        assert "ipset METALEG-REJECTED-4" in retried["error"]
        assert (
            cleaned["error"].startswith("cleanup incomplete: ")
            and "METALEG-REJECTED-4" in cleaned["error"]
        )


def helper_error() -> str:
    from metaleg.firewall.iptables.helper_client import XtablesHelper

    helper = XtablesHelper(Family.IPV4, timeout=30)
    spec = TableSpec(
        name="nat", chains={"METALEG-SNAT": (snat_rule("METALEG-NO-SUCH-SET", "192.0.2.1"),)}
    )
    try:
        helper.request(SyncRequest(tables=(spec,)))
    except BackendError as error:
        return str(error)
    finally:
        helper.stop()
    return "no error"


@pytest.mark.netns
def test_helper_errors_become_backend_errors_naming_table_chain_and_rule() -> None:
    with namespace("mlfw") as ns:
        message = run_in_netns(ns, helper_error)
    assert message.startswith("iptables: table nat chain METALEG-SNAT: invalid rule ")
    assert "--match-set METALEG-NO-SUCH-SET src -j SNAT --to-source 192.0.2.1" in message


def restart_after_kill() -> tuple[
    dict[Family, int | None], dict[Family, int | None], str, tuple[str, ...]
]:
    backend = IptablesBackend()
    backend.apply(node_state(MAIL))
    first = backend.helper_pids()
    for pid in first.values():
        assert pid is not None
        os.kill(pid, 9)
    time.sleep(0.2)
    backend.apply(node_state(MAIL, WEB))  # restarts both helpers on the way
    second = backend.helper_pids()
    rules = subprocess.run(
        ["iptables-legacy-save", "-t", "mangle"], capture_output=True, text=True
    ).stdout
    changes = backend.last_changes
    # Leave without close(): the helpers must notice that we are gone.
    return first, second, rules, changes


def close_stops_helpers() -> tuple[list[int], list[bool]]:
    backend = IptablesBackend()
    backend.apply(node_state(MAIL))
    pids = [pid for pid in backend.helper_pids().values() if pid is not None]
    backend.close()
    return pids, [process_alive(pid) for pid in pids] + [
        pid is not None for pid in backend.helper_pids().values()
    ]


@pytest.mark.netns
def test_close_stops_the_helpers() -> None:
    with namespace("mlfw") as ns:
        pids, alive = run_in_netns(ns, close_stops_helpers)
    assert len(pids) == 2
    assert alive == [False, False, False, False]


@pytest.mark.netns
def test_helpers_restart_after_death_and_exit_with_their_parent() -> None:
    with namespace("mlfw") as ns:
        first, second, rules, changes = run_in_netns(ns, restart_after_kill)
        assert set(first) == set(second) == {Family.IPV4, Family.IPV6}
        for family in first:
            assert second[family] is not None and second[family] != first[family]
        assert "-A METALEG-RT-MARK -j SET --map-set METALEG-MARK-4 src --map-mark" in rules
        assert "iptables table mangle: commit" in changes
        survivors = [pid for pid in second.values() if pid is not None]
        wait_until(
            lambda: [pid for pid in survivors if process_alive(pid)],
            timeout=10,
            message="the helpers to exit with their parent",
            accept=lambda alive: not alive,
        )


# --------------------------------------------------------------------------
# Kernel: packets
# --------------------------------------------------------------------------


def apply_state(state: NodeDesiredState) -> tuple[str, ...]:
    backend = IptablesBackend()
    try:
        backend.apply(state)
        return backend.last_changes
    finally:
        backend.close()


def ping(pod: str) -> subprocess.CompletedProcess[str]:
    return ping_from(pod, "198.51.100.2", "-c", "1")


@pytest.mark.netns
def test_packets_are_rejected_snated_and_marked() -> None:
    """pod 10.244.1.5 -- node (forwarding, the backend) -- server 198.51.100.2."""
    with namespace("mlfw") as node, namespace("mlfw") as pod, namespace("mlfw") as server:
        link(node, "to-pod", ("10.244.1.1/24",), pod, ("10.244.1.5/24",))
        link(node, "to-srv", ("198.51.100.1/24",), server, ("198.51.100.2/24",))
        route(pod, "default", "10.244.1.1")
        route(server, "192.0.2.10/32", "198.51.100.1")
        forward(node)
        ips = ("10.244.1.5",)

        # The server knows no route to the pod network: only SNAT to 192.0.2.10 gets a reply.
        run_in_netns(node, apply_state, node_state())
        assert ping(pod).returncode != 0
        run_in_netns(
            node, apply_state, node_state(service("d", "s", snat(Family.IPV4, ips, "192.0.2.10")))
        )
        assert ping(pod).returncode == 0

        # REJECT answers at once with ICMP port unreachable.
        run_in_netns(node, apply_state, node_state(service("d", "s", reject(Family.IPV4, ips))))
        rejected = ping(pod)
        assert rejected.returncode != 0 and "Port Unreachable" in rejected.stdout

        # MARK: marked packets follow the fwmark rule into a table that blackholes them.
        route(server, "10.244.1.0/24", "198.51.100.1")
        route_marked(node, "blackhole", "default")
        run_in_netns(node, apply_state, node_state())
        assert ping(pod).returncode == 0
        run_in_netns(node, apply_state, node_state(service("d", "s", mark(Family.IPV4, ips))))
        assert ping(pod).returncode != 0
        # An excluded destination is never marked.
        excluded = node_state(
            service("d", "s", mark(Family.IPV4, ips)), exclude4=("198.51.100.0/24",)
        )
        run_in_netns(node, apply_state, excluded)
        assert ping(pod).returncode == 0


def wire_gateway(gw: str, src: str, dst: str) -> None:
    """src 10.244.2.10 (a pod) -- gw (forwarding, the backend) -- dst 203.0.113.10.

    dst routes the pod network and the SNAT addresses 192.0.2.10 and 192.0.2.11
    back via gw: it could answer the pod directly, so only the rules decide.
    """
    link(gw, "to-src", ("10.244.2.1/24",), src, ("10.244.2.10/24",))
    link(gw, "to-dst", ("203.0.113.1/24",), dst, ("203.0.113.10/24",))
    route(src, "default", "10.244.2.1")
    for network in ("10.244.2.0/24", "192.0.2.10/32", "192.0.2.11/32"):
        route(dst, network, "203.0.113.1")
    forward(gw)


@pytest.mark.netns
def test_packets_transit_guard() -> None:
    """src 10.244.2.10 (another node's pod) -- gw (forwarding, the backend) -- dst 203.0.113.10."""
    with namespace("mlfw") as gw, namespace("mlfw") as src, namespace("mlfw") as dst:
        wire_gateway(gw, src, dst)
        # The node's own masquerade (kube-router style, legacy): what the guard prevents for
        # transit traffic; it also has conntrack track every flow from the start, as on a node.
        masquerade(gw, "10.244.0.0/16", "10.244.0.0/16", "legacy")
        with script_in(dst, TCP_LISTENER, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            wait_listening(dst, 8080, "tcp")
            pod = ("10.244.2.10",)
            guard = ("10.244.2.0/24",)

            # A connection that exists before the guard survives it (only NEW is rejected).
            run_in_netns(gw, apply_state, node_state())
            pinging = subprocess.Popen(
                [
                    *("ip", "netns", "exec", src, "ping", "-n", "-c", "12", "-i", "0.25"),
                    *("-W", "1", "203.0.113.10"),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.6)
            run_in_netns(gw, apply_state, node_state(transit4=guard))
            output, _ = pinging.communicate(timeout=20)
            assert "12 received" in output

            # New connections of a guarded source are rejected at once.
            rejected = ping_from(src, "203.0.113.10", "-c", "1")
            assert rejected.returncode != 0 and "Port Unreachable" in rejected.stdout
            assert tcp_connect(src, "203.0.113.10") == "refused"

            # Excluded destinations and sources outside the guard pass.
            run_in_netns(gw, apply_state, node_state(transit4=guard, exclude4=("203.0.0.0/8",)))
            assert tcp_connect(src, "203.0.113.10") == "connected"
            run_in_netns(gw, apply_state, node_state(transit4=("10.244.3.0/24", "10.244.2.9/32")))
            assert tcp_connect(src, "203.0.113.10") == "connected"

            # This node SNATs the pod: it passes, with the SNAT address as source.
            snated = node_state(
                service("d", "s", snat(Family.IPV4, pod, "192.0.2.10")), transit4=guard
            )
            run_in_netns(gw, apply_state, snated)
            assert tcp_connect(src, "203.0.113.10") == "connected"
            assert ping_from(src, "203.0.113.10", "-c", "1").returncode == 0
            sources = sh("conntrack", "-L", "-p", "icmp", netns=gw, check=False)
            assert "src=203.0.113.10 dst=192.0.2.10" in sources

            # This node marks the pod (policy routing to "the gateway", here dst itself): passes.
            route_marked(gw, "default", "via", "203.0.113.10")
            run_in_netns(
                gw,
                apply_state,
                node_state(service("d", "s", mark(Family.IPV4, pod)), transit4=guard),
            )
            assert tcp_connect(src, "203.0.113.10") == "connected"

            # The Service is gone from this node: rejected again.
            run_in_netns(gw, apply_state, node_state(transit4=guard))
            assert tcp_connect(src, "203.0.113.10") == "refused"


UDP_RECEIVER = """
import socket, sys
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.bind(("0.0.0.0", 9999))
with open(sys.argv[1], "a", buffering=1) as log:
    while True:
        data, peer = receiver.recvfrom(2048)
        log.write(f"{peer[0]} {data.decode()}\\n")
        if data.startswith(b"echo"):
            receiver.sendto(data, peer)
"""

UDP_SENDER = """
import socket, sys, time
target = (sys.argv[1], 9999)
flows = []
for label, port in (("echo", 40001), ("oneway", 40002)):
    flow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flow.bind(("0.0.0.0", port))
    flow.setblocking(False)
    flows.append((label, flow))
deadline = time.monotonic() + float(sys.argv[2])
number = 0
while time.monotonic() < deadline:
    number += 1
    for label, flow in flows:
        try:
            flow.sendto(f"{label} {number}".encode(), target)
            while flow.recv(2048):
                pass
        except OSError:
            pass
    time.sleep(0.02)
"""


def received(path: str) -> list[tuple[str, str]]:
    """(source address, flow label) of every datagram the UDP receiver logged, in order."""
    try:
        with open(path) as log:
            lines = log.read().splitlines()
    except FileNotFoundError:
        return []
    return [(words[0], words[1]) for words in (line.split() for line in lines) if len(words) == 3]


def stale_binding_drops(gw: str) -> int:
    """Packets dropped by the stale binding rules in gw (their counters)."""
    text = sh("iptables-legacy", "-L", "METALEG-REJECT", "-v", "-x", "-n", netns=gw)
    return sum(int(line.split()[0]) for line in text.splitlines() if " DROP " in f" {line} ")


def old_flows(path: str, since: int) -> set[tuple[str, str]]:
    """(source, label) of the sender's two long-lived flows logged after entry ``since``."""
    return {entry for entry in received(path)[since:] if entry[1] in ("echo", "oneway")}


def udp_send_once(ns: str, label: str) -> None:
    """One datagram of a new flow (fresh source port) from ``ns`` to the receiver."""
    code = (
        "import socket, sys; "
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
        ".sendto(f'{sys.argv[1]} 1'.encode(), ('203.0.113.10', 9999))"
    )
    sh(sys.executable, "-c", code, label, netns=ns)


@pytest.mark.netns
def test_packets_stale_binding_is_dropped_until_its_entry_is_deleted(tmp_path: Any) -> None:
    """A pod's flows start while gw marks them towards another gateway (their conntrack entries
    get no binding: marked packets skip the masquerade); then gw becomes the pod's gateway.

    Until their entries are deleted (selection.py does that right after the apply) the old
    flows must not leave, neither with the pod IP nor at all; afterwards they and every new
    flow leave with the LB IP. Both kinds of old flow are checked: one that got an answer
    (ESTABLISHED) and a one-way one (its packets stay NEW, yet the entry and its binding exist).
    """
    log = str(tmp_path / "received")
    pod = ("10.244.2.10",)
    with namespace("mlfw") as gw, namespace("mlfw") as src, namespace("mlfw") as dst:
        wire_gateway(gw, src, dst)
        # The node's masquerade (which also has conntrack track every flow, as on a node)
        # and policy routing of marked packets to "the other gateway", here dst itself.
        masquerade(gw, "10.244.0.0/16", "10.244.0.0/16", "legacy")
        route_marked(gw, "default", "via", "203.0.113.10")
        run_in_netns(gw, apply_state, node_state(service("d", "s", mark(Family.IPV4, pod))))

        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        with contextlib.ExitStack() as processes:
            processes.enter_context(script_in(dst, UDP_RECEIVER, log, **quiet))
            processes.enter_context(script_in(src, TCP_LISTENER, **quiet))
            wait_listening(dst, 9999, "udp")
            wait_listening(src, 8080, "tcp")
            sender = processes.enter_context(
                script_in(src, UDP_SENDER, "203.0.113.10", "60", **quiet)
            )
            # Both flows reach dst with the pod IP (marked): their entries carry no binding.
            unbound = {("10.244.2.10", "echo"), ("10.244.2.10", "oneway")}
            wait_until(
                lambda: old_flows(log, 0),
                timeout=10,
                message=f"{unbound} at the receiver",
                accept=lambda flows: unbound <= flows,
            )
            entries = sh("conntrack", "-L", "-p", "udp", "-s", "10.244.2.10", netns=gw)
            assert "src=203.0.113.10 dst=10.244.2.10 sport=9999 dport=40001" in entries
            assert "src=203.0.113.10 dst=10.244.2.10 sport=9999 dport=40002" in entries

            # gw becomes the gateway: SNAT to 192.0.2.10. The old flows are dropped, not sent.
            run_in_netns(
                gw, apply_state, node_state(service("d", "s", snat(Family.IPV4, pod, "192.0.2.10")))
            )
            time.sleep(0.2)  # what was on its way before the commit has arrived
            since = len(received(log))
            time.sleep(1.0)  # 50 more packets per flow
            assert old_flows(log, since) == set()
            assert stale_binding_drops(gw) >= 50
            assert sender.poll() is None  # still sending

            # Their entries are deleted: the next packets get new ones, with the LB IP.
            sh("conntrack", "-D", "-s", "10.244.2.10", netns=gw)
            snated = {("192.0.2.10", "echo"), ("192.0.2.10", "oneway")}
            wait_until(
                lambda: old_flows(log, since),
                timeout=5,
                message=f"only {snated} at the receiver",
                accept=lambda flows: flows == snated,
            )
            udp_send_once(src, "fresh")  # a new flow: the LB IP at once
            wait_until(
                lambda: {entry for entry in received(log) if entry[1] == "fresh"},
                timeout=5,
                message="the fresh flow from 192.0.2.10 at the receiver",
                accept=lambda fresh: ("192.0.2.10", "fresh") in fresh,
            )

            # The LB IP changes: flows bound to the old one are dropped until flushed too.
            run_in_netns(
                gw, apply_state, node_state(service("d", "s", snat(Family.IPV4, pod, "192.0.2.11")))
            )
            time.sleep(0.2)
            since = len(received(log))
            time.sleep(0.5)
            assert old_flows(log, since) == set()
            sh("conntrack", "-D", "-s", "10.244.2.10", netns=gw)
            moved = {("192.0.2.11", "echo"), ("192.0.2.11", "oneway")}
            wait_until(
                lambda: old_flows(log, since),
                timeout=5,
                message=f"only {moved} at the receiver",
                accept=lambda flows: flows == moved,
            )
            assert all(source != "10.244.2.10" for source, _ in received(log)[since:])

            # A connection an outside host opens to the pod IP itself (not DNATed) is dropped
            # at its first packet: the pod's answers would leave with the pod IP (fail
            # closed; after a gateway move such "connections" are stray replies) ...
            assert tcp_connect(dst, "10.244.2.10") == "TimeoutError"
            # ... while connections into the Service through a DNAT (LB IP, NodePort) work,
            # the pod's answers leaving with the DNATed address.
            sh(
                *("iptables-legacy", "-t", "nat", "-A", "PREROUTING", "-d", "192.0.2.10"),
                *("-p", "tcp", "-j", "DNAT", "--to-destination", "10.244.2.10"),
                netns=gw,
            )
            assert tcp_connect(dst, "192.0.2.10") == "connected"
