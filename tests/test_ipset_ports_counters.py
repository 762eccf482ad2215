"""ipset pieces of the iptables backend's policies and counters: ``hash:ip,port`` members as
runs of ports, member counters read fast, sets given new extensions in place."""

from __future__ import annotations

import socket
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metaleg.firewall.iptables.ipsets import (
    HASH_IP,
    HASH_IP_PORT_KIND,
    IpsetClient,
    SetPlan,
    SetSpec,
    plan_sets,
)
from metaleg.firewall.wire.ipset_counters import IpsetCounterReader
from metaleg.firewall.wire.ipset_members import (
    ATTR_BYTES,
    ATTR_DATA,
    ATTR_IP,
    ATTR_IPADDR_IPV4,
    ATTR_PACKETS,
    MemberDecoder,
)
from metaleg.firewall.wire.ipset_ports import (
    merge_runs,
    parse_port_member,
    port_run_changes,
    port_runs,
)
from metaleg.firewall.wire.nfnetlink import NLA_F_NET_BYTEORDER, attr, nested
from metaleg.model import Family
from tests.netns import namespace, run_in_netns

# --- runs of ports ------------------------------------------------------------------------


def ports_of(members: frozenset[str]) -> set[tuple[str, str, int]]:
    """Every (address, protocol, port) the members hold."""
    result = set()
    for member in members:
        address, protocol, first, last = parse_port_member(member)
        result.update((address, protocol, port) for port in range(first, last + 1))
    return result


runs = st.lists(
    st.tuples(
        st.sampled_from(["10.0.0.1", "fd00::1"]),
        st.sampled_from(["tcp", "udp"]),
        st.integers(1, 40),
        st.integers(0, 6),
    ).map(lambda t: f"{t[0]},{t[1]}:{t[2]}" if not t[3] else f"{t[0]},{t[1]}:{t[2]}-{t[2] + t[3]}"),
    max_size=8,
)


@given(runs, runs)
def test_run_changes_take_one_set_of_ports_to_another(before: list[str], after: list[str]) -> None:
    current, desired = port_runs(before), port_runs(after)
    gained, lost = port_run_changes(current, desired)
    assert ports_of(gained) == ports_of(desired) - ports_of(current)
    assert ports_of(lost) == ports_of(current) - ports_of(desired)
    # Canonical: the same ports are always written the same runs.
    assert port_runs(ports_text(desired)) == desired


def ports_text(members: frozenset[str]) -> list[str]:
    return [f"{address},{protocol}:{port}" for address, protocol, port in ports_of(members)]


def test_runs_merge_and_plans_change_only_the_ports_that_differ() -> None:
    assert merge_runs([(5, 9), (1, 3), (4, 4), (20, 22)]) == [(1, 9), (20, 22)]
    current = SetSpec("P", HASH_IP_PORT_KIND, Family.IPV4, frozenset({"10.0.0.1,tcp:8000-8100"}))
    desired = SetSpec("P", HASH_IP_PORT_KIND, Family.IPV4, frozenset({"10.0.0.1,tcp:8050-8200"}))
    plan = plan_sets({"P": current}, {"P": desired})
    assert [(spec.name, members) for spec, members in plan.add] == [
        ("P", frozenset({"10.0.0.1,tcp:8101-8200"}))
    ]
    assert [(spec.name, members) for spec, members in plan.remove] == [
        ("P", frozenset({"10.0.0.1,tcp:8000-8049"}))
    ]


def test_sets_that_narrow_are_added_last_and_removed_first() -> None:
    def spec(name: str, narrows: bool, *members: str) -> SetSpec:
        return SetSpec(name, HASH_IP, Family.IPV4, frozenset(members), narrows=narrows)

    before = {"A": spec("A", True, "10.0.0.1"), "Z": spec("Z", False, "10.0.0.1")}
    after = {"A": spec("A", True, "10.0.0.2"), "Z": spec("Z", False, "10.0.0.2")}
    plan = plan_sets(before, after)
    assert [spec.name for spec, _ in plan.add] == ["Z", "A"]
    assert [spec.name for spec, _ in plan.remove] == ["A", "Z"]


