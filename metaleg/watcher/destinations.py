"""The destination policy of a labelled Service, from two annotations.

``metaleg.de/destinationCIDRs``: comma-separated IPv4 and IPv6 CIDRs (spaces
allowed; an address alone is a /32 or /128). ``metaleg.de/destinationPorts``:
comma-separated ``tcp/25``, ``udp/53``, ``tcp/8000-8100`` (``sctp`` too). Only
the Service's pods' traffic that matches both (a missing annotation matches
everything) takes the LoadBalancer IP, and only that traffic is rejected when
no gateway is usable; the rest follows the node's normal path.

An invalid annotation is refused as a whole, with an error that names the bad
element: the watcher reports it and treats the Service as if the annotation
were absent, so a typo can never send traffic that was meant for the LB IP out
with a node IP (it can only widen what takes the LB IP).
"""

from __future__ import annotations

import ipaddress

from metaleg.model import PortRange, Protocol

CIDRS_ANNOTATION = "metaleg.de/destinationCIDRs"
PORTS_ANNOTATION = "metaleg.de/destinationPorts"


class PolicyError(ValueError):
    """An annotation that cannot be used; the message names the bad element."""


def _elements(text: str) -> list[str]:
    """The comma-separated elements of an annotation, stripped; none may be empty."""
    elements = [element.strip() for element in text.split(",")]
    if not any(elements):
        raise PolicyError("is empty (remove the annotation to treat every destination)")
    for index, element in enumerate(elements):
        if not element:
            raise PolicyError(f"element {index + 1} is empty")
    return elements


def parse_cidrs(text: str) -> tuple[str, ...]:
    """Canonical CIDRs of ``metaleg.de/destinationCIDRs``, sorted by family and address,
    without duplicates. Host bits are cleared (``192.0.2.1/24`` is ``192.0.2.0/24``)."""
    networks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for element in _elements(text):
        try:
            networks.add(ipaddress.ip_network(element, strict=False))
        except ValueError:
            raise PolicyError(f"{element!r} is not a CIDR") from None
    ordered = sorted(networks, key=lambda n: (n.version, n.network_address.packed, n.prefixlen))
    return tuple(str(network) for network in ordered)


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """The port ranges of ``metaleg.de/destinationPorts``, per protocol sorted and with
    overlapping or adjacent ranges merged (so equal policies compare equal)."""
    ranges: dict[Protocol, list[tuple[int, int]]] = {}
    for element in _elements(text):
        protocol_text, slash, ports = element.partition("/")
        try:
            protocol = Protocol(protocol_text.strip().lower())
        except ValueError:
            raise PolicyError(
                f"{element!r}: the protocol must be tcp, udp or sctp (as in tcp/25)"
            ) from None
        if not slash:
            raise PolicyError(f"{element!r} has no port (as in tcp/25 or tcp/8000-8100)")
        first_text, dash, last_text = ports.strip().partition("-")
        first, last = _port(element, first_text), _port(element, last_text if dash else first_text)
        if first > last:
            raise PolicyError(f"{element!r}: the range ends before it starts")
        ranges.setdefault(protocol, []).append((first, last))
    merged: list[PortRange] = []
    for protocol in sorted(ranges):
        current: list[int] | None = None
        for first, last in sorted(ranges[protocol]):
            if current is not None and first <= current[1] + 1:
                current[1] = max(current[1], last)
                continue
            if current is not None:
                merged.append(PortRange(protocol, current[0], current[1]))
            current = [first, last]
        if current is not None:
            merged.append(PortRange(protocol, current[0], current[1]))
    return tuple(merged)


def _port(element: str, text: str) -> int:
    text = text.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise PolicyError(f"{element!r}: {text!r} is not a port (1-65535)")
    return int(text)
