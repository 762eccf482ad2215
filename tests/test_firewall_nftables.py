"""The nftables backend: rendering (pure), the table in a namespace, and packets through it."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metaleg.backend import Backend, BackendError
from metaleg.firewall.nftables.backend import NftablesBackend
from metaleg.firewall.nftables.content import TableContent, canonical_cidrs
from metaleg.firewall.nftables.incremental import AppliedTable
from metaleg.firewall.nftables.kernel import ActualTable, differences
from metaleg.firewall.nftables.scripts import diff_script, full_script
from metaleg.firewall.selection import ManagedFirewall
from metaleg.model import Action, Family, FamilyEgress, NodeDesiredState, Role, ServiceEgress
from tests.netns import namespace, run_in_netns, sh
from tests.packet_harness import WHO_AM_I_SERVER as SERVER
from tests.packet_harness import add_addresses, forward, link, masquerade, route, script_in
from tests.packet_harness import udp_probe as _udp_probe
from tests.packet_harness import udp_send as _udp_send
from tests.waiting import wait_until

MASK = 0x00F00000
SLOT1, SLOT2, SLOT3 = 0x00100000, 0x00200000, 0x00300000
EXCLUDE4 = ("10.0.0.0/8", "192.168.0.0/16", "169.254.0.0/16")
EXCLUDE6 = ("fc00::/7", "fe80::/10")
# Other nodes' pod CIDRs and one endpoint outside them (adjacent /24s merge in the set).
TRANSIT4 = ("10.244.2.0/24", "10.244.3.0/24", "10.250.0.7/32")
TRANSIT6 = ("fd00:2::/64", "fd00:2:0:1::/64")


def content_of(state: NodeDesiredState) -> TableContent:
    """What the backend writes into the table's sets and maps for ``state``."""
    return AppliedTable(state).content


# --- building desired states ------------------------------------------------------------


def egress(
    family: Family,
    action: Action,
    *sources: str,
    snat_ip: str | None = None,
    fwmark: int | None = None,
) -> FamilyEgress:
    return FamilyEgress(
        family,
        action,
        tuple(sorted(sources)),
        snat_ip=snat_ip,
        fwmark=fwmark,
        reason="no gateway" if action == Action.REJECT else "",
    )


def service(name: str, *families: FamilyEgress) -> ServiceEgress:
    return ServiceEgress("ns", name, Role.GATEWAY, "node-a", (), tuple(families))


def node_state(
    *services: ServiceEgress,
    exclude4: tuple[str, ...] = EXCLUDE4,
    transit4: tuple[str, ...] = (),
    transit6: tuple[str, ...] = (),
) -> NodeDesiredState:
    return NodeDesiredState(
        "node-a",
        MASK,
        exclude4,
        EXCLUDE6,
        tuple(sorted(services, key=lambda s: s.key)),
        transit_guard_ipv4=transit4,
        transit_guard_ipv6=transit6,
    )


def dual_stack_state() -> NodeDesiredState:
    return node_state(
        service(
            "snat",
            egress(
                Family.IPV4, Action.SNAT, "10.244.1.10", "10.244.1.20", snat_ip="198.51.100.200"
            ),
            egress(Family.IPV6, Action.SNAT, "fd00:1::10", snat_ip="2001:db8:1::200"),
        ),
        service(
            "mark",
            egress(Family.IPV4, Action.MARK, "10.244.1.11", fwmark=SLOT1),
            egress(Family.IPV6, Action.MARK, "fd00:1::11", fwmark=SLOT1),
        ),
        service(
            "mark2",
            egress(Family.IPV4, Action.MARK, "10.244.1.21", fwmark=SLOT2),
        ),
        service(
            "reject",
            egress(Family.IPV4, Action.REJECT, "10.244.1.12"),
            egress(Family.IPV6, Action.REJECT, "fd00:1::12"),
        ),
        transit4=TRANSIT4,
        transit6=TRANSIT6,
    )


def big_state(services: int = 1000, per: int = 10, shift: int = 0) -> NodeDesiredState:
    """``services`` Services of ``per`` IPs per family, a third each SNAT, MARK (5 slots), REJECT."""
    base4 = int(ipaddress.IPv4Address("10.128.0.0")) + shift
    base6 = int(ipaddress.IPv6Address("fd00:10::")) + shift
    result = []
    for i in range(services):
        v4 = [str(ipaddress.IPv4Address(base4 + i * per + j)) for j in range(per)]
        v6 = [str(ipaddress.IPv6Address(base6 + i * per + j)) for j in range(per)]
        kind = (Action.SNAT, Action.MARK, Action.REJECT)[i % 3]
        lb4, lb6 = f"198.51.{i // 250}.{i % 250 + 1}", f"2001:db8::{i + 1:x}"
        mark = ((i % 5) + 1) << 20 if kind == Action.MARK else None
        result.append(
            service(
                f"svc{i:04d}",
                egress(
                    Family.IPV4,
                    kind,
                    *v4,
                    snat_ip=lb4 if kind == Action.SNAT else None,
                    fwmark=mark,
                ),
                egress(
                    Family.IPV6,
                    kind,
                    *v6,
                    snat_ip=lb6 if kind == Action.SNAT else None,
                    fwmark=mark,
                ),
            )
        )
    return node_state(*result)


# --- pure: rendering --------------------------------------------------------------------


def test_backend_satisfies_protocol() -> None:
    backend: Backend = NftablesBackend()
    assert backend.name == "nftables"
    backend.close()


def test_content_of_dual_stack_state() -> None:
    content = content_of(dual_stack_state())
    assert content.snat[Family.IPV4] == {
        "10.244.1.10": "198.51.100.200",
        "10.244.1.20": "198.51.100.200",
    }
    assert content.snat[Family.IPV6] == {"fd00:1::10": "2001:db8:1::200"}
    assert content.mark[Family.IPV4] == {"10.244.1.11": SLOT1, "10.244.1.21": SLOT2}
    assert content.mark[Family.IPV6] == {"fd00:1::11": SLOT1}
    assert content.reject == {Family.IPV4: {"10.244.1.12"}, Family.IPV6: {"fd00:1::12"}}
    assert content.exclude[Family.IPV4] == {"10.0.0.0/8", "192.168.0.0/16", "169.254.0.0/16"}
    assert content.fwmarks() == {SLOT1, SLOT2}
    assert content.element_sets()["mark4_00200000"] == {"10.244.1.21"}
    assert content.element_sets()["mark6_00200000"] == set()
    assert content.element_maps()["mark4"] == {
        "10.244.1.11": "0x00100000",
        "10.244.1.21": "0x00200000",
    }


