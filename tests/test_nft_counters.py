"""The nftables backend's per-Service counters (issue 15): the ledger that sums the
per-source counters, and the kernel's counts of known traffic through a namespace topology."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgspec
import pytest

from metaleg.backend import EgressCount
from metaleg.firewall.nftables.backend import NftablesBackend
from metaleg.firewall.nftables.content import CountKey
from metaleg.firewall.nftables.counters import CountLedger, Readings, packed
from metaleg.model import Action, Family, NodeDesiredState
from tests.netns import run_in_netns
from tests.test_firewall_nftables import packet_state, topology  # noqa: F401 (a fixture)
from tests.test_nft_policy import (  # noqa: F401 (policy_topology: a fixture)
    LISTED4,
    LISTED6,
    OTHER4,
    OTHER6,
    policy_topology,
    with_policy,
)

A4 = CountKey("ns", "a", Family.IPV4, Action.SNAT)
B4 = CountKey("ns", "b", Family.IPV4, Action.MARK)
A4_REJECT = CountKey("ns", "a", Family.IPV4, Action.REJECT)


def raw(readings: dict[Family, dict[str, tuple[int, int]]]) -> dict[Family, Readings]:
    """Readings by source text as the kernel gives them (by packed address)."""
    return {
        family: {packed(source, family): counts for source, counts in found.items()}
        for family, found in readings.items()
    }


def totals(counts: list[EgressCount]) -> dict[CountKey, tuple[int, int]]:
    return {CountKey(c.namespace, c.name, c.family, c.action): (c.packets, c.bytes) for c in counts}


# --- pure: the ledger ----------------------------------------------------------------------


def test_the_ledger_sums_sources_per_key_and_never_goes_back() -> None:
    ledger = CountLedger()
    counted = {Family.IPV4: {"10.0.0.1": A4, "10.0.0.2": A4, "10.0.0.3": B4}}
    readings = {Family.IPV4: {"10.0.0.1": (10, 1000), "10.0.0.2": (5, 500), "10.0.0.3": (1, 60)}}
    assert totals(ledger.update(raw(readings), counted)) == {A4: (15, 1500), B4: (1, 60)}
    # 10.0.0.2 leaves (its element goes): what it had counted stays in A's total.
    del counted[Family.IPV4]["10.0.0.2"]
    ledger.restarted({Family.IPV4: {"10.0.0.2"}})
    readings = {Family.IPV4: {"10.0.0.1": (12, 1200), "10.0.0.3": (2, 120)}}
    assert totals(ledger.update(raw(readings), counted)) == {A4: (17, 1700), B4: (2, 120)}
    # 10.0.0.1 moves to B (its element is added again, from 0): A keeps its 12, but A
    # has no source any more: its series ends.
    counted[Family.IPV4]["10.0.0.1"] = B4
    ledger.restarted({Family.IPV4: {"10.0.0.1"}})
    readings = {Family.IPV4: {"10.0.0.1": (3, 300), "10.0.0.3": (2, 120)}}
    assert totals(ledger.update(raw(readings), counted)) == {B4: (5, 420)}
    # A comes back: from 0.
    counted[Family.IPV4]["10.0.0.9"] = A4
    readings[Family.IPV4]["10.0.0.9"] = (1, 100)
    assert totals(ledger.update(raw(readings), counted)) == {A4: (1, 100), B4: (5, 420)}
    # The table recreated (a repair): every counter back to 0, the totals stay.
    ledger.restarted_all()
    readings = {Family.IPV4: dict.fromkeys(counted[Family.IPV4], (0, 0))}
    assert totals(ledger.update(raw(readings), counted)) == {A4: (1, 100), B4: (5, 420)}
    readings[Family.IPV4]["10.0.0.3"] = (4, 400)
    assert totals(ledger.update(raw(readings), counted)) == {A4: (1, 100), B4: (9, 820)}
    # A counter that goes back unannounced (its element deleted by someone else): the
    # total stays where it was, and grows from there.
    readings[Family.IPV4]["10.0.0.3"] = (1, 100)
    assert totals(ledger.update(raw(readings), counted))[B4] == (9, 820)
    readings[Family.IPV4]["10.0.0.3"] = (2, 200)
    assert totals(ledger.update(raw(readings), counted))[B4] == (10, 920)
    # An element the kernel lacks counts nothing; its key is listed.
    counted[Family.IPV4]["10.0.0.4"] = A4_REJECT
    assert totals(ledger.update(raw(readings), counted))[A4_REJECT] == (0, 0)


def test_the_ledger_ignores_elements_that_are_not_counted_sources() -> None:
    ledger = CountLedger()
    counts = ledger.update(raw({Family.IPV6: {"fd00::1": (7, 700)}}), {Family.IPV6: {}})
    assert counts == []


# --- packets ------------------------------------------------------------------------------

# To a port nobody listens on: the peer's ICMP errors come back, and the pod sends
# nothing more (an answer to a closed socket would be one more packet from the pod).
SENDER = textwrap.dedent(
    """
    import socket, sys
    source, destination, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for _ in range(count):
            try:
                s.sendto(b"count me", (destination, 9998))
            except OSError:
                pass  # an ICMP error of a rejected datagram before
    """
)
SENT = 25


def _send(pod: str, source: str, destination: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", pod, sys.executable, "-c", SENDER, source, destination, str(SENT)],
        check=True,
        timeout=30,
    )


def _count_known_traffic(
    states: list[NodeDesiredState], pod: str, traffic: list[tuple[str, str]]
) -> list[dict[CountKey, tuple[int, int]]]:
    """In the node: apply each state in turn (one backend, as in the firewall worker), and
    send ``traffic`` (source, destination) from the pod after each; the counts read before
    the first and after each."""
    backend = NftablesBackend()
    try:
        backend.resync(states[0])
        readings = [totals(backend.read_counts())]
        for state in states:
            backend.apply(state)
            for source, destination in traffic:
                _send(pod, source, destination)
            readings.append(totals(backend.read_counts()))
        return readings
    finally:
        backend.close()


@pytest.mark.netns
def test_counters_grow_by_the_packets_sent_per_action(
    policy_topology: dict[str, str],  # noqa: F811
) -> None:
    pod, node = policy_topology["pod"], policy_topology["node"]
    sources = {
        Action.SNAT: ("10.244.1.10", "fd00:1::10"),
        Action.REJECT: ("10.244.1.11", "fd00:1::11"),
        Action.MARK: ("10.244.1.12", "fd00:1::12"),
    }
    policed = with_policy(packet_state(), cidrs4=(f"{LISTED4}/32",), cidrs6=(f"{LISTED6}/128",))
    # Without "mark": its counters go; back again: they start from 0.
    without_mark = msgspec.structs.replace(
        packet_state(),
        services=tuple(s for s in packet_state().services if s.name != "mark"),
    )
    traffic = [
        (source, destination)
        for pair in sources.values()
        for source, destination in zip(pair, (LISTED4, LISTED6), strict=True)
    ]
    untreated = [(sources[Action.SNAT][0], OTHER4), (sources[Action.REJECT][1], OTHER6)]
    readings = run_in_netns(
        node,
        _count_known_traffic,
        [packet_state(), policed, without_mark, packet_state()],
        pod,
        traffic + untreated,
        timeout=120,
    )
    first, everything, with_policy_only, gone, again = readings
    assert set(first.values()) == {(0, 0)} and len(first) == 6
    for action in Action:
        for family in Family:
            key = CountKey("ns", action.value, family, action)
            sent = SENT * (2 if (action, family) in untreated_keys(untreated, sources) else 1)
            assert everything[key][0] >= sent, (key, everything[key])
            assert everything[key][1] >= sent * 36, (key, everything[key])  # UDP, 8 bytes
            # The policy leaves the other destinations to the node: not counted.
            assert with_policy_only[key][0] - everything[key][0] == SENT, key
    # REJECT counted what was rejected (fail closed: no usable gateway).
    assert everything[CountKey("ns", "reject", Family.IPV6, Action.REJECT)][0] >= 2 * SENT
    mark_keys = {k for k in everything if k.action == Action.MARK}
    assert not mark_keys & set(gone)
    assert {k: again[k][0] for k in mark_keys} == dict.fromkeys(mark_keys, SENT)
    # The others never went back.
    assert all(again[k] >= gone[k] >= with_policy_only[k] for k in gone)


def untreated_keys(
    untreated: list[tuple[str, str]], sources: dict[Action, tuple[str, str]]
) -> set[tuple[Action, Family]]:
    """(action, family) of the sources that sent to another destination as well."""
    return {
        (action, Family.IPV6 if ":" in source else Family.IPV4)
        for source, _ in untreated
        for action, pair in sources.items()
        if source in pair
    }
