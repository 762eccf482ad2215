"""The iptables backend's per-Service counters (:meth:`IptablesBackend.read_counts`) against
the real kernel: known traffic through the policy tests' dual-stack topology, then a reading."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from metaleg.backend import BackendError, EgressCount, EgressCounting
from metaleg.firewall.iptables.backend import IptablesBackend
from metaleg.model import Action, Family, NodeDesiredState
from tests.netns import namespace, run_in_netns
from tests.test_firewall_iptables import node_state
from tests.test_iptables_policy import (
    LISTED,
    LISTED4,
    LISTED6,
    OTHER4,
    OTHER6,
    POD4,
    POD6,
    Topology,
    dual_stack_topology,
    dual_state,
)

SENDER = """
import socket, sys
source, destination, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in source else socket.AF_INET
with socket.socket(family, socket.SOCK_DGRAM) as sender:
    sender.bind((source, 0))
    for _ in range(count):
        try:
            sender.sendto(b"x" * 100, (destination, 9999))
        except OSError:
            pass  # an ICMP error of the packet before (rejected): send on
"""
PACKET4, PACKET6 = 128, 148
"""Bytes of one of the sender's datagrams on the wire (IP header, UDP header, 100 bytes)."""


def send(pod: str, destination: str, count: int) -> None:
    """``count`` datagrams of one flow from the pod to port 9999 of ``destination``."""
    source = POD6 if ":" in destination else POD4
    command = ["ip", "netns", "exec", pod, sys.executable, "-c", SENDER, source, destination]
    subprocess.run([*command, str(count)], check=True, timeout=30)


Counts = dict[tuple[str, Family, Action], tuple[int, int]]


def by_key(counts: list[EgressCount]) -> Counts:
    return {(c.name, c.family, c.action): (c.packets, c.bytes) for c in counts}


def apply_send_read(
    pod: str, steps: list[tuple[NodeDesiredState, list[tuple[str, int]]]]
) -> list[Counts]:
    """In the node: per step, apply the state, send the traffic, read the counters."""
    backend = IptablesBackend()
    readings = []
    try:
        assert isinstance(backend, EgressCounting)
        for state, traffic in steps:
            backend.apply(state)
            for destination, count in traffic:
                send(pod, destination, count)
            readings.append(by_key(backend.read_counts()))
    finally:
        backend.close()
    return readings


@pytest.fixture
def topology() -> Iterator[Topology]:
    with dual_stack_topology("mlc") as topology:
        yield topology


TRAFFIC = [(LISTED4, 20), (OTHER4, 7), (LISTED6, 15), (OTHER6, 5)]
"""To the listed hosts (treated) and to the others (the normal path: not counted)."""


@pytest.mark.netns
def test_counters_grow_by_the_treated_packets_per_action(topology: Topology) -> None:
    steps = [
        (dual_state("snat", LISTED), TRAFFIC),
        (dual_state("mark", LISTED), TRAFFIC),
        (dual_state("reject", LISTED), TRAFFIC),
    ]
    snat, mark, reject = run_in_netns(topology.node, apply_send_read, topology.pod, steps)
    for reading, action in ((snat, Action.SNAT), (mark, Action.MARK), (reject, Action.REJECT)):
        # Exactly one key per family: the Service's action there.
        assert set(reading) == {("relay", Family.IPV4, action), ("relay", Family.IPV6, action)}
        packets4, bytes4 = reading["relay", Family.IPV4, action]
        packets6, bytes6 = reading["relay", Family.IPV6, action]
        # At least what was sent to the listed hosts; nothing of what went elsewhere
        # (IPv6 neighbour discovery to multicast may add a few marked packets).
        assert 20 <= packets4 < 20 + 7 and bytes4 >= 20 * PACKET4
        assert 15 <= packets6 < 15 + 5 and bytes6 >= 15 * PACKET6


@pytest.mark.netns
def test_counters_go_with_their_service_and_start_again_at_zero(topology: Topology) -> None:
    counted = dual_state("reject", {})
    steps = [
        (counted, [(OTHER4, 10)]),
        (counted, [(OTHER4, 5)]),
        (node_state(), []),  # the Service is gone: so are its counts
        (counted, [(OTHER4, 3)]),  # back: from zero
    ]
    first, second, gone, back = run_in_netns(topology.node, apply_send_read, topology.pod, steps)
    key = ("relay", Family.IPV4, Action.REJECT)
    assert first[key][0] >= 10 and second[key][0] >= first[key][0] + 5
    assert gone == {}
    assert 3 <= back[key][0] < first[key][0]
    assert back["relay", Family.IPV6, Action.REJECT] == (0, 0)


def read_before_any_apply() -> str:
    backend = IptablesBackend()
    try:
        backend.read_counts()
    except BackendError as error:
        return str(error)
    finally:
        backend.close()
    return ""


@pytest.mark.netns
def test_counters_are_not_guessed_without_an_applied_state() -> None:
    with namespace("mlcn") as node:
        assert "not known" in run_in_netns(node, read_before_any_apply)
