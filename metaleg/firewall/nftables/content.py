"""What the table's sets and maps hold (:class:`TableContent`), in canonical form.

Canonical so that what we write and what the kernel lists compare equal: interval
sets hold merged, non-overlapping prefixes (:func:`canonical_cidrs`), a source's
destination policy its merged prefixes and port ranges (:func:`canonical_policy`);
marks are written as 8 hex digits (:func:`mark_literal`).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from metaleg.backend import BackendError
from metaleg.firewall import conntrack
from metaleg.firewall.conntrack import EVERY_DESTINATION, DestinationPolicy, EgressView, Treatment
from metaleg.firewall.nftables.layout import SUFFIX, slot_set_name, slot_sets
from metaleg.model import Action, Family, NodeDesiredState, PortRange


def canonical_cidrs(cidrs: Iterable[str], family: Family) -> frozenset[str]:
    """Non-overlapping, merged prefixes covering ``cidrs`` (of ``family``).

    Interval sets reject overlapping elements and list adjacent ones merged or
    not depending on how they were added; going through merged ranges and back
    to prefixes gives one canonical form for what we add and what we read.
    """
    ranges: list[tuple[int, int]] = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr, strict=False)
        if network.version == family:
            ranges.append((int(network.network_address), int(network.broadcast_address)))
    return ranges_to_cidrs(ranges, family)


def ranges_to_cidrs(ranges: list[tuple[int, int]], family: Family) -> frozenset[str]:
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    address: Any = ipaddress.IPv4Address if family == Family.IPV4 else ipaddress.IPv6Address
    result: set[str] = set()
    for start, end in merged:
        result.update(
            str(n) for n in ipaddress.summarize_address_range(address(start), address(end))
        )
    return frozenset(result)


def _checked_cidrs(
    cidrs: Iterable[str], family: Family, what: str, strict: bool = False
) -> frozenset[str]:
    """:func:`canonical_cidrs`, raising :class:`BackendError` for a malformed CIDR (and,
    with ``strict``, for one of the other family instead of skipping it)."""
    suffix = SUFFIX[family]
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except (ValueError, TypeError) as error:
            raise BackendError(f"nftables: {what}_ipv{suffix}: invalid CIDR {cidr!r}") from error
        if strict and network.version != family:
            raise BackendError(f"nftables: {what}_ipv{suffix}: {cidr} is not an IPv{suffix} CIDR")
    return canonical_cidrs(cidrs, family)


def exclude_prefixes(state: NodeDesiredState) -> dict[Family, AbstractSet[str]]:
    """The exclusion sets' canonical prefixes (raises :class:`BackendError` for a malformed
    CIDR; one of the other family is skipped)."""
    return {
        Family.IPV4: _checked_cidrs(state.exclude_dst_ipv4, Family.IPV4, "exclude_dst"),
        Family.IPV6: _checked_cidrs(state.exclude_dst_ipv6, Family.IPV6, "exclude_dst"),
    }


def transit_prefixes(state: NodeDesiredState) -> dict[Family, frozenset[str]]:
    """The transit guard sets' canonical prefixes (raises :class:`BackendError` for a
    malformed CIDR or one of the other family)."""
    return {
        Family.IPV4: _checked_cidrs(
            state.transit_guard_ipv4, Family.IPV4, "transit_guard", strict=True
        ),
        Family.IPV6: _checked_cidrs(
            state.transit_guard_ipv6, Family.IPV6, "transit_guard", strict=True
        ),
    }


@functools.lru_cache(maxsize=4096)
def canonical_policy(policy: DestinationPolicy, family: Family) -> DestinationPolicy:
    """``policy`` as the table holds it for a source of ``family``: its CIDRs merged into
    non-overlapping prefixes (the interval set ``dst<f>`` refuses overlapping elements),
    sorted by address; its port ranges merged per protocol, sorted."""
    if policy == EVERY_DESTINATION:
        return policy
    prefixes = sorted(
        canonical_cidrs(policy.cidrs, family),
        key=lambda cidr: int(ipaddress.ip_network(cidr).network_address),
    )
    return DestinationPolicy(tuple(prefixes), merge_port_ranges(policy.ports))


def merge_port_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Overlapping and adjacent ranges of one protocol merged, sorted by protocol and port."""
    merged: list[PortRange] = []
    for port_range in sorted(ranges, key=lambda r: (r.protocol.value, r.first, r.last)):
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.protocol == port_range.protocol
            and port_range.first <= last.last + 1
        ):
            merged[-1] = PortRange(last.protocol, last.first, max(last.last, port_range.last))
            continue
        merged.append(port_range)
    return tuple(merged)