def test_one_source_in_several_services_goes_to_the_first() -> None:
    """As in the watcher's desired-state function: the first Service by namespace/name."""
    state = node_state(
        service("a", egress(Family.IPV4, Action.SNAT, "10.1.0.1", "10.1.0.2", snat_ip="192.0.2.1")),
        service("b", egress(Family.IPV4, Action.SNAT, "10.1.0.1", snat_ip="192.0.2.2")),
        service("c", egress(Family.IPV4, Action.MARK, "10.1.0.2", "10.1.0.3", fwmark=SLOT1)),
        service("d", egress(Family.IPV4, Action.REJECT, "10.1.0.3", "10.1.0.4")),
    )
    content = content_of(state)
    assert content.snat[Family.IPV4] == {"10.1.0.1": "192.0.2.1", "10.1.0.2": "192.0.2.1"}
    assert content.mark[Family.IPV4] == {"10.1.0.3": SLOT1}
    assert content.reject[Family.IPV4] == {"10.1.0.4"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (egress(Family.IPV4, Action.SNAT, "10.1.0.1"), "SNAT without snat_ip"),
        (egress(Family.IPV4, Action.SNAT, "10.1.0.1", snat_ip="2001:db8::1"), "not an IPv4"),
        (egress(Family.IPV4, Action.MARK, "10.1.0.1"), "MARK without fwmark"),
        (egress(Family.IPV4, Action.MARK, "10.1.0.1", fwmark=0x1), "inside FIREWALL_MASK"),
        (egress(Family.IPV4, Action.REJECT, "10.1.0.1; flush ruleset"), "not an IPv4"),
        (egress(Family.IPV6, Action.REJECT, "10.1.0.1"), "not an IPv6"),
    ],
)
def test_bad_entries_are_refused_naming_the_service(entry: FamilyEgress, message: str) -> None:
    with pytest.raises(BackendError, match=rf"service ns/bad .*{message}"):
        content_of(node_state(service("bad", entry)))


def test_rule_count_does_not_grow_with_services() -> None:
    small = full_script(content_of(dual_stack_state()), MASK, "icmpx admin-prohibited")
    big = full_script(content_of(big_state(300)), MASK, "icmpx admin-prohibited")
    # 53 static rules + one per gateway mark and family (2 resp. 5 slots).
    assert small.count("\nadd rule ") == 53 + 2 * 2
    assert big.count("\nadd rule ") == 53 + 2 * 5
    assert "vmap" not in big and "jump fwmark" in big
    assert big.startswith(
        "add table inet metaleg\ndelete table inet metaleg\nadd table inet metaleg\n"
    )
    assert all(" inet metaleg " in f"{line} " for line in big.splitlines())


def test_diff_of_equal_contents_is_empty() -> None:
    content = content_of(dual_stack_state())
    assert diff_script(content, content_of(dual_stack_state()), MASK) == ""


def test_diff_changes_only_elements_and_slot_sets() -> None:
    old = content_of(dual_stack_state())
    new = content_of(
        node_state(
            service(
                "snat",
                egress(Family.IPV4, Action.SNAT, "10.244.1.10", snat_ip="198.51.100.201"),
            ),
            service("mark3", egress(Family.IPV4, Action.MARK, "10.244.1.30", fwmark=SLOT3)),
        )
    )
    lines = diff_script(old, new, MASK).splitlines()
    assert lines[:2] == [
        "add set inet metaleg mark4_00300000 { type ipv4_addr; }",
        "add set inet metaleg mark6_00300000 { type ipv6_addr; }",
    ]
    assert "delete element inet metaleg snat4 { 10.244.1.10, 10.244.1.20 }" in lines
    assert "add element inet metaleg snat4 { 10.244.1.10 : 198.51.100.201 }" in lines
    assert "delete element inet metaleg mark4 { 10.244.1.11, 10.244.1.21 }" in lines
    assert "add element inet metaleg mark4 { 10.244.1.30 : 0x00300000 }" in lines
    assert "add element inet metaleg mark4_00300000 { 10.244.1.30 }" in lines
    assert "delete element inet metaleg reject6 { fd00:1::12 }" in lines
    # Nothing is deleted from the sets that go: the sets are.
    assert not any(line.startswith("delete element inet metaleg mark4_") for line in lines)
    # The counted sources: gone ones deleted, new ones added (10.244.1.10 stays, its
    # Service and action too).
    assert (
        "delete element inet metaleg count4 { 10.244.1.11, 10.244.1.12, 10.244.1.20, "
        "10.244.1.21 }" in lines
    )
    assert "add element inet metaleg count4 { 10.244.1.30 }" in lines
    rules = [line.split(" comment ")[0] for line in lines[-7:-4]]
    assert rules == [
        "flush chain inet metaleg fwmark",
        "add rule inet metaleg fwmark ip saddr @mark4_00300000 "
        "meta mark set meta mark & 0xff0fffff | 0x00300000",
        "add rule inet metaleg fwmark ip6 saddr @mark6_00300000 "
        "meta mark set meta mark & 0xff0fffff | 0x00300000",
    ]
    assert lines[-4:] == [
        "delete set inet metaleg mark4_00100000",
        "delete set inet metaleg mark6_00100000",
        "delete set inet metaleg mark4_00200000",
        "delete set inet metaleg mark6_00200000",
    ]
    assert not any(line.startswith(("add rule inet metaleg pre", "add table")) for line in lines)
    assert "jump" not in "".join(lines)


def test_a_move_between_existing_slots_is_element_changes_only() -> None:
    old = content_of(dual_stack_state())
    moved = node_state(
        *(s for s in dual_stack_state().services if s.name != "mark"),
        service(
            "mark",
            egress(Family.IPV4, Action.MARK, "10.244.1.11", fwmark=SLOT2),
            egress(Family.IPV6, Action.MARK, "fd00:1::11", fwmark=SLOT1),
        ),
        transit4=TRANSIT4,
        transit6=TRANSIT6,
    )
    # Both slots stay in use: no set, no rule changes.
    assert diff_script(old, content_of(moved), MASK).splitlines() == [
        "delete element inet metaleg mark4 { 10.244.1.11 }",
        "delete element inet metaleg mark4_00100000 { 10.244.1.11 }",
        "add element inet metaleg mark4 { 10.244.1.11 : 0x00200000 }",
        "add element inet metaleg mark4_00200000 { 10.244.1.11 }",
    ]


