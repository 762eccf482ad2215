"""The desired-state data model shared by every metaleg process.

The watcher computes a :class:`NodeDesiredState` for its node with a pure
function and publishes it; the firewall and routing workers render it into
kernel state. Everything here is plain, immutable data: msgspec Structs with
sorted tuples, so that two snapshots compare equal exactly when they would
produce the same kernel state and so that they encode identically.
"""

from __future__ import annotations

import enum

import msgspec


class Family(enum.IntEnum):
    """IP address family, by version number (what ``ipaddress`` calls ``version``)."""

    IPV4 = 4
    IPV6 = 6


class Action(enum.StrEnum):
    """What the firewall does with traffic from a Service's source IPs in one family."""

    SNAT = "snat"
    """This node is the gateway: SNAT to the Service's LoadBalancer IP."""
    MARK = "mark"
    """Another node is the gateway: set ``fwmark`` so policy routing sends it there."""
    REJECT = "reject"
    """No usable gateway: reject forwarded traffic (fail closed)."""


class Role(enum.StrEnum):
    """This node's role for one Service, as shown by ``metaleg-supervisor status``."""

    GATEWAY = "gateway"
    FORWARDER = "forwarder"
    REJECT = "reject"
    NONE = "none"


class FamilyEgress(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The egress treatment of one Service's sources in one address family."""

    family: Family
    action: Action
    source_ips: tuple[str, ...]
    """Sorted, de-duplicated, canonical (``ipaddress``-formatted) pod IPs."""
    snat_ip: str | None = None
    """The LoadBalancer IP (set for ``SNAT``)."""
    fwmark: int | None = None
    """The gateway node's firewall mark, already shifted into FIREWALL_MASK (set for ``MARK``)."""
    reason: str = ""
    """Why the traffic is rejected (set for ``REJECT``), for logs and status."""
    destinations: tuple[str, ...] = ()
    """Canonical CIDRs of this family (sorted, from ``metaleg.de/destinationCIDRs``) that the
    sources' traffic is treated for; empty: every destination. Traffic to other
    destinations follows the node's normal path, as if the Service were not labelled
    (a family none of the annotation's CIDRs belongs to has no entry at all)."""


class Protocol(enum.StrEnum):
    """A transport protocol a destination port range applies to."""

    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"


class PortRange(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """Destination ports ``first``..``last`` (inclusive) of one protocol."""

    protocol: Protocol
    first: int
    last: int

    def __str__(self) -> str:
        if self.first == self.last:
            return f"{self.protocol}/{self.first}"
        return f"{self.protocol}/{self.first}-{self.last}"


class ServiceEgress(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything this node does for one labelled Service."""

    namespace: str
    name: str
    role: Role
    gateway_node: str | None
    lb_ips: tuple[str, ...]
    """The SNAT addresses: the first IPv4 and the first IPv6 ingress IP, in that order."""
    families: tuple[FamilyEgress, ...]
    """At most one entry per family, IPv4 first; empty when the node has nothing to do."""
    destination_ports: tuple[PortRange, ...] = ()
    """The destination ports (``metaleg.de/destinationPorts``, sorted, merged) the sources'
    traffic is treated for; empty: every protocol and port. Other traffic follows the
    node's normal path."""

    @property
    def key(self) -> str:
        """``namespace/name``: the Service's identity in logs, status and kernel names."""
        return f"{self.namespace}/{self.name}"


class GatewayRoute(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Policy routing towards one gateway node: a table with a default route via it."""

    node: str
    slot: int
    """1-based allocation slot; ``fwmark`` and ``table`` derive from it."""
    fwmark: int
    table: int
    next_hop_ipv4: str | None
    next_hop_ipv6: str | None


class NodeDesiredState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The complete desired egress state of one node.

    ``services`` holds every labelled Service (sorted by namespace/name); those
    with nothing to do on this node have role ``NONE`` and no ``families``, so
    that status can show them. ``routes`` holds one entry per gateway node that
    some Service on this node forwards to (sorted by slot).
    """

    node: str
    fwmask: int
    exclude_dst_ipv4: tuple[str, ...]
    exclude_dst_ipv6: tuple[str, ...]
    services: tuple[ServiceEgress, ...] = ()
    routes: tuple[GatewayRoute, ...] = ()
    transit_guard_ipv4: tuple[str, ...] = ()
    """Sources (canonical CIDRs, sorted) of pods on *other* nodes: the pod CIDRs of the other
    nodes and the other nodes' endpoints of labelled Services.

    A *new* forwarded connection from one of them to a destination outside the
    exclude CIDRs is rejected unless this node SNATs it (or marks it). Such
    traffic only passes this node because some node's agent forwards it here as
    to a gateway; if this node's agent does not (yet) know it is the gateway —
    it reacts later than the others after a failover, or the pod is too new to
    be in an EndpointSlice — the node's own masquerade would send it out with
    the node's IP. Fail closed instead.
    """
    transit_guard_ipv6: tuple[str, ...] = ()

    def egress(self, family: Family, action: Action) -> list[tuple[ServiceEgress, FamilyEgress]]:
        """All (service, family egress) pairs with the given family and action, in order."""
        return [
            (service, entry)
            for service in self.services
            for entry in service.families
            if entry.family == family and entry.action == action
        ]


def fwmask_shift(fwmask: int) -> int:
    """The bit position of the lowest set bit of a (non-zero) mask."""
    return (fwmask & -fwmask).bit_length() - 1


def fwmask_capacity(fwmask: int) -> int:
    """How many gateway nodes the mask can address (mark value 0 is never used)."""
    return (fwmask >> fwmask_shift(fwmask)) if fwmask else 0


def describe_egress(service: ServiceEgress, *, brief: bool = False) -> str:
    """What this node does with a Service's egress, per family, in one line for humans.

    The one rendering of a :class:`ServiceEgress` in text: the ``DETAIL`` column
    of ``metaleg-supervisor status``, the watcher's log line per decision and
    the message of the Event on the Service. For example::

        IPv4: egress here as 198.51.100.200 (3 sources)
        IPv4: egress via node-b as 198.51.100.200 (mark 0x100000, 1 source); IPv6: ...
        IPv4 and IPv6: egress rejected: no ServiceL2Status names a known gateway node (2 sources)
        IPv4: egress here as 198.51.100.200 to 192.0.2.25/32 on tcp/25, tcp/587 (3 sources)
        no endpoints on this node

    "here" is this node as the gateway, SNAT to the LoadBalancer IP; "via" is
    the gateway node the sources are marked and routed to, and the address they
    leave it with. Families that read the same are named together.

    ``brief`` leaves out the source counts and the firewall mark: Events are
    posted only when the rest changes (role, gateway, LoadBalancer IPs, action
    and reason per family, see :mod:`metaleg.watcher.main`), so a count shown
    on the Service would go stale.
    """
    texts: dict[str, list[str]] = {}
    for entry in service.families:
        notes: list[str] = []
        if entry.action == Action.SNAT:
            text = f"egress here as {entry.snat_ip}"
        elif entry.action == Action.MARK:
            text = f"egress via {service.gateway_node or '<unknown>'}"
            address = _lb_ip(service, entry.family)
            if address is not None:
                text += f" as {address}"
            if entry.fwmark is not None:
                notes.append(f"mark {entry.fwmark:#x}")
        else:
            text = f"egress rejected: {entry.reason}" if entry.reason else "egress rejected"
        if entry.destinations:
            text += f" to {', '.join(entry.destinations)}"
        if service.destination_ports:
            text += f" on {', '.join(str(ports) for ports in service.destination_ports)}"
        if not brief:
            count = len(entry.source_ips)
            notes.append(f"{count} source{'' if count == 1 else 's'}")
            text += f" ({', '.join(notes)})"
        texts.setdefault(text, []).append(f"IPv{int(entry.family)}")
    if not texts:
        return "no endpoints on this node"
    return "; ".join(f"{' and '.join(families)}: {text}" for text, families in texts.items())


def _lb_ip(service: ServiceEgress, family: Family) -> str | None:
    """The Service's LoadBalancer IP in ``family`` (the address its sources leave with)."""
    for address in service.lb_ips:
        if (":" in address) == (family == Family.IPV6):
            return address
    return None
