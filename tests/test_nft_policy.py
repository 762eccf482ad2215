"""The nftables backend's destination policy (issue 16): rendering, the incremental path
against the full render, the kernel round trip, and packets through a namespace topology.

Only a Service's traffic to its destination CIDRs and ports takes its treatment (the
LB IP on the gateway, the mark on a forwarder, the reject when no gateway is usable);
the rest leaves as the node would send it.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaleg.firewall.nftables.backend import NftablesBackend
from metaleg.firewall.nftables.kernel import ActualTable
from metaleg.firewall.nftables.scripts import diff_script, full_script
from metaleg.model import (
    Action,
    Family,
    NodeDesiredState,
    PortRange,
    Protocol,
    ServiceEgress,
)
from tests.netns import namespace, run_in_netns, sh
from tests.packet_harness import (
    WHO_AM_I_SERVER,
    add_addresses,
    script_in,
    udp_probe,
    udp_send,
)
from tests.test_firewall_nftables import (  # noqa: F401 (topology: a fixture)
    MASK,
    _backend_apply,
    _backend_change,
    big_state,
    content_of,
    egress,
    node_state,
    packet_state,
    service,
    topology,
)
from tests.test_nft_incremental import _apply_sequence, _valid, random_walk, step
from tests.waiting import wait_until

TCP25 = PortRange(Protocol.TCP, 25, 25)
UDP_WHO_AM_I = PortRange(Protocol.UDP, 9999, 9999)
LISTED4, OTHER4 = "203.0.113.2", "203.0.113.3"
LISTED6, OTHER6 = "2001:db8:113::2", "2001:db8:113::3"
NODE4, NODE6 = "203.0.113.1", "2001:db8:113::1"
LB4, LB6 = "203.0.113.100", "2001:db8:113::100"


def with_policy(
    state: NodeDesiredState,
    cidrs4: tuple[str, ...] = (),
    cidrs6: tuple[str, ...] = (),
    ports: tuple[PortRange, ...] = (),
) -> NodeDesiredState:
    """``state`` with every Service's policy set to these CIDRs (per family) and ports."""
    cidrs = {Family.IPV4: cidrs4, Family.IPV6: cidrs6}
    services = [
        msgspec.structs.replace(
            svc,
            families=tuple(
                msgspec.structs.replace(entry, destinations=cidrs[entry.family])
                for entry in svc.families
            ),
            destination_ports=ports,
        )
        for svc in state.services
    ]
    return msgspec.structs.replace(state, services=tuple(services))


# --- pure: rendering ----------------------------------------------------------------------


def test_policy_elements_are_canonical_and_in_their_sets() -> None:
    state = with_policy(
        node_state(
            service("a", egress(Family.IPV4, Action.SNAT, "10.244.1.10", snat_ip="192.0.2.1")),
            service("b", egress(Family.IPV6, Action.REJECT, "fd00:1::10")),
        ),
        # Overlapping and adjacent CIDRs merge; a host is a /32 (/128).
        cidrs4=("198.51.100.0/25", "198.51.100.128/25", "198.51.100.7/32", "192.0.2.9"),
        cidrs6=("2001:db8::/33", "2001:db8:8000::/33"),
        ports=(TCP25, PortRange(Protocol.TCP, 26, 30), PortRange(Protocol.UDP, 53, 53)),
    )
    lines = full_script(content_of(state), MASK, "icmpx admin-prohibited").splitlines()
    for expected in (
        "add set inet metaleg dst4 { type ipv4_addr . ipv4_addr; flags interval; }",
        "add set inet metaleg port6 { type ipv6_addr . inet_proto . inet_service; "
        "flags interval; }",
        "add set inet metaleg count4 { type ipv4_addr; counter; }",
        "add element inet metaleg policed_dst4 { 10.244.1.10 }",
        "add element inet metaleg dst4 { 10.244.1.10 . 192.0.2.9/32, "
        "10.244.1.10 . 198.51.100.0/24 }",
        "add element inet metaleg policed_port4 { 10.244.1.10 }",
        "add element inet metaleg port4 { 10.244.1.10 . tcp . 25-30, 10.244.1.10 . udp . 53 }",
        "add element inet metaleg dst6 { fd00:1::10 . 2001:db8::/32 }",
        "add element inet metaleg port6 { fd00:1::10 . tcp . 25-30, fd00:1::10 . udp . 53 }",
        "add element inet metaleg count4 { 10.244.1.10 }",
        "add element inet metaleg count6 { fd00:1::10 }",
    ):
        assert expected in lines, expected
    # Without a policy, no element of the policy's sets.
    plain = full_script(content_of(node_state(*state.services[:0])), MASK, "icmpx no-route")
    assert "policed_dst4 {" not in plain.replace("add set inet metaleg policed_dst4 {", "")


