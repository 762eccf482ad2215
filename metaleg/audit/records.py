"""Which Service a conntrack event belongs to, and the fields of its audit line.

On the gateway node the firewall SNATs each source of a Service in role
``gateway`` (per family, action ``snat``) to the Service's LB IP. A new
connection was SNATed to an LB IP when its ORIGINAL source is such a pod IP and
its REPLY destination is that Service's LB IP (the kernel translated it there):
:class:`SnatIndex` maps exactly these pairs to the Service. A pod IP of two
labelled Services is told apart by the LB IP the kernel chose; two Services on
one LB IP (a shared MetalLB IP) give the first by namespace/name.

Connections that were not SNATed to the LB IP match nothing: traffic to
``FIREWALL_EXCLUDE_DST_CIDRS``, connections into the Service (DNAT), other
nodes' roles (``forwarder``: the pod's traffic leaves with its own IP here).

The line's fields (:data:`FIELDS`, documented in the README) are stable; ICMP and
ICMPv6 have no ports: their lines carry ``icmp_type``, ``icmp_code``,
``icmp_id`` and ``snat_icmp_id`` (the echo identifier, which SNAT may change like
a port) instead of the four port fields.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from metaleg.firewall.wire.conntrack import PROTOCOL_NAMES, ConntrackEvent, Entry
from metaleg.logs import AUDIT_FIELDS
from metaleg.model import Action, NodeDesiredState, ServiceEgress

FIELDS = ("service", *AUDIT_FIELDS)
"""Every field an audit line can carry besides the log format's own (time, level, ...)."""

_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def canonical(family: int, address: str) -> str:
    """``address`` as the kernel's events spell it (``inet_ntop``), so that the index and the
    events compare as strings; raises ``OSError`` for a malformed address."""
    return socket.inet_ntop(family, socket.inet_pton(family, address))


class SnatIndex:
    """(pod IP, LB IP) -> Service key, for the Services this node SNATs; follows the desired
    state as it changes.

    :meth:`update` recomputes only the Services whose object changed (unchanged ones
    are the same objects from one state to the next, see :func:`metaleg.state_changes.apply_change`).
    """

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, str], str] = {}
        self._services: tuple[ServiceEgress, ...] = ()
        self._memo: dict[int, tuple[ServiceEgress, list[tuple[str, str]]]] = {}

    def __len__(self) -> int:
        return len(self._pairs)

    def update(self, state: NodeDesiredState | None) -> None:
        """Take the Services of ``state`` (None: none)."""
        services = state.services if state is not None else ()
        if services is self._services:
            return
        memo: dict[int, tuple[ServiceEgress, list[tuple[str, str]]]] = {}
        pairs: dict[tuple[str, str], str] = {}
        for service in services:
            known = self._memo.get(id(service))
            keys = known[1] if known is not None and known[0] is service else snat_pairs(service)
            memo[id(service)] = (service, keys)
            for key in keys:
                pairs.setdefault(key, service.key)
        self._services, self._memo, self._pairs = services, memo, pairs

    def service(self, pod_ip: str, snat_ip: str) -> str | None:
        """The Service whose pod ``pod_ip`` this node SNATs to ``snat_ip`` (canonical forms)."""
        return self._pairs.get((pod_ip, snat_ip))


def snat_pairs(service: ServiceEgress) -> list[tuple[str, str]]:
    """(pod IP, LB IP) of every source this node SNATs for ``service``, in canonical form."""
    pairs = []
    for entry in service.families:
        if entry.action != Action.SNAT or not entry.snat_ip:
            continue
        family = _FAMILIES[int(entry.family)]
        try:
            snat_ip = canonical(family, entry.snat_ip)
            pairs += [(canonical(family, source), snat_ip) for source in entry.source_ips]
        except OSError:
            continue  # not an address of the family: the firewall reports it
    return pairs


class AuditRecord(NamedTuple):
    """One SNATed connection: the Service, and its addresses before and after SNAT."""

    service: str
    original: Entry
    """The ORIGINAL tuple: the pod's address and port, the destination's."""
    reply: Entry
    """The REPLY tuple: its destination is the LB IP and the port after SNAT."""

    @property
    def proto(self) -> str:
        return PROTOCOL_NAMES.get(self.original.protocol, str(self.original.protocol))

    def fields(self) -> dict[str, object]:
        """The line's fields (see :data:`FIELDS`): ports for protocols with ports, the ICMP
        type, code and identifiers for ICMP; absent fields are left out."""
        original, reply = self.original, self.reply
        fields: dict[str, object] = {
            "audit": "snat",
            "service": self.service,
            "proto": self.proto,
            "pod_ip": original.source,
            "snat_ip": reply.destination,
            "dst_ip": original.destination,
        }
        if original.source_port is not None and original.icmp_type is None:
            fields["pod_port"] = original.source_port
            fields["snat_port"] = reply.destination_port
            fields["dst_port"] = original.destination_port
        else:
            for name, value in (
                ("icmp_type", original.icmp_type),
                ("icmp_code", original.icmp_code),
                ("icmp_id", original.icmp_id),
                ("snat_icmp_id", reply.icmp_id),
            ):
                if value is not None:
                    fields[name] = value
        return fields

    def message(self) -> str:
        """The line's text: ``snat tcp 10.244.1.10:40000 as 198.51.100.200:40001 to 203.0.113.1:25``."""
        original, reply = self.original, self.reply
        with_ports = original.source_port is not None and original.icmp_type is None
        return (
            f"snat {self.proto} "
            f"{_endpoint(original.source, original.source_port if with_ports else None)} as "
            f"{_endpoint(reply.destination, reply.destination_port if with_ports else None)} to "
            f"{_endpoint(original.destination, original.destination_port if with_ports else None)}"
        )


def _endpoint(address: str, port: int | None) -> str:
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def match(index: SnatIndex, event: ConntrackEvent) -> AuditRecord | None:
    """The audit record of ``event`` when it is a connection this node SNATed to the LB IP of
    one of its Services, else None."""
    reply = event.reply
    if reply is None:
        return None
    service = index.service(event.original.source, reply.destination)
    if service is None:
        return None
    return AuditRecord(service, event.original, reply)
