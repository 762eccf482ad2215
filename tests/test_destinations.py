"""The destination policy annotations: parsing, and how they shape a Service's egress."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metaleg.model import Action, Family, PortRange, Protocol, describe_egress
from metaleg.watcher.cluster import parse_service
from metaleg.watcher.destinations import PolicyError, parse_cidrs, parse_ports
from tests import cluster_objects as k


def test_cidrs_are_canonical_sorted_and_unique() -> None:
    text = " 2001:db8::1 , 192.0.2.7/24,10.0.0.1,192.0.2.0/24 "
    assert parse_cidrs(text) == ("10.0.0.1/32", "192.0.2.0/24", "2001:db8::1/128")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        (" , ", "is empty"),
        ("192.0.2.0/24,,10.0.0.0/8", "element 2 is empty"),
        ("192.0.2.0/33", "'192.0.2.0/33' is not a CIDR"),
        ("mail.example.org", "'mail.example.org' is not a CIDR"),
    ],
)
def test_bad_cidrs_name_the_element(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_cidrs(text)


def test_ports_are_merged_per_protocol() -> None:
    assert parse_ports("tcp/587, TCP/25,udp/53, tcp/26-30, tcp/8000-8100,tcp/8050") == (
        PortRange(Protocol.TCP, 25, 30),
        PortRange(Protocol.TCP, 587, 587),
        PortRange(Protocol.TCP, 8000, 8100),
        PortRange(Protocol.UDP, 53, 53),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("icmp/0", "the protocol must be tcp, udp or sctp"),
        ("tcp", "has no port"),
        ("tcp/0", "'0' is not a port"),
        ("tcp/65536", "'65536' is not a port"),
        ("tcp/100-90", "the range ends before it starts"),
        ("tcp/25,", "element 2 is empty"),
        ("udp/x", "'x' is not a port"),
    ],
)
def test_bad_ports_name_the_element(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_ports(text)


@given(
    st.lists(
        st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 300), st.integers(0, 40)),
        min_size=1,
        max_size=12,
    )
)
def test_merged_ports_cover_exactly_the_ports_listed(ranges: list[tuple[str, int, int]]) -> None:
    text = ",".join(f"{p}/{first}-{min(first + length, 65535)}" for p, first, length in ranges)
    listed = {
        (p, port)
        for p, first, length in ranges
        for port in range(first, min(first + length, 65535) + 1)
    }
    merged = parse_ports(text)
    covered = [(str(r.protocol), port) for r in merged for port in range(r.first, r.last + 1)]
    assert len(covered) == len(set(covered))  # no overlaps
    assert set(covered) == listed
    # Sorted, and no two ranges of a protocol that touch (they would be one).
    for a, b in itertools.pairwise(merged):
        if a.protocol == b.protocol:
            assert a.last + 1 < b.first


@given(st.lists(st.ip_addresses(), min_size=1, max_size=8), st.integers(0, 128))
def test_cidrs_cover_what_was_written(addresses: list[Any], prefix: int) -> None:
    elements = [f"{a}/{min(prefix, a.max_prefixlen)}" for a in addresses]
    cidrs = parse_cidrs(",".join(elements))
    networks = [ipaddress.ip_network(c) for c in cidrs]
    for address in addresses:
        assert any(address in n for n in networks)
    assert parse_cidrs(",".join(cidrs)) == cidrs  # canonical: a fixed point


def _parsed(annotations: dict[str, Any]) -> tuple[Any, list[str]]:
    problems: list[Any] = []
    info = parse_service(
        k.service("mail", "relay", ["198.51.100.25"], annotations=annotations), problems
    )
    return info, [str(p) for p in problems]


def test_an_invalid_annotation_is_a_problem_and_ignored() -> None:
    info, problems = _parsed(
        {
            "metaleg.de/destinationCIDRs": "192.0.2.0/24, relay",
            "metaleg.de/destinationPorts": "tcp/25",
        }
    )
    assert info.destination_cidrs is None  # every destination, as if absent
    assert info.destination_ports == (PortRange(Protocol.TCP, 25, 25),)
    assert problems == [
        "Service mail/relay: metadata.annotations[metaleg.de/destinationCIDRs]: 'relay' is not a "
        "CIDR; the annotation is ignored: every destination takes the LoadBalancer IP"
    ]
    info, problems = _parsed({"metaleg.de/destinationPorts": 25})
    assert info.destination_ports == () and len(problems) == 1 and "is not a string" in problems[0]


def _relay_state(gateway: str, annotations: dict[str, Any] | None) -> Any:
    from metaleg.watcher.desired import compute_node_state
    from tests.test_desired import NODES, SETTINGS, cluster_of, mail_service

    objects = mail_service(gateway)
    objects[0] = k.service(
        "mail", "relay", ("198.51.100.200", "2001:db8:1::200"), annotations=annotations
    )
    return compute_node_state(cluster_of(*NODES, *objects), SETTINGS)


def test_the_policy_reaches_the_node_state_per_family() -> None:
    policy = {
        "metaleg.de/destinationCIDRs": "192.0.2.25, 203.0.113.0/24",
        "metaleg.de/destinationPorts": "tcp/25,tcp/587",
    }
    (service,) = _relay_state("node-a", policy).state.services
    # Only IPv4 destinations are listed: the IPv6 sources take the node's normal path.
    (v4,) = service.families
    assert (v4.family, v4.action) == (Family.IPV4, Action.SNAT)
    assert v4.destinations == ("192.0.2.25/32", "203.0.113.0/24")
    assert service.destination_ports == (
        PortRange(Protocol.TCP, 25, 25),
        PortRange(Protocol.TCP, 587, 587),
    )
    assert describe_egress(service) == (
        "IPv4: egress here as 198.51.100.200 to 192.0.2.25/32, 203.0.113.0/24 on tcp/25, tcp/587 "
        "(3 sources)"
    )
    # No gateway: only the listed destinations are rejected (the entry keeps them).
    (service,) = _relay_state(None, policy).state.services  # type: ignore[arg-type]
    (v4,) = service.families
    assert v4.action == Action.REJECT and v4.destinations == ("192.0.2.25/32", "203.0.113.0/24")


def test_without_the_annotations_every_destination_and_port() -> None:
    for node in ("node-a", "node-b"):
        (service,) = _relay_state(node, None).state.services
        assert service.families and all(e.destinations == () for e in service.families)
        assert service.destination_ports == ()


def test_an_invalid_annotation_never_narrows_the_state() -> None:
    bad = {"metaleg.de/destinationCIDRs": "192.0.2.0/24,relay"}
    # (The Problem itself comes from parsing: test_an_invalid_annotation_is_a_problem_and_ignored.)
    for node in ("node-a", "node-b", None):
        assert _relay_state(node, bad).state == _relay_state(node, None).state  # type: ignore[arg-type]