def test_rule_count_does_not_grow_with_services_that_carry_policies() -> None:
    def rules(state: NodeDesiredState) -> list[str]:
        script = full_script(content_of(state), MASK, "icmpx admin-prohibited")
        return [line.split(" comment ")[0] for line in script.splitlines() if " rule " in line]

    policy = {"cidrs4": ("198.51.100.0/24",), "cidrs6": ("2001:db8::/32",), "ports": (TCP25,)}
    few = with_policy(big_state(15), **policy)  # type: ignore[arg-type]
    many = with_policy(big_state(300), **policy)  # type: ignore[arg-type]
    assert len(content_of(many).policy[Family.IPV4]) == 3000
    # Both use all five gateway slots of big_state: the same rules, text for text.
    assert rules(few) == rules(many)
    assert len(rules(many)) == 53 + 2 * 5
    assert rules(big_state(300)) == rules(many)  # and the same as without any policy


def test_a_policy_change_is_element_changes_of_the_policy_sets_only() -> None:
    base = node_state(
        service("a", egress(Family.IPV4, Action.SNAT, "10.244.1.10", snat_ip="192.0.2.1"))
    )
    narrow = with_policy(base, cidrs4=("198.51.100.7/32",), ports=(TCP25,))
    wide = with_policy(base, cidrs4=("198.51.100.0/24",))
    assert diff_script(content_of(base), content_of(narrow), MASK).splitlines() == [
        "add element inet metaleg policed_dst4 { 10.244.1.10 }",
        "add element inet metaleg dst4 { 10.244.1.10 . 198.51.100.7/32 }",
        "add element inet metaleg policed_port4 { 10.244.1.10 }",
        "add element inet metaleg port4 { 10.244.1.10 . tcp . 25 }",
    ]
    assert diff_script(content_of(narrow), content_of(wide), MASK).splitlines() == [
        "delete element inet metaleg dst4 { 10.244.1.10 . 198.51.100.7/32 }",
        "delete element inet metaleg policed_port4 { 10.244.1.10 }",
        "delete element inet metaleg port4 { 10.244.1.10 . tcp . 25 }",
        "add element inet metaleg dst4 { 10.244.1.10 . 198.51.100.0/24 }",
    ]


# --- pure: incremental == full render, with random policies -------------------------------

# Canonical choices (no two overlap or touch): the claims' treatments carry a Service's
# policy as written, the content its canonical form, and the test compares the two
# steps' conntrack plans (merging is covered by the rendering test above).
CIDRS = {
    Family.IPV4: ["198.51.100.0/25", "198.51.100.200/32", "198.51.102.0/24", "10.1.0.0/16"],
    Family.IPV6: ["2001:db8:5::/48", "2001:db8:6::7/128", "fd00:5::/64"],
}
PORTS = [TCP25, PortRange(Protocol.TCP, 27, 30), UDP_WHO_AM_I, PortRange(Protocol.SCTP, 1, 65535)]


def random_policies(rng: random.Random, states: list[NodeDesiredState]) -> list[NodeDesiredState]:
    """``states`` with a policy per Service that each state keeps or redraws (a third of
    the time), so that steps narrow, widen, add and remove policies."""
    drawn: dict[tuple[str, str], tuple[dict[Family, tuple[str, ...]], tuple[PortRange, ...]]] = {}
    result = []
    for state in states:
        services: list[ServiceEgress] = []
        for svc in state.services:
            key = (svc.namespace, svc.name)
            if key not in drawn or rng.random() < 0.35:
                cidrs = {
                    family: tuple(sorted(rng.sample(CIDRS[family], rng.randint(0, 2))))
                    for family in Family
                }
                ports = tuple(sorted(rng.sample(PORTS, rng.randint(0, 2)), key=str))
                drawn[key] = (cidrs, ports)
            cidrs, ports = drawn[key]
            families = tuple(
                msgspec.structs.replace(entry, destinations=cidrs[entry.family])
                for entry in svc.families
            )
            services.append(
                msgspec.structs.replace(svc, families=families, destination_ports=ports)
            )
        result.append(msgspec.structs.replace(state, services=tuple(services)))
    return result


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(2, 12))
def test_incremental_steps_with_policies_equal_the_full_render(
    rng: random.Random, count: int
) -> None:
    from metaleg.firewall.nftables.incremental import AppliedTable

    states = random_policies(rng, random_walk(rng, count, _valid))
    if not states:
        return
    live, applied = AppliedTable(states[0]), states[0]
    for new in states[1:]:
        after = step(live, applied, new)
        if after is not None:
            live, applied = after, new