def test_transit_guard_renders_static_rules_and_canonical_elements() -> None:
    state = node_state(
        transit4=("10.244.0.0/16", "10.244.7.0/24", "10.245.0.0/16", "10.250.0.7/32"),
        transit6=("fd00:2::/64", "fd00:2::5/128", "fd00:9::1/128"),
    )
    content = content_of(state)
    # Overlaps collapse, adjacent prefixes merge, host prefixes stay /32 and /128.
    assert content.transit == {
        Family.IPV4: {"10.244.0.0/15", "10.250.0.7/32"},
        Family.IPV6: {"fd00:2::/64", "fd00:9::1/128"},
    }
    lines = full_script(content, MASK, "icmpx admin-prohibited").splitlines()
    assert "add set inet metaleg transit4 { type ipv4_addr; flags interval; }" in lines
    assert "add set inet metaleg transit6 { type ipv6_addr; flags interval; }" in lines
    assert "add element inet metaleg transit4 { 10.244.0.0/15, 10.250.0.7/32 }" in lines
    assert "add element inet metaleg transit6 { fd00:2::/64, fd00:9::1/128 }" in lines
    forward = [line for line in lines if line.startswith("add rule inet metaleg forward ")]
    assert [
        line.split(" comment ")[0].removeprefix("add rule inet metaleg forward ")
        for line in forward
    ] == [
        "ct state new ct status ! dnat jump stray_reply",
        "ip daddr @exclude4 return",
        "ip6 daddr @exclude6 return",
        "ct state new ip saddr @transit4 meta mark & 0x00f00000 == 0 "
        "ip saddr != @snat4 reject with icmpx admin-prohibited",
        "ct state new ip6 saddr @transit6 meta mark & 0x00f00000 == 0 "
        "ip6 saddr != @snat6 reject with icmpx admin-prohibited",
        *(
            rule
            for ip, n in (("ip", 4), ("ip6", 6))
            for rule in (
                f"{ip} saddr @policed_dst{n} {ip} saddr . {ip} daddr != @dst{n} return",
                f"{ip} saddr @policed_port{n} {ip} saddr . meta l4proto . th dport "
                f"!= @port{n} return",
            )
        ),
        "ip saddr @count4",
        "ip6 saddr @count6",
        "ip saddr @reject4 reject with icmpx admin-prohibited",
        "ip6 saddr @reject6 reject with icmpx admin-prohibited",
    ]
    stray = [line for line in lines if line.startswith("add rule inet metaleg stray_reply ")]
    assert [
        line.split(" comment ")[0].removeprefix("add rule inet metaleg stray_reply ")
        for line in stray
    ][4:] == [
        f"{ip} daddr @{name}{n} {ip} saddr != @exclude{n} drop"
        for ip, n in (("ip", 4), ("ip6", 6))
        for name in ("snat", "mark", "reject")
    ]
    # The rules do not depend on the guard's elements (nor on the Services).
    empty = full_script(TableContent(), MASK, "icmpx admin-prohibited").splitlines()
    assert [line for line in empty if line.startswith("add rule ")] == [
        line for line in lines if line.startswith("add rule ")
    ]
    # The guard does not change conntrack scoping: it only acts on new connections.
    assert content.view == content_of(node_state()).view


def test_transit_guard_change_is_an_element_diff() -> None:
    old = content_of(node_state(transit4=("10.244.2.0/24", "10.250.0.7/32")))
    new = content_of(
        node_state(
            transit4=("10.244.2.0/24", "10.244.3.0/24", "10.250.0.8/32"), transit6=("fd00:2::/64",)
        )
    )
    assert diff_script(old, new, MASK).splitlines() == [
        "delete element inet metaleg transit4 { 10.244.2.0/24, 10.250.0.7/32 }",
        "add element inet metaleg transit4 { 10.244.2.0/23, 10.250.0.8/32 }",
        "add element inet metaleg transit6 { fd00:2::/64 }",
    ]
    assert diff_script(new, new, MASK) == ""


@pytest.mark.parametrize(
    ("transit4", "transit6", "message"),
    [
        (("10.244.0.0/33",), (), "transit_guard_ipv4: invalid CIDR"),
        (("fd00:2::/64",), (), "transit_guard_ipv4: fd00:2::/64 is not an IPv4"),
        ((), ("10.244.0.0/16",), "transit_guard_ipv6: 10.244.0.0/16 is not an IPv6"),
    ],
)
def test_bad_transit_guard_is_refused(
    transit4: tuple[str, ...], transit6: tuple[str, ...], message: str
) -> None:
    with pytest.raises(BackendError, match=message):
        content_of(node_state(transit4=transit4, transit6=transit6))