def test_another_extension_recreates_the_set() -> None:
    plain = SetSpec("S", HASH_IP, Family.IPV4, frozenset({"10.0.0.1"}))
    counted = SetSpec("S", HASH_IP, Family.IPV4, frozenset({"10.0.0.1"}), counters=True)
    plan = plan_sets({"S": plain}, {"S": counted})
    assert [spec.name for spec in plan.recreate] == ["S"]
    assert plan.recreate[0].counters


def element(*attributes: bytes) -> bytes:
    return nested(ATTR_DATA, b"".join(attributes))


def test_members_are_unpacked_in_one_pass_and_walked_when_they_differ() -> None:
    def member(address: str, packets: int, *extra: bytes) -> bytes:
        ip = nested(
            ATTR_IP, attr(ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, socket.inet_aton(address))
        )
        counters = attr(ATTR_BYTES | NLA_F_NET_BYTEORDER, (packets * 100).to_bytes(8, "big"))
        counters += attr(ATTR_PACKETS | NLA_F_NET_BYTEORDER, packets.to_bytes(8, "big"))
        return element(ip, *extra, counters)

    decoder = MemberDecoder(("address", "packets", "bytes"))
    alike = member("10.0.0.1", 1) + member("10.0.0.2", 2)
    assert decoder.decode(alike) == [
        (socket.inet_aton("10.0.0.1"), 1, 100),
        (socket.inet_aton("10.0.0.2"), 2, 200),
    ]
    assert decoder.fast_layouts() == 1
    # One member with another attribute: every member is walked, none is lost or misread.
    mark = attr(
        27 | NLA_F_NET_BYTEORDER, (0x100000).to_bytes(4, "big") + (0xF00000).to_bytes(4, "big")
    )
    mixed = member("10.0.0.1", 1) + member("10.0.0.3", 3, mark) + member("10.0.0.2", 2)
    assert [(socket.inet_ntoa(a), p, b) for a, p, b in decoder.decode(mixed)] == [
        ("10.0.0.1", 1, 100),
        ("10.0.0.3", 3, 300),
        ("10.0.0.2", 2, 200),
    ]
    # Members without a wanted field are left out.
    assert MemberDecoder(("address", "port")).decode(alike) == []


# --- in the kernel ------------------------------------------------------------------------


def ports_and_counters() -> dict[str, object]:
    """Port runs through the kernel and back, and counters read on both paths."""
    client = IpsetClient()
    ports = SetSpec("METALEG-P", HASH_IP_PORT_KIND, Family.IPV4)
    counted = SetSpec("METALEG-C", HASH_IP, Family.IPV4, counters=True)
    counted6 = SetSpec("METALEG-C6", HASH_IP, Family.IPV6, counters=True)
    members = frozenset({"10.0.0.1,tcp:8000-8100", "10.0.0.1,udp:53", "10.0.0.2,sctp:9-10"})
    addresses = frozenset(f"10.1.{i // 250}.{i % 250}" for i in range(2000))
    client.make(
        SetPlan(
            create=(ports, counted, counted6),
            add=(
                (ports, members),
                (counted, addresses | {"127.0.0.1"}),
                (counted6, frozenset({"::1", "fd00::1"})),
            ),
        )
    )
    listed = client.list_sets()
    header = subprocess.run(
        ["ipset", "list", "-t", ports.name], capture_output=True, text=True, check=True
    ).stdout
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for tool, set_name in (("iptables-legacy", "METALEG-C"), ("ip6tables-legacy", "METALEG-C6")):
        subprocess.run(
            [tool, "-t", "mangle", "-A", "OUTPUT", "-m", "set", "--match-set", set_name, "src"],
            check=True,
        )
    subprocess.run(["ping", "-c", "3", "-q", "127.0.0.1"], capture_output=True, check=True)
    subprocess.run(["ping", "-c", "2", "-q", "::1"], capture_output=True, check=True)
    reader = IpsetCounterReader()
    counts = reader.counters("METALEG-C") or []
    counts6 = reader.counters("METALEG-C6") or []
    fast = reader.decoder.fast_layouts()  # IPv4 and IPv6 members unpacked in one pass each
    # Part of a run goes: the rest stays, as single ports or runs.
    plan = plan_sets(
        {ports.name: listed[ports.name]},
        {
            ports.name: SetSpec(
                ports.name, HASH_IP_PORT_KIND, Family.IPV4, frozenset({"10.0.0.1,tcp:8000-8010"})
            )
        },
    )
    client.unmake(plan)
    client.make(plan)
    return {
        "listed": listed[ports.name].members,
        "kernel_count": header,
        "after": client.list_sets()[ports.name].members,
        "counts": {socket.inet_ntop(socket.AF_INET, a): (p, b) for a, b, p in counts if p},
        "total": len(counts),
        "counts6": {socket.inet_ntop(socket.AF_INET6, a): p for a, _, p in counts6},
        "missing": reader.counters("METALEG-NONE"),
        "fast": fast,
        "counters_flag": listed["METALEG-C"].counters,
    }