# --- in a namespace: the kernel round trip --------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace("mlnp") as name:
        yield name


@pytest.mark.netns
def test_random_policies_in_the_kernel_read_back_as_written(ns: str) -> None:
    rng = random.Random(16)
    states = [s for s in random_policies(rng, random_walk(rng, 40, _valid)) if _valid(s)]
    transactions = run_in_netns(ns, _apply_sequence, states)
    assert sum(transactions) > 10


def _resync_repairs(state: NodeDesiredState, tampering: str) -> tuple[int, ActualTable]:
    """Resync, tamper with ``nft``, resync again; the transactions of the second resync and
    the table the kernel holds then."""
    backend = NftablesBackend()
    try:
        backend.resync(state)
        before = backend.transactions
        subprocess.run(["nft", tampering], check=True, capture_output=True, timeout=30)
        backend.resync(state)
        return backend.transactions - before, ActualTable.parse(
            backend.nft.json("list table inet metaleg")
        )
    finally:
        backend.close()


@pytest.mark.netns
@pytest.mark.parametrize(
    "tampering",
    [
        "delete element inet metaleg dst4 { 10.244.1.10 . 203.0.113.2 }",
        "delete element inet metaleg policed_port6 { fd00:1::10 }",
        "add element inet metaleg port4 { 10.244.1.11 . tcp . 80 }",
        "delete element inet metaleg count4 { 10.244.1.12 }",
    ],
)
def test_resync_repairs_the_policy_and_count_sets(ns: str, tampering: str) -> None:
    state = with_policy(
        packet_state(), cidrs4=(f"{LISTED4}/32",), cidrs6=(f"{LISTED6}/128",), ports=(TCP25,)
    )
    repairs, listed = run_in_netns(ns, _resync_repairs, state, tampering)
    assert repairs == 1
    desired = content_of(state)
    assert listed.content() == desired
    for family, suffix in ((Family.IPV4, "4"), (Family.IPV6, "6")):
        assert listed.set_members(f"count{suffix}") == set(desired.count[family])
        assert listed.set_members(f"dst{suffix}") == desired.element_sets()[f"dst{suffix}"]


# --- packets ------------------------------------------------------------------------------


@pytest.fixture
def policy_topology(topology: dict[str, str]) -> Iterator[dict[str, str]]:  # noqa: F811
    """The packet topology with a second address on the peer (another internet host),
    answered by its own who-am-I server."""
    add_addresses(topology["peer"], "eth0", f"{OTHER4}/24", f"{OTHER6}/64")
    with script_in(topology["peer"], WHO_AM_I_SERVER, OTHER4, OTHER6, ready_line=True):
        yield topology


def _probe(pod: str, source: str, destination: str, sport: int) -> str:
    return run_in_netns(pod, udp_probe, source, destination, sport, timeout=10)


POLICED = with_policy(packet_state(), cidrs4=(f"{LISTED4}/32",), cidrs6=(f"{LISTED6}/128",))


