"""Per-Service counters of the ``iptables`` backend, from its shared sets' member counters.

The rules stay O(1) in the number of Services, so there is no rule per Service to read
counters from (nat's per-Service SNAT rules see only a connection's first packet). The
shared sets have the ``counters`` extension instead, and each counts its members'
packets and bytes in exactly one rule (:mod:`metaleg.firewall.iptables.render`):

* ``METALEG-SNATTED-<f>``: the reply leak DROP's lookup in filter, which every forwarded
  packet of a SNAT source to a covered, not excluded destination reaches (unless a stale
  binding DROP took it first): ``SNAT``;
* ``METALEG-MARK-<f>``: the mark rule's ``--map-set`` in mangle: ``MARK``;
* ``METALEG-REJECTED-<f>``: the REJECT's lookup in filter: ``REJECT``.

A source's counts go to the Service that treats it: for SNAT the first one by key
(whose SNAT rule comes first), for MARK the one whose mark it carries, for REJECT the
first one. A reading is at most six set listings (one per set and family) and a sum per
member; the address -> Service maps are rebuilt only when the applied state changed.
A member that leaves its set takes its counts with it, a member added (again) starts
at 0: a Service's count goes down when a source leaves it or when a re-sync recreated a
set, which the caller takes as a reset. The transit guard's rejects are not counted:
its set holds other nodes' pod networks, which the desired state does not map to
Services.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from metaleg.backend import EgressCount
from metaleg.firewall.claims import ServiceKey
from metaleg.firewall.iptables.render import FAMILIES, Rendering
from metaleg.firewall.iptables.rules import mark_set_name, rejected_set_name, snatted_set_name
from metaleg.firewall.wire.ipset_counters import MemberCount
from metaleg.model import Action, Family, NodeDesiredState

COUNTED_SETS = {
    (family, action): name_of(family)
    for family in FAMILIES
    for action, name_of in (
        (Action.SNAT, snatted_set_name),
        (Action.MARK, mark_set_name),
        (Action.REJECT, rejected_set_name),
    )
}
"""The set that counts each family's and action's traffic."""

_ADDRESS_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}

CountKey = tuple[ServiceKey, Family, Action]


class CountOwners:
    """Which Service each counted set member's counts belong to, for one applied state."""

    def __init__(self, rendering: Rendering) -> None:
        self.state: NodeDesiredState = rendering.state
        self.keys: list[CountKey] = []
        """Every (Service, family, action) with sources: each gets a count, 0 or more."""
        self.owners: dict[str, dict[bytes, int]] = {name: {} for name in COUNTED_SETS.values()}
        """Per counted set, packed address -> the index of its Service's key in :attr:`keys`."""
        index_of: dict[CountKey, int] = {}
        for key in sorted(rendering.parts):
            for family, part in zip(FAMILIES, rendering.parts[key], strict=True):
                if part is None:
                    continue
                index_of[key, family, part.action] = len(self.keys)
                self.keys.append((key, family, part.action))
                if part.action is Action.MARK:
                    continue  # the mark set's owners are the rendering's
                owners = self.owners[COUNTED_SETS[family, part.action]]
                index = index_of[key, family, part.action]
                pack = _packer(family)
                for address in part.sources:
                    owners.setdefault(pack(address), index)
        for family in FAMILIES:
            owners = self.owners[mark_set_name(family)]
            pack = _packer(family)
            for address, key in rendering.mark_owner[family].items():
                owners[pack(address)] = index_of[key, family, Action.MARK]


def _packer(family: Family) -> Callable[[str], bytes]:
    address_family = _ADDRESS_FAMILY[family]
    return lambda address: socket.inet_pton(address_family, address)


def egress_counts(
    owners: CountOwners, read: Callable[[str], list[MemberCount] | None]
) -> list[EgressCount]:
    """The counts of every (Service, family, action) of ``owners``' state, with ``read``
    listing a counted set's members (None: no such set)."""
    packets = [0] * len(owners.keys)
    octets = [0] * len(owners.keys)
    present = {(family, action) for _, family, action in owners.keys}
    for (family, action), name in COUNTED_SETS.items():
        if (family, action) not in present:
            continue
        by_address = owners.owners[name]
        for address, member_bytes, member_packets in read(name) or ():
            index = by_address.get(address)
            if index is not None:  # else not (or no longer) a source of this action
                packets[index] += member_packets
                octets[index] += member_bytes
    return [
        EgressCount(service[0], service[1], family, action, packets[index], octets[index])
        for index, (service, family, action) in enumerate(owners.keys)
    ]