@pytest.mark.netns
def test_port_runs_and_member_counters_in_the_kernel() -> None:
    with namespace("mlipc") as ns:
        result = run_in_netns(ns, ports_and_counters)
    assert result["listed"] == {"10.0.0.1,tcp:8000-8100", "10.0.0.1,udp:53", "10.0.0.2,sctp:9-10"}
    assert "Number of entries: 104" in str(result["kernel_count"])  # 101 + 1 + 2 elements
    assert result["after"] == {"10.0.0.1,tcp:8000-8010"}
    counts = result["counts"]
    assert isinstance(counts, dict) and counts["127.0.0.1"][0] >= 6  # 3 requests, 3 replies
    assert counts["127.0.0.1"][1] >= 6 * 84
    assert result["total"] == 2001
    counts6 = result["counts6"]
    assert isinstance(counts6, dict) and counts6["::1"] >= 4 and counts6["fd00::1"] == 0
    assert result["missing"] is None
    assert result["fast"] == 2
    assert result["counters_flag"] is True


def swap_in_counters() -> tuple[str, str, list[str]]:
    """A set an older version created without counters, used by a rule, gets them."""
    subprocess.run(["ipset", "create", "METALEG-S", "hash:ip"], check=True)
    subprocess.run(["ipset", "add", "METALEG-S", "10.0.0.9"], check=True)
    subprocess.run(
        ["iptables-legacy", "-A", "FORWARD", "-m", "set", "--match-set", "METALEG-S", "src"],
        check=True,
    )
    client = IpsetClient()
    desired = SetSpec("METALEG-S", HASH_IP, Family.IPV4, frozenset({"10.0.0.1"}), counters=True)
    plan = plan_sets(client.list_sets(), {"METALEG-S": desired})
    client.make(plan)
    client.unmake(plan)
    listing = subprocess.run(
        ["ipset", "list", "METALEG-S"], capture_output=True, text=True, check=True
    ).stdout
    rules = subprocess.run(["iptables-legacy", "-S", "FORWARD"], capture_output=True, text=True)
    return listing, rules.stdout, sorted(client.list_sets())


@pytest.mark.netns
def test_a_set_in_use_gets_new_extensions_by_a_swap() -> None:
    with namespace("mlipc") as ns:
        listing, rules, names = run_in_netns(ns, swap_in_counters)
    assert "counters" in listing and "10.0.0.1 packets 0 bytes 0" in listing
    assert "10.0.0.9" not in listing
    assert "--match-set METALEG-S src" in rules
    assert names == ["METALEG-S"]  # the temporary set is gone