@functools.lru_cache(maxsize=4096)
def port_element(port_range: PortRange) -> str:
    """A port range as the protocol and port part of a ``port<f>`` element
    (``tcp . 25``, ``udp . 8000-8100``)."""
    if port_range.first == port_range.last:
        return f"{port_range.protocol.value} . {port_range.first}"
    return f"{port_range.protocol.value} . {port_range.first}-{port_range.last}"


def policy_elements(
    source: str, policy: DestinationPolicy
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The elements of ``dst<f>`` and of ``port<f>`` for ``source`` under its (canonical)
    ``policy``: ``<source> . <prefix>`` and ``<source> . <protocol> . <ports>``."""
    return (
        tuple(f"{source} . {cidr}" for cidr in policy.cidrs),
        tuple(f"{source} . {port_element(ports)}" for ports in policy.ports),
    )


def _empty_sets() -> dict[Family, AbstractSet[str]]:
    return {f: frozenset() for f in Family}


def _empty_maps() -> dict[Family, dict[str, str]]:
    return {f: {} for f in Family}


def _empty_marks() -> dict[Family, dict[str, int]]:
    return {f: {} for f in Family}


def _empty_policies() -> dict[Family, dict[str, DestinationPolicy]]:
    return {f: {} for f in Family}


def _empty_counts() -> dict[Family, dict[str, CountKey]]:
    return {f: {} for f in Family}


class CountKey(NamedTuple):
    """What a treated source's packets are counted as: its Service, family and action (the
    labels of :class:`~metaleg.backend.EgressCount`)."""

    namespace: str
    name: str
    family: Family
    action: Action


@dataclass(frozen=True)
class TableContent:
    """The dynamic part of the table: what the sets and maps hold."""

    exclude: dict[Family, AbstractSet[str]] = field(default_factory=_empty_sets)
    snat: dict[Family, dict[str, str]] = field(default_factory=_empty_maps)
    """source -> LoadBalancer IP"""
    mark: dict[Family, dict[str, int]] = field(default_factory=_empty_marks)
    """source -> its gateway's mark (the aggregate map ``mark<f>`` and the slot sets)"""
    reject: dict[Family, AbstractSet[str]] = field(default_factory=_empty_sets)
    transit: dict[Family, AbstractSet[str]] = field(default_factory=_empty_sets)
    """The transit guard's sources, canonical prefixes (like ``exclude``)."""
    policy: dict[Family, dict[str, DestinationPolicy]] = field(default_factory=_empty_policies)
    """source -> its Service's destination policy (:func:`canonical_policy`), for the
    sources of Services that have one: the sets ``policed_dst<f>``, ``dst<f>``,
    ``policed_port<f>`` and ``port<f>``."""
    count: dict[Family, dict[str, CountKey]] = field(default_factory=_empty_counts, compare=False)
    """source -> what its packets count as: every treated source is an element of the set
    ``count<f>`` (its counter), re-added (from 0) when its key changes. The kernel holds
    the elements only, so a table read back has no keys, and contents compare without
    them (the elements themselves are compared through :meth:`element_sets`)."""

    def fwmarks(self) -> frozenset[int]:
        """The gateway slots in use (each has a set per family and rules in ``fwmark``)."""
        return frozenset(m for table in self.mark.values() for m in set(table.values()))

    @functools.cached_property
    def view(self) -> EgressView:
        """The conntrack scoping view of this content (computed once per content), the
        sources' destination policies included (canonical: a change that leaves a
        policy's canonical form as it was outdates no flow)."""
        treatments: dict[Family, dict[str, Treatment]] = {f: {} for f in Family}
        # One Treatment per distinct LB IP / mark, not per source: this runs for
        # every snapshot and must not cost per-source object creation.
        rejected = Treatment(Action.REJECT)
        for family in Family:
            table = treatments[family]
            snat = {
                ip: Treatment(Action.SNAT, snat_ip=ip) for ip in set(self.snat[family].values())
            }
            table.update((source, snat[ip]) for source, ip in self.snat[family].items())
            marks = {m: Treatment(Action.MARK, fwmark=m) for m in set(self.mark[family].values())}
            table.update((source, marks[m]) for source, m in self.mark[family].items())
            table.update((source, rejected) for source in self.reject[family])
            # The policed sources' treatments carry their policy (a Treatment per
            # distinct treatment and policy, as above).
            with_policy: dict[tuple[Treatment, DestinationPolicy], Treatment] = {}
            for source, policy in self.policy[family].items():
                plain = table.get(source)
                if plain is not None:
                    key = (plain, policy)
                    if key not in with_policy:
                        with_policy[key] = plain._replace(policy=policy)
                    table[source] = with_policy[key]
        return EgressView(
            treatments,
            {family: conntrack.collapse_cidrs(self.exclude[family], family) for family in Family},
        )

    def element_sets(self) -> dict[str, AbstractSet[str]]:
        """Every plain set as nft element strings, keyed by set name (for diffs): the
        static ones and one per gateway slot and family."""
        result: dict[str, AbstractSet[str]] = {}
        for family in Family:
            s = SUFFIX[family]
            result[f"exclude{s}"] = self.exclude[family]
            result[f"reject{s}"] = self.reject[family]
            result[f"transit{s}"] = self.transit[family]
            policies = self.policy[family]
            result[f"policed_dst{s}"] = {a for a, p in policies.items() if p.cidrs}
            result[f"policed_port{s}"] = {a for a, p in policies.items() if p.ports}
            destinations: set[str] = set()
            ports: set[str] = set()
            for source, policy in policies.items():
                dst, port = policy_elements(source, policy)
                destinations.update(dst)
                ports.update(port)
            result[f"dst{s}"], result[f"port{s}"] = destinations, ports
            result[f"count{s}"] = self.count[family].keys()
        slots: dict[str, set[str]] = {name: set() for name in slot_sets(self.fwmarks())}
        for family in Family:
            for source, fwmark in self.mark[family].items():
                slots[slot_set_name(family, fwmark)].add(source)
        result.update(slots)
        return result

    def element_maps(self) -> dict[str, dict[str, str]]:
        result: dict[str, dict[str, str]] = {}
        for family in Family:
            s = SUFFIX[family]
            result[f"snat{s}"] = self.snat[family]
            result[f"mark{s}"] = {k: mark_literal(v) for k, v in self.mark[family].items()}
        return result

    def rekeyed_counts(self, new: TableContent) -> dict[str, set[str]]:
        """The elements of ``count<f>`` that stay from this content to ``new`` but count as
        another Service or action there (deleted and added again, so that they start
        from 0), by set name."""
        result: dict[str, set[str]] = {}
        for family in Family:
            was, now = self.count[family], new.count[family]
            result[f"count{SUFFIX[family]}"] = {
                source for source in was.keys() & now.keys() if was[source] != now[source]
            }
        return result

    def restarted_counts(self, new: TableContent) -> dict[Family, set[str]]:
        """The sources whose element of ``count<f>`` goes from this content to ``new``, or
        is added again there (from 0): what they had counted is no more in the kernel."""
        return {
            family: {
                source
                for source, key in self.count[family].items()
                if new.count[family].get(source) != key
            }
            for family in Family
        }

    def counts(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for family in Family:
            s = SUFFIX[family]
            sizes[f"exclude{s}"] = len(self.exclude[family])
            sizes[f"reject{s}"] = len(self.reject[family])
            sizes[f"transit{s}"] = len(self.transit[family])
            sizes[f"snat{s}"] = len(self.snat[family])
            sizes[f"mark{s}"] = len(self.mark[family])
            sizes[f"policy{s}"] = len(self.policy[family])
        return sizes


@functools.lru_cache(maxsize=1024)
def mark_literal(fwmark: int) -> str:
    return f"{fwmark:#010x}"