networks4 = st.builds(
    lambda a, n: str(ipaddress.ip_network((a, n), strict=False)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)


@given(st.lists(networks4, max_size=12))
def test_canonical_cidrs_cover_exactly_the_input_without_overlap(cidrs: list[str]) -> None:
    canonical = [ipaddress.IPv4Network(c) for c in canonical_cidrs(cidrs, Family.IPV4)]
    networks = [ipaddress.IPv4Network(c, strict=False) for c in cidrs]
    for a in canonical:
        for b in canonical:
            assert a == b or not a.overlaps(b)
    # Same coverage: every input network lies in the canonical set and vice versa.
    for network in networks:
        assert any(network.subnet_of(c) for c in canonical)
    assert sum(c.num_addresses for c in canonical) == sum(
        c.num_addresses for c in ipaddress.collapse_addresses(networks)
    )
    # Stable: canonicalising the canonical form changes nothing.
    assert canonical_cidrs([str(c) for c in canonical], Family.IPV4) == {str(c) for c in canonical}


def test_content_parsed_from_listing() -> None:
    """Elements as nft 1.0.6 lists them (prefixes, ranges, plain and decorated elements)."""
    document = {
        "nftables": [
            {"table": {"family": "inet", "name": "metaleg", "handle": 1}},
            {
                "set": {
                    "name": "exclude4",
                    "type": "ipv4_addr",
                    "flags": ["interval"],
                    "elem": [
                        {"prefix": {"addr": "10.0.0.0", "len": 9}},
                        {"prefix": {"addr": "10.128.0.0", "len": 9}},
                        {"range": ["192.168.0.0", "192.168.255.255"]},
                        "1.2.3.4",
                    ],
                }
            },
            {
                "map": {
                    "name": "mark6",
                    "type": "ipv6_addr",
                    "map": "mark",
                    "elem": [["FD00::0011", 1048576], ["fd00::12", "bogus"]],
                }
            },
            {"set": {"name": "mark6_00100000", "type": "ipv6_addr", "elem": ["FD00::0011"]}},
            {"set": {"name": "mark4_00200000", "type": "ipv4_addr", "elem": ["10.1.0.2"]}},
            {
                "set": {
                    "name": "reject4",
                    "type": "ipv4_addr",
                    "elem": [{"elem": {"val": "10.1.0.1", "comment": "x"}}, "bogus"],
                }
            },
        ]
    }
    table = ActualTable.parse(document)
    content = table.content()
    assert content.exclude[Family.IPV4] == {"10.0.0.0/8", "192.168.0.0/16", "1.2.3.4/32"}
    # The marks as the slot sets hold them; the aggregate map is read on its own.
    assert content.mark[Family.IPV6] == {"fd00::11": SLOT1}
    assert content.mark[Family.IPV4] == {"10.1.0.2": SLOT2}
    assert table.map_members("mark6") == {"fd00::11": "0x00100000"}
    assert content.reject[Family.IPV4] == {"10.1.0.1"}


def test_content_parsed_from_the_layout_before_slot_sets() -> None:
    """A table of the verdict-map layout (before an upgrade) is read with its marks, so
    that the recreate after the upgrade flushes no marked source's flows."""
    document = {
        "nftables": [
            {
                "map": {
                    "name": "mark4",
                    "type": "ipv4_addr",
                    "map": "verdict",
                    "elem": [
                        ["10.244.1.11", {"jump": {"target": "fwmark_00100000"}}],
                        ["10.244.1.12", {"jump": {"target": "other"}}],
                    ],
                }
            },
            {"chain": {"name": "fwmark_00100000"}},
        ]
    }
    table = ActualTable.parse(document)
    assert table.content().mark[Family.IPV4] == {"10.244.1.11": SLOT1}
    assert table.map_members("mark4") == {}
    state = node_state(
        service("mark", egress(Family.IPV4, Action.MARK, "10.244.1.11", fwmark=SLOT1))
    )
    problems = differences(table, content_of(state), MASK, "icmpx admin-prohibited", {})
    assert "map mark4 is SetSpec(kind='map', type='ipv4_addr', map='verdict', flags=()" in (
        " ".join(problems)
    )
    assert "unexpected chain fwmark_00100000" in problems


def test_reject_with_is_validated() -> None:
    with pytest.raises(ValueError, match="reject_with"):
        NftablesBackend(reject_with="tcp reset; flush ruleset")


# --- kernel: the table in a namespace ---------------------------------------------------


def listing(ns: str) -> dict[str, Any]:
    """``nft -j list table inet metaleg`` in ``ns``, by the nft binary (independent of us)."""
    document = json.loads(sh("nft", "-j", "list", "table", "inet", "metaleg", netns=ns))
    assert isinstance(document, dict)
    return document


def table_exists(ns: str) -> bool:
    return "table inet metaleg" in sh("nft", "list", "tables", netns=ns)


def objects(document: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {
        item[kind].get("name", str(item[kind].get("handle"))): item[kind]
        for item in document["nftables"]
        if kind in item
    }


def rules_of(document: dict[str, Any], chain: str) -> list[dict[str, Any]]:
    return [
        item["rule"]
        for item in document["nftables"]
        if "rule" in item and item["rule"]["chain"] == chain
    ]


def elements(document: dict[str, Any], name: str) -> Any:
    sets = objects(document, "set") | objects(document, "map")
    return sets[name].get("elem", [])


def _apply_all(*states: NodeDesiredState, resync_first: bool = True) -> list[int]:
    """In the namespace: resync with the first state, apply the rest; transactions after each."""
    backend = NftablesBackend()
    counts = []
    try:
        if resync_first:
            backend.resync(states[0])
            counts.append(backend.transactions)
            states = states[1:]
        for state in states:
            backend.apply(state)
            counts.append(backend.transactions)
    finally:
        backend.close()
    return counts


def _resync(state: NodeDesiredState) -> int:
    backend = NftablesBackend()
    try:
        backend.resync(state)
        backend.resync(state)  # the second compares: nothing to do
        return backend.transactions
    finally:
        backend.close()


def _cleanup_twice() -> None:
    backend = NftablesBackend()
    try:
        backend.cleanup()
        backend.cleanup()
    finally:
        backend.close()


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace("mlnf") as name:
        yield name


@pytest.mark.netns
def test_dual_stack_apply_lists_as_designed(ns: str) -> None:
    counts = run_in_netns(ns, _apply_all, dual_stack_state(), dual_stack_state())
    assert counts == [1, 1], "a second identical apply must not touch the kernel"
    document = listing(ns)
    chains = objects(document, "chain")
    assert {n: (c.get("type"), c.get("hook"), c.get("prio")) for n, c in chains.items()} == {
        "prerouting": ("filter", "prerouting", -160),
        "postrouting": ("nat", "postrouting", 90),
        "egress": ("filter", "postrouting", 110),
        "forward": ("filter", "forward", -10),
        "fwmark": (None, None, None),
        "stray_reply": (None, None, None),
    }
    assert set(objects(document, "set")) == {
        *(
            f"{name}{n}"
            for name in ("exclude", "reject", "transit", "policed_dst", "dst", "policed_port")
            for n in (4, 6)
        ),
        *(f"{name}{n}" for name in ("port", "count") for n in (4, 6)),
        *(f"mark{n}_{slot:08x}" for n in (4, 6) for slot in (SLOT1, SLOT2)),
    }
    assert sorted(elements(document, "snat4")) == [
        ["10.244.1.10", "198.51.100.200"],
        ["10.244.1.20", "198.51.100.200"],
    ]
    assert elements(document, "snat6") == [["fd00:1::10", "2001:db8:1::200"]]
    assert sorted(elements(document, "mark4")) == [["10.244.1.11", SLOT1], ["10.244.1.21", SLOT2]]
    assert elements(document, "mark6") == [["fd00:1::11", SLOT1]]
    assert elements(document, "mark4_00100000") == ["10.244.1.11"]
    assert elements(document, "mark4_00200000") == ["10.244.1.21"]
    assert elements(document, "mark6_00100000") == ["fd00:1::11"]
    assert elements(document, "mark6_00200000") == []
    assert elements(document, "reject4") == ["10.244.1.12"]
    assert elements(document, "reject6") == ["fd00:1::12"]
    assert {json.dumps(e, sort_keys=True) for e in elements(document, "exclude6")} == {
        json.dumps({"prefix": {"addr": a, "len": n}}, sort_keys=True)
        for a, n in (("fc00::", 7), ("fe80::", 10))
    }
    text = sh("nft", "list", "table", "inet", "metaleg", netns=ns)
    for expected in (
        "ip saddr @mark4 jump fwmark",
        "ip6 saddr @mark6 jump fwmark",
        "ip saddr @mark4_00100000 meta mark set meta mark & 0xff",
        "ip6 saddr @mark6_00200000 meta mark set meta mark & 0xff",
        "meta mark & 0x00f00000 != 0x00000000 snat ip to ip saddr",
        "meta mark & 0x00f00000 != 0x00000000 snat ip6 to ip6 saddr",
        "snat ip to ip saddr map @snat4",
        "snat ip6 to ip6 saddr map @snat6",
        "ip saddr @reject4 reject with icmpx admin-prohibited",
        "ip6 daddr @exclude6 return",
        "ct state new ip saddr @transit4 meta mark & 0x00f00000 == 0x00000000 "
        "ip saddr != @snat4 reject with icmpx admin-prohibited",
        "ct state new ip6 saddr @transit6 meta mark & 0x00f00000 == 0x00000000 "
        "ip6 saddr != @snat6 reject with icmpx admin-prohibited",
    ):
        assert expected in text
    # Host prefixes are listed as plain addresses.
    assert elements(document, "transit4") == [
        {"prefix": {"addr": "10.244.2.0", "len": 23}},
        "10.250.0.7",
    ]
    assert ActualTable.parse(document).content().transit == {
        Family.IPV4: {"10.244.2.0/23", "10.250.0.7/32"},
        Family.IPV6: {"fd00:2::/63"},
    }
    assert "vmap" not in text
    assert len(rules_of(document, "prerouting")) == 8
    assert len(rules_of(document, "fwmark")) == 4
    assert len(rules_of(document, "postrouting")) == 10
    assert len(rules_of(document, "forward")) == 13
    assert len(rules_of(document, "stray_reply")) == 10
    assert len(rules_of(document, "egress")) == 12
    assert all(r.get("comment", "").startswith("metaleg:") for r in rules_of(document, "forward"))


@pytest.mark.netns
def test_incremental_change_keeps_the_table(ns: str) -> None:
    changed = node_state(
        service(
            "snat",
            egress(Family.IPV4, Action.SNAT, "10.244.1.10", snat_ip="198.51.100.201"),
            egress(Family.IPV6, Action.SNAT, "fd00:1::10", "fd00:1::20", snat_ip="2001:db8:1::200"),
        ),
        service("mark3", egress(Family.IPV4, Action.MARK, "10.244.1.30", fwmark=SLOT3)),
        exclude4=("10.0.0.0/8",),
    )
    run_in_netns(ns, _apply_all, dual_stack_state())
    handle = objects(listing(ns), "table")["metaleg"]["handle"]
    counts = run_in_netns(ns, _apply_all, dual_stack_state(), changed, changed)
    # resync in a fresh process recreates once; the change is one more transaction; the
    # repeated state none.
    assert counts == [1, 2, 2]
    document = listing(ns)
    assert objects(document, "table")["metaleg"]["handle"] != handle  # the resync recreated
    content = ActualTable.parse(document).content()
    assert content.snat[Family.IPV4] == {"10.244.1.10": "198.51.100.201"}
    assert content.snat[Family.IPV6] == {
        "fd00:1::10": "2001:db8:1::200",
        "fd00:1::20": "2001:db8:1::200",
    }
    assert content.mark[Family.IPV4] == {"10.244.1.30": SLOT3}
    assert content.mark[Family.IPV6] == {}
    assert content.reject == {Family.IPV4: set(), Family.IPV6: set()}
    assert content.exclude[Family.IPV4] == {"10.0.0.0/8"}
    assert set(objects(document, "chain")) == {
        "prerouting",
        "postrouting",
        "forward",
        "egress",
        "fwmark",
        "stray_reply",
    }
    assert {n for n in objects(document, "set") if n.startswith("mark")} == {
        "mark4_00300000",
        "mark6_00300000",
    }
    # Within one backend, a change is incremental: the table (handle) stays.
    run_in_netns(ns, _incremental_then_check, changed, dual_stack_state())


def _incremental_then_check(first: NodeDesiredState, second: NodeDesiredState) -> None:
    backend = NftablesBackend()
    try:
        backend.resync(first)
        before = backend.nft.json("list table inet metaleg", terse=True)
        backend.apply(second)
        after = backend.nft.json("list table inet metaleg", terse=True)
        handle = [i["table"]["handle"] for i in before["nftables"] if "table" in i]
        assert handle == [i["table"]["handle"] for i in after["nftables"] if "table" in i]
        assert backend.transactions == 2
        assert ActualTable.parse(backend.nft.json("list table inet metaleg")).content() == (
            content_of(second)
        )
    finally:
        backend.close()


@pytest.mark.netns
def test_incremental_transit_guard_change(ns: str) -> None:
    """Guard elements change in place (one transaction, same table), overlaps and all."""
    first = dual_stack_state()
    second = NodeDesiredState(
        first.node,
        first.fwmask,
        first.exclude_dst_ipv4,
        first.exclude_dst_ipv6,
        first.services,
        transit_guard_ipv4=("10.244.2.0/24", "10.244.2.128/25", "10.244.4.0/24", "10.250.0.8/32"),
        transit_guard_ipv6=(),
    )
    run_in_netns(ns, _incremental_then_check, first, second)
    assert ActualTable.parse(listing(ns)).content().transit == {
        Family.IPV4: {"10.244.2.0/24", "10.244.4.0/24", "10.250.0.8/32"},
        Family.IPV6: set(),
    }
    run_in_netns(ns, _incremental_then_check, second, first)


@pytest.mark.netns
def test_resync_recreates_a_deleted_table(ns: str) -> None:
    run_in_netns(ns, _apply_all, dual_stack_state())
    sh("nft", "delete", "table", "inet", "metaleg", netns=ns)
    assert not table_exists(ns)
    assert run_in_netns(ns, _resync, dual_stack_state()) == 1
    assert ActualTable.parse(listing(ns)).content() == content_of(dual_stack_state())


def _resync_repairs(state: NodeDesiredState, tampering: list[list[str]]) -> None:
    """Resync, tamper with the table (nft binary, same namespace), resync again."""
    backend = NftablesBackend()
    try:
        backend.resync(state)
        assert backend.transactions == 1
        backend.resync(state)
        assert backend.transactions == 1, "an intact table must not be rewritten"
        for command in tampering:
            subprocess.run(["nft", *command], check=True, capture_output=True)
        backend.resync(state)
        assert backend.transactions == 2, f"{tampering} was not repaired"
        backend.resync(state)
        assert backend.transactions == 2
    finally:
        backend.close()


TAMPERING = {
    "set element added": [["add", "element", "inet", "metaleg", "snat4", "{ 10.9.9.9 : 1.1.1.1 }"]],
    "set element removed": [["delete", "element", "inet", "metaleg", "reject4", "{ 10.244.1.12 }"]],
    "exclude changed": [["add", "element", "inet", "metaleg", "exclude4", "{ 1.0.0.0/8 }"]],
    "transit element added": [
        ["add", "element", "inet", "metaleg", "transit4", "{ 10.9.0.0/16 }"],
    ],
    "transit element removed": [
        ["delete", "element", "inet", "metaleg", "transit4", "{ 10.250.0.7 }"],
    ],
    "transit set flushed": [["flush", "set", "inet", "metaleg", "transit6"]],
    "foreign rule": [["insert", "rule", "inet", "metaleg", "forward", "accept"]],
    "rule deleted": [["flush", "chain", "inet", "metaleg", "fwmark"]],
    "foreign rule appended": [
        ["add", "rule", "inet", "metaleg", "forward", "ip", "saddr", "@reject4", "accept"],
    ],
    "foreign set": [["add", "set", "inet", "metaleg", "extra", "{ type ipv4_addr; }"]],
    "chain deleted": [
        ["flush", "chain", "inet", "metaleg", "prerouting"],
        ["delete", "chain", "inet", "metaleg", "prerouting"],
    ],
    "slot set deleted": [
        ["flush", "chain", "inet", "metaleg", "fwmark"],
        ["delete", "set", "inet", "metaleg", "mark4_00200000"],
    ],
    "slot element moved": [
        ["delete", "element", "inet", "metaleg", "mark4_00200000", "{ 10.244.1.21 }"],
        ["add", "element", "inet", "metaleg", "mark4_00100000", "{ 10.244.1.21 }"],
    ],
    "slot element added": [
        ["add", "element", "inet", "metaleg", "mark6_00200000", "{ fd00:1::11 }"],
    ],
    "aggregate element removed": [
        ["delete", "element", "inet", "metaleg", "mark4", "{ 10.244.1.21 }"],
    ],
    "aggregate element swapped": [
        ["delete", "element", "inet", "metaleg", "mark4", "{ 10.244.1.21 }"],
        ["add", "element", "inet", "metaleg", "mark4", "{ 10.244.9.9 : 0x00200000 }"],
    ],
    "aggregate value changed": [
        ["delete", "element", "inet", "metaleg", "mark6", "{ fd00:1::11 }"],
        ["add", "element", "inet", "metaleg", "mark6", "{ fd00:1::11 : 0x00200000 }"],
    ],
    "table dormant": [["add", "table", "inet", "metaleg", "{ flags dormant; }"]],
}


@pytest.mark.netns
@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_resync_repairs_tampering(ns: str, case: str) -> None:
    run_in_netns(ns, _resync_repairs, dual_stack_state(), TAMPERING[case])
    assert ActualTable.parse(listing(ns)).content() == content_of(dual_stack_state())


def _resync_reads(state: NodeDesiredState, tampering: list[list[str]], fork: bool) -> list[str]:
    """Resync three times (fresh, intact, tampered): where the table was read each time.

    ``fork=False``: the child cannot be forked (the backend then compares in process)."""
    from metaleg import lifecycle
    from metaleg.firewall.nftables import backend as nftables_backend

    reads: list[str] = []
    read_here = NftablesBackend._read_table

    def counted_read(backend: NftablesBackend) -> ActualTable | None:
        reads.append("here")
        return read_here(backend)

    def counted_check(check: Any, *, timeout: float) -> bool:
        reads.append("child")
        if not fork:
            raise lifecycle.ForkedCheckError("cannot fork: [Errno 12] Cannot allocate memory")
        return lifecycle.check_in_child(check, timeout=timeout)

    NftablesBackend._read_table = counted_read  # type: ignore[method-assign]
    nftables_backend.check_in_child = counted_check  # type: ignore[assignment]
    backend = NftablesBackend()
    try:
        backend.resync(state)
        reads.append("|")
        backend.resync(state)
        reads.append("|")
        for command in tampering:
            subprocess.run(["nft", *command], check=True, capture_output=True)
        backend.resync(state)
        assert backend.transactions == 2, "the tampered table was not repaired"
    finally:
        backend.close()
    return reads


@pytest.mark.netns
def test_periodic_resync_reads_the_table_in_a_child(ns: str) -> None:
    """The listing's peak memory must not stay with the firewall process: an intact table
    is read and compared by a forked child only; a differing one is read again here, to
    know what to repair."""
    tampering = TAMPERING["set element added"]
    reads = run_in_netns(ns, _resync_reads, dual_stack_state(), tampering, True)
    # fresh process: read here (recreated once) | intact: child only | tampered: both
    assert reads == ["here", "|", "child", "|", "child", "here"]
    assert ActualTable.parse(listing(ns)).content() == content_of(dual_stack_state())


@pytest.mark.netns
def test_periodic_resync_compares_in_process_when_it_cannot_fork(ns: str) -> None:
    tampering = TAMPERING["foreign rule"]
    reads = run_in_netns(ns, _resync_reads, dual_stack_state(), tampering, False)
    assert reads == ["here", "|", "child", "here", "|", "child", "here"]
    assert ActualTable.parse(listing(ns)).content() == content_of(dual_stack_state())


@pytest.mark.netns
def test_adjacent_and_overlapping_exclusions_are_stable(ns: str) -> None:
    """Interval sets refuse overlaps and may list adjacent prefixes merged: the canonical
    form must survive the round trip, or every re-sync would rewrite the table."""
    state = node_state(
        exclude4=("11.0.0.0/8", "12.0.0.0/8", "1.0.0.0/24", "1.0.1.0/24", "1.0.0.128/25"),
        transit4=("10.244.0.0/24", "10.244.1.0/24", "10.244.0.9/32", "10.250.0.7/32"),
        transit6=("fd00:2::/64", "fd00:2:0:1::/64", "fd00:2::9/128"),
    )
    assert run_in_netns(ns, _resync, state) == 1
    content = ActualTable.parse(listing(ns)).content()
    assert content.exclude[Family.IPV4] == {"1.0.0.0/23", "11.0.0.0/8", "12.0.0.0/8"}
    assert content.transit == {
        Family.IPV4: {"10.244.0.0/23", "10.250.0.7/32"},
        Family.IPV6: {"fd00:2::/63"},
    }


def _apply_after_table_vanished(first: NodeDesiredState, second: NodeDesiredState) -> int:
    backend = NftablesBackend()
    try:
        backend.resync(first)
        subprocess.run(["nft", "delete", "table", "inet", "metaleg"], check=True)
        backend.apply(second)  # the incremental batch fails; a full recreate follows
        return backend.transactions
    finally:
        backend.close()


@pytest.mark.netns
def test_apply_recreates_when_the_incremental_batch_fails(ns: str) -> None:
    second = node_state(
        service("mark3", egress(Family.IPV4, Action.MARK, "10.1.0.3", fwmark=SLOT3))
    )
    assert run_in_netns(ns, _apply_after_table_vanished, dual_stack_state(), second) == 2
    assert ActualTable.parse(listing(ns)).content() == content_of(second)


def _replace_rule_keeping_comment() -> None:
    backend = NftablesBackend()
    state = dual_stack_state()
    try:
        backend.resync(state)
        document = backend.nft.json("list table inet metaleg")
        rule = next(
            i["rule"]
            for i in document["nftables"]
            if "rule" in i and i["rule"]["chain"] == "forward" and "reject" in json.dumps(i)
        )
        # Same comment, other expression: only the recorded expressions can catch this.
        backend.nft.run(
            f"replace rule inet metaleg forward handle {rule['handle']} ip saddr @reject4 "
            f'accept comment "{rule["comment"]}"'
        )
        backend.resync(state)
        assert backend.transactions == 2
        text = backend.nft.run("list chain inet metaleg forward")
        assert "ip saddr @reject4 reject" in text
    finally:
        backend.close()


@pytest.mark.netns
def test_resync_catches_a_rule_replaced_under_our_comment(ns: str) -> None:
    run_in_netns(ns, _replace_rule_keeping_comment)


@pytest.mark.netns
def test_cleanup_is_idempotent_and_only_touches_our_table(ns: str) -> None:
    sh("nft", "add", "table", "inet", "other", netns=ns)
    run_in_netns(ns, _cleanup_twice)  # nothing there yet
    run_in_netns(ns, _apply_all, dual_stack_state())
    assert table_exists(ns)
    run_in_netns(ns, _cleanup_twice)
    assert not table_exists(ns)
    assert "table inet other" in sh("nft", "list", "tables", netns=ns)


def _apply_state_then_fail(state: NodeDesiredState) -> str:
    backend = NftablesBackend()
    try:
        backend.resync(state)
        bad = node_state(service("bad", egress(Family.IPV4, Action.MARK, "10.1.0.1")))
        try:
            backend.apply(bad)
        except BackendError as error:
            return str(error)
        raise AssertionError("a bad state was accepted")
    finally:
        backend.close()


@pytest.mark.netns
def test_a_failed_apply_leaves_the_previous_table(ns: str) -> None:
    message = run_in_netns(ns, _apply_state_then_fail, dual_stack_state())
    assert "service ns/bad" in message
    assert ActualTable.parse(listing(ns)).content() == content_of(dual_stack_state())


def _measure() -> dict[str, float]:
    backend = NftablesBackend()
    big, shifted = big_state(), big_state()
    # One IP of one Service replaced by another.
    first = shifted.services[0]
    entry = first.families[0]
    moved = FamilyEgress(
        entry.family,
        entry.action,
        (*entry.source_ips[:-1], "10.200.0.1"),
        snat_ip=entry.snat_ip,
        fwmark=entry.fwmark,
    )
    shifted = NodeDesiredState(
        big.node,
        big.fwmask,
        big.exclude_dst_ipv4,
        big.exclude_dst_ipv6,
        (
            ServiceEgress(
                first.namespace,
                first.name,
                first.role,
                first.gateway_node,
                first.lb_ips,
                (moved, *first.families[1:]),
            ),
            *big.services[1:],
        ),
    )
    try:
        started = time.monotonic()
        backend.resync(big)
        full = time.monotonic() - started
        full_nft = backend.last_duration
        full_chars = backend.last_script_chars
        started = time.monotonic()
        backend.apply(shifted)
        incremental = time.monotonic() - started
        incremental_nft = backend.last_duration
        incremental_chars = backend.last_script_chars
        started = time.monotonic()
        backend.resync(shifted)
        compare = time.monotonic() - started
        assert backend.transactions == 2
        return {
            "full": full,
            "full_nft": full_nft,
            "incremental": incremental,
            "incremental_nft": incremental_nft,
            "resync_compare": compare,
            "full_chars": full_chars,
            "incremental_chars": incremental_chars,
        }
    finally:
        backend.close()


@pytest.mark.netns
def test_scale_1000_services_of_10_ips_dual_stack(ns: str) -> None:
    figures = run_in_netns(ns, _measure)
    print("nftables apply times (s):", {k: round(v, 4) for k, v in figures.items()})
    document = listing(ns)
    assert len(elements(document, "snat4")) == 3340
    assert len(elements(document, "mark6")) == 3330
    assert sum(len(rules_of(document, c)) for c in objects(document, "chain")) == 53 + 2 * 5
    # Times are printed, not asserted (bench.apply_scale measures them); what is asserted is that
    # one replaced IP costs a transaction of a few commands, not one of the table's size.
    assert figures["full_chars"] > 100_000
    assert figures["incremental_chars"] < 1000


# --- packets ----------------------------------------------------------------------------


def _count_marked(expected_mark: int) -> int:
    """Packets the probe table counted with exactly ``expected_mark`` after our prerouting."""
    document = json.loads(
        subprocess.run(
            ["nft", "-j", "list", "chain", "inet", "probe", "after"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    for item in document["nftables"]:
        rule = item.get("rule")
        if rule and str(expected_mark) in json.dumps(rule["expr"]):
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError(f"no counter for mark {expected_mark:#x}")


@pytest.fixture
def topology() -> Iterator[dict[str, str]]:
    """pod -- node -- peer. The node forwards, masquerades pod traffic like kube-router
    (iptables-nft), and has a probe table that pre-sets mark 0x5 and counts marks after ours."""
    with namespace("mlnf") as pod, namespace("mlnf") as node, namespace("mlnf") as peer:
        link(
            node, "vpod", ("10.244.1.1/24", "fd00:1::1/64"), pod, ("10.244.1.2/24", "fd00:1::2/64")
        )
        link(
            node,
            "vup",
            ("203.0.113.1/24", "2001:db8:113::1/64", "10.99.0.1/24"),
            peer,
            ("203.0.113.2/24", "2001:db8:113::2/64", "10.99.0.2/24"),
        )
        for last in (10, 11, 12, 13):
            add_addresses(pod, "eth0", f"10.244.1.{last}/24", f"fd00:1::{last}/64")
        route(pod, "default", "10.244.1.1")
        route(pod, "default", "fd00:1::1")
        # The peer routes pod addresses back via the node (to see un-NATed sources).
        route(peer, "10.244.1.0/24", "203.0.113.1")
        route(peer, "fd00:1::/64", "2001:db8:113::1")
        # MetalLB L2 stand-in: the LB IPs are reached via the node.
        route(peer, "203.0.113.100/31", "203.0.113.1")
        route(peer, "2001:db8:113::100/127", "2001:db8:113::1")
        forward(node)
        masquerade(node, "10.244.1.0/24", "10.0.0.0/8", "nft")
        masquerade(node, "fd00:1::/64", "fc00::/7", "nft")
        probe = textwrap.dedent(
            """
            table inet probe {
                chain before {
                    type filter hook prerouting priority mangle - 20; policy accept;
                    iifname "vpod" meta mark set 0x5
                }
                chain after {
                    type filter hook forward priority filter - 20; policy accept;
                    meta mark 0x00100005 counter
                    meta mark 0x00000005 counter
                }
            }
            """
        )
        subprocess.run(
            ["ip", "netns", "exec", node, "nft", "-f", "-"], input=probe, text=True, check=True
        )
        addresses = ("203.0.113.2", "10.99.0.2", "2001:db8:113::2")
        with script_in(peer, SERVER, *addresses, ready_line=True):
            yield {"pod": pod, "node": node, "peer": peer}


def packet_state(lb4: str = "203.0.113.100", lb6: str = "2001:db8:113::100") -> NodeDesiredState:
    return node_state(
        service(
            "snat",
            egress(Family.IPV4, Action.SNAT, "10.244.1.10", snat_ip=lb4),
            egress(Family.IPV6, Action.SNAT, "fd00:1::10", snat_ip=lb6),
        ),
        service(
            "reject",
            egress(Family.IPV4, Action.REJECT, "10.244.1.11"),
            egress(Family.IPV6, Action.REJECT, "fd00:1::11"),
        ),
        service(
            "mark",
            egress(Family.IPV4, Action.MARK, "10.244.1.12", fwmark=SLOT1),
            egress(Family.IPV6, Action.MARK, "fd00:1::12", fwmark=SLOT1),
        ),
    )


def _backend_apply(state: NodeDesiredState) -> None:
    """A fresh firewall worker's first re-sync (the backend and its conntrack deletions)."""
    firewall = ManagedFirewall(NftablesBackend(), None, None)
    try:
        firewall.resync(state)
    finally:
        firewall.close()


def _backend_change(old: NodeDesiredState, new: NodeDesiredState) -> None:
    firewall = ManagedFirewall(NftablesBackend(), None, None)
    try:
        firewall.resync(old)
        firewall.apply(new)
    finally:
        firewall.close()


@pytest.mark.netns
def test_packets_take_the_designed_paths(topology: dict[str, str]) -> None:
    pod, node = topology["pod"], topology["node"]

    def probe(source: str, destination: str, sport: int = 40000) -> str:
        return run_in_netns(pod, _udp_probe, source, destination, sport, timeout=10)

    # Before metaleg: everything is masqueraded by the node.
    assert probe("10.244.1.10", "203.0.113.2") == "203.0.113.1"
    run_in_netns(node, _backend_apply, packet_state())
    cases = {
        # SNAT source leaves with the LB IP, winning over the masquerade.
        ("10.244.1.10", "203.0.113.2"): "203.0.113.100",
        ("fd00:1::10", "2001:db8:113::2"): "2001:db8:113::100",
        # Marked source keeps its pod IP (null binding beats the masquerade).
        ("10.244.1.12", "203.0.113.2"): "10.244.1.12",
        ("fd00:1::12", "2001:db8:113::2"): "fd00:1::12",
        # Unlabelled source: masqueraded as before.
        ("10.244.1.13", "203.0.113.2"): "203.0.113.1",
        ("fd00:1::13", "2001:db8:113::2"): "2001:db8:113::1",
        # Excluded destination: not ours (and the test masquerade skips 10/8 too).
        ("10.244.1.10", "10.99.0.2"): "10.244.1.10",
        ("10.244.1.11", "10.99.0.2"): "10.244.1.11",
    }
    for (source, destination), seen in cases.items():
        assert probe(source, destination, 40001) == seen, (source, destination)
    # REJECT source: an ICMP error comes back at once (admin-prohibited).
    assert probe("10.244.1.11", "203.0.113.2") == "rejected:EHOSTUNREACH"
    assert probe("fd00:1::11", "2001:db8:113::2") == "rejected:EACCES"
    # The mark went into FIREWALL_MASK and kept the bits outside it (0x5 set before us).
    assert run_in_netns(node, _count_marked, 0x00100005) >= 2
    # The first flow (sport 40000) was masqueraded before metaleg existed; the
    # backend's first resync deleted its conntrack entry, so it now gets the LB IP.
    assert probe("10.244.1.10", "203.0.113.2", 40000) == "203.0.113.100"
    # The LB IP changes: the existing flow follows (its entry is flushed), and
    # the marked source's flow is left alone.
    marked_flows = conntrack_ids(node, "10.244.1.12")
    assert marked_flows
    run_in_netns(node, _backend_change, packet_state(), packet_state(lb4="203.0.113.101"))
    assert probe("10.244.1.10", "203.0.113.2", 40000) == "203.0.113.101"
    assert conntrack_ids(node, "10.244.1.12") == marked_flows


def conntrack_ids(ns: str, source: str) -> set[str]:
    """The ids of the conntrack entries from ``source`` (the conntrack binary, independent of us)."""
    output = sh("conntrack", "-L", "-s", source, "-o", "id", netns=ns)
    return {word for word in output.split() if word.startswith("id=")}


def guarded_state(*, snat: bool = True) -> NodeDesiredState:
    """:func:`packet_state` with the pod's sources in the transit guard (as if another
    node's pods), optionally without the SNAT Service."""
    state = packet_state()
    return NodeDesiredState(
        state.node,
        state.fwmask,
        state.exclude_dst_ipv4,
        state.exclude_dst_ipv6,
        tuple(s for s in state.services if snat or s.name != "snat"),
        transit_guard_ipv4=("10.244.0.0/16",),
        transit_guard_ipv6=("fd00:1::/64",),
    )


@pytest.mark.netns
def test_transit_guard_rejects_only_new_connections_it_would_leak(
    topology: dict[str, str],
) -> None:
    pod, node = topology["pod"], topology["node"]

    def probe(source: str, destination: str, sport: int = 41000) -> str:
        return run_in_netns(pod, _udp_probe, source, destination, sport, timeout=10)

    # Flows that exist before the guard appears (masqueraded by the node).
    assert probe("10.244.1.13", "203.0.113.2", 41000) == "203.0.113.1"
    assert probe("fd00:1::13", "2001:db8:113::2", 41000) == "2001:db8:113::1"
    established = conntrack_ids(node, "10.244.1.13")
    run_in_netns(node, _backend_change, packet_state(), guarded_state())
    cases = {
        # Neither SNATed nor marked here: a new connection would leave masqueraded.
        ("10.244.1.13", "203.0.113.2"): "rejected:EHOSTUNREACH",
        ("fd00:1::13", "2001:db8:113::2"): "rejected:EACCES",
        # SNATed here: passes with the LB IP.
        ("10.244.1.10", "203.0.113.2"): "203.0.113.100",
        ("fd00:1::10", "2001:db8:113::2"): "2001:db8:113::100",
        # Marked here (forwarded to a gateway): passes with its own address.
        ("10.244.1.12", "203.0.113.2"): "10.244.1.12",
        ("fd00:1::12", "2001:db8:113::2"): "fd00:1::12",
        # Excluded destination: not the guard's business.
        ("10.244.1.13", "10.99.0.2"): "10.244.1.13",
    }
    for (source, destination), seen in cases.items():
        assert probe(source, destination, 41001) == seen, (source, destination)
    # The established flows go on (the guard only looks at new connections, and
    # adding it flushed no conntrack entries).
    assert probe("10.244.1.13", "203.0.113.2", 41000) == "203.0.113.1"
    assert probe("fd00:1::13", "2001:db8:113::2", 41000) == "2001:db8:113::1"
    assert established <= conntrack_ids(node, "10.244.1.13")
    # The SNAT goes away (the gateway moved): its flow's binding is flushed and the
    # flow, new again, is now rejected instead of leaking with the node's address.
    run_in_netns(node, _backend_change, guarded_state(), guarded_state(snat=False))
    assert probe("10.244.1.10", "203.0.113.2", 41001) == "rejected:EHOSTUNREACH"
    assert probe("fd00:1::10", "2001:db8:113::2", 41001) == "rejected:EACCES"


STRAY_PEER = textwrap.dedent(
    """
    import socket, sys
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "send":
            s.sendto(b"stray", (words[1], int(words[2])))
            print("sent", flush=True)
        else:  # "recv": the source of the next datagram within a second, or "none"
            s.settimeout(1.0)
            try:
                print(s.recvfrom(100)[1][0], flush=True)
            except TimeoutError:
                print("none", flush=True)
    """
)


@pytest.mark.netns
@pytest.mark.parametrize(
    ("pod_ip", "control", "peer_ip", "lb_ip"),
    [
        ("10.244.1.10", "10.244.1.13", "203.0.113.2", "203.0.113.100"),
        ("fd00:1::10", "fd00:1::13", "2001:db8:113::2", "2001:db8:113::100"),
    ],
)
def test_stray_replies_open_no_flow_and_reply_direction_is_checked(
    topology: dict[str, str], pod_ip: str, control: str, peer_ip: str, lb_ip: str
) -> None:
    """After a gateway move, the old gateway can forward a peer's answer, translated
    back to the pod IP, to a node that has just deleted the flow's entry. It must
    not open an entry in which the pod's packets are replies (no NAT, pod IP out)."""
    pod, node, peer = topology["pod"], topology["node"], topology["peer"]
    with script_in(
        peer, STRAY_PEER, peer_ip, "7777", ready_line=True, stdin=subprocess.PIPE
    ) as host:

        def ask(command: str) -> str:
            assert host.stdin is not None and host.stdout is not None
            host.stdin.write(command + "\n")
            host.stdin.flush()
            return host.stdout.readline().strip()

        def pod_sends() -> str:
            run_in_netns(pod, _udp_send, pod_ip, 40100, peer_ip, 7777, timeout=10)
            return ask("recv")

        def reversed_entries() -> str:
            return sh("conntrack", "-L", "-s", peer_ip, "-d", pod_ip, netns=node)

        # Resolve the neighbours first: a stray queued behind neighbour discovery
        # would reach the pod after the pod's packet below and confuse the check.
        sh("ping", "-c1", "-W2", "-I", pod_ip, peer_ip, netns=pod)
        # Without metaleg: the stray opens an entry from the peer, and the pod's
        # packets, replies in it, leave with the pod IP (nobody NATs replies).
        assert ask(f"send {pod_ip} 40100") == "sent"
        assert "dport=40100" in reversed_entries()
        assert pod_sends() == pod_ip
        # metaleg SNATs the pod now: the egress check drops its replies too (the
        # reversed entry is no flow of the pod's; it lives until it expires).
        run_in_netns(node, _backend_apply, packet_state())
        assert pod_sends() == "none"
        sh("conntrack", "-D", "-s", peer_ip, "-d", pod_ip, netns=node, check=False)
        # A new stray is dropped before it opens an entry, so the pod's next
        # packet opens its own flow, SNATed to the LB IP.
        assert ask(f"send {pod_ip} 40100") == "sent"
        # A control packet right behind it, to an unlabelled pod address, takes the
        # same path: once its entry shows, the stray has been through the node.
        assert ask(f"send {control} 40100") == "sent"
        wait_until(
            lambda: sh("conntrack", "-L", "-d", control, netns=node),
            timeout=5,
            interval=0.02,
            message="the control packet's conntrack entry on the node",
            accept=lambda entries: "dport=40100" in entries,
        )
        assert "dport=40100" not in reversed_entries()
        assert pod_sends() == lb_ip