@pytest.mark.netns
@pytest.mark.parametrize(
    ("snat", "mark", "reject", "listed", "other", "lb", "node_ip", "rejected"),
    [
        ("10.244.1.10", "10.244.1.12", "10.244.1.11", LISTED4, OTHER4, LB4, NODE4,
         "rejected:EHOSTUNREACH"),
        ("fd00:1::10", "fd00:1::12", "fd00:1::11", LISTED6, OTHER6, LB6, NODE6,
         "rejected:EACCES"),
    ],
)  # fmt: skip
def test_only_listed_destinations_take_the_treatment(
    policy_topology: dict[str, str],
    snat: str,
    mark: str,
    reject: str,
    listed: str,
    other: str,
    lb: str,
    node_ip: str,
    rejected: str,
) -> None:
    pod, node = policy_topology["pod"], policy_topology["node"]
    run_in_netns(node, _backend_apply, POLICED)
    expected = {
        # Gateway: the listed destination sees the LB IP, another the node's masquerade.
        (snat, listed): lb,
        (snat, other): node_ip,
        # Forwarder: marked (null binding: the pod IP here, no route to a gateway in this
        # topology), or the node's path.
        (mark, listed): mark,
        (mark, other): node_ip,
        # No gateway: only the listed destination is rejected.
        (reject, listed): rejected,
        (reject, other): node_ip,
    }
    for (source, destination), seen in expected.items():
        assert _probe(pod, source, destination, 41000) == seen, (source, destination)
    # Ports: another port (here: protocol) of a listed destination is untreated.
    ported = with_policy(POLICED, cidrs4=(f"{LISTED4}/32",), cidrs6=(f"{LISTED6}/128",),
                         ports=(TCP25,))  # fmt: skip
    run_in_netns(node, _backend_change, POLICED, ported)
    for source in (snat, mark, reject):
        assert _probe(pod, source, listed, 41001) == node_ip, source
    # The listed port is treated.
    with_port = with_policy(ported, ports=(UDP_WHO_AM_I,))
    run_in_netns(node, _backend_change, ported, with_port)
    assert _probe(pod, snat, listed, 41002) == lb
    assert _probe(pod, snat, other, 41002) == lb  # no CIDRs now: every destination
    assert _probe(pod, reject, other, 41002) == rejected
    # Removing the policy restores the treatment for every destination; the flows the
    # narrower policy left to the node (sport 41000) are deleted and re-decided.
    run_in_netns(node, _backend_change, with_port, packet_state())
    assert _probe(pod, snat, other, 41000) == lb
    assert _probe(pod, mark, other, 41000) == mark
    assert _probe(pod, reject, other, 41000) == rejected


@pytest.mark.netns
def test_excluded_destinations_win_over_the_policy(policy_topology: dict[str, str]) -> None:
    pod, node = policy_topology["pod"], policy_topology["node"]
    # 10.99.0.2 (on the peer) is excluded (10.0.0.0/8): listing it changes nothing.
    state = with_policy(packet_state(), cidrs4=("10.99.0.2/32", f"{LISTED4}/32"))
    run_in_netns(node, _backend_apply, state)
    assert _probe(pod, "10.244.1.11", "10.99.0.2", 41003) == "10.244.1.11"
    assert _probe(pod, "10.244.1.10", "10.99.0.2", 41003) == "10.244.1.10"
    assert _probe(pod, "10.244.1.10", LISTED4, 41003) == LB4
    # The node table lists each source's merged destinations.
    text = sh("nft", "list", "set", "inet", "metaleg", "dst4", netns=node)
    assert "10.244.1.10 . 10.99.0.2" in text and "10.244.1.10 . 203.0.113.2" in text


def _peer_sends(peer: str, source: str, destination: str, port: int) -> None:
    """One datagram from the peer's ``source`` to ``destination``:``port`` (a new flow)."""
    run_in_netns(peer, udp_send, source, port, destination, port, timeout=10)


@pytest.mark.netns
def test_stray_reply_check_spares_peers_the_policy_leaves_to_the_node(
    policy_topology: dict[str, str],
) -> None:
    """A new connection from the internet to a pod IP is dropped when it could be a stray
    reply of a treated flow; a peer the pod's policy does not cover is no such reply."""
    peer, node = policy_topology["peer"], policy_topology["node"]
    run_in_netns(node, _backend_apply, POLICED)
    pod_ip = "10.244.1.10"

    def entries(source: str) -> str:
        return sh("conntrack", "-L", "-s", source, "-d", pod_ip, netns=node, check=False)

    _peer_sends(peer, OTHER4, pod_ip, 40200)  # not covered: the node's business
    wait_until(
        lambda: entries(OTHER4),
        timeout=5,
        interval=0.05,
        message="the uncovered peer's flow to the pod",
        accept=lambda listed: "dport=40200" in listed,
    )
    _peer_sends(peer, LISTED4, pod_ip, 40201)  # covered: could be a stray reply
    # The uncovered peer's second datagram, right behind it, shows it went through.
    _peer_sends(peer, OTHER4, pod_ip, 40202)
    wait_until(
        lambda: entries(OTHER4),
        timeout=5,
        interval=0.05,
        message="the uncovered peer's second flow",
        accept=lambda listed: "dport=40202" in listed,
    )
    assert "dport=40201" not in entries(LISTED4)
