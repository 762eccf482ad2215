"""Destination policies in the ``iptables`` backend: which traffic of a source is treated.

A Service's ``metaleg.de/destinationCIDRs`` (:attr:`FamilyEgress.destinations
<metaleg.model.FamilyEgress.destinations>`) and ``metaleg.de/destinationPorts``
(:attr:`ServiceEgress.destination_ports <metaleg.model.ServiceEgress.destination_ports>`)
narrow what of its sources' traffic takes the LB IP; the rest follows the node's normal
path as if the Service were not labelled. In iptables terms: in each of metaleg's chains
where a source is treated, right after the exclusion RETURN, traffic a policy does not
cover leaves the chain before any treatment:

* ``METALEG-RT-MARK`` (mangle) and ``METALEG-SNAT`` (nat): ``-j RETURN`` (no mark, so
  no mask skip and no null binding either; no SNAT);
* ``METALEG-REJECT`` (filter): ``-g METALEG-UNCOVERED``, which holds only the transit
  guard's REJECT: another node's pod is guarded here exactly as an unlabelled one
  (a forwarder that widened a policy before this gateway did must not have that
  traffic masqueraded here with the node's IP), and nothing else (no REJECT, no stale
  binding or reply DROP);
* the stray reply DROPs jump to ``METALEG-STRAY``, which first RETURNs for packets
  *to* a policed source from a peer its policy does not cover (swapped directions).

**Ports** cost O(1) rules: ``METALEG-PORTSRC-<f>`` (``hash:ip``, the sources with a
port policy) and ``METALEG-PORTS-<f>`` (``hash:ip,port``, each such source with its
protocols and ports) and one rule per chain: ``-m set --match-set METALEG-PORTSRC-<f>
src -m set ! --match-set METALEG-PORTS-<f> src,dst``. The kernel expands a range into
one element per port when it is added (a ``tcp/8000-8100`` policy: 101 elements per
source; the set may hold :data:`~metaleg.firewall.iptables.ipsets.PORT_SET_MAXELEM`);
the sets' members are written as runs (:mod:`metaleg.firewall.wire.ipset_ports`).

**Destinations** need a lookup of (source address, destination network). ipset has it
as ``hash:net,net`` (and ``hash:net,port,net``), but these types are optional kernel
modules that not every kernel builds (the test kernels do not), and ``hash:ip,port,net``
needs a port. So the destination check is one rule per *class*: a class is a
canonical (collapsed) list of networks, with ``METALEG-DSTSRC-<f>-<hash>`` (``hash:ip``,
the sources it polices) and ``METALEG-DSTNET-<f>-<hash>`` (``hash:net``, the networks),
and one rule per chain ``-m set --match-set METALEG-DSTSRC-<f>-<hash> src -m set !
--match-set METALEG-DSTNET-<f>-<hash> dst``. Services with the same destinations share
a class: the rules grow with the number of *distinct* destination lists, not with the
Services, their sources or their ports; sources and Services joining or leaving a
class, or moving between classes, change set members only.

A source claimed by several Services in a family (rare: the watcher gives each source
to one Service) is policed only as far as all of them are: if one of them has no
destinations (or no ports), the source is treated for every destination (port);
otherwise for the union of their networks (ports). A policy never narrows what another
Service treats.

:class:`PolicyIndex` keeps, per family, every source's claims, policed claims and
effective policy; it renders every set (:meth:`PolicyIndex.desired_sets`), and a step
(:meth:`PolicyIndex.step`) from the Services that differ gives the sets' member changes
and whether the rules change (a class or the port policy comes or goes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple

from metaleg.backend import BackendError
from metaleg.firewall.iptables.ipsets import HASH_IP, HASH_IP_PORT_KIND, HASH_NET, SetSpec
from metaleg.firewall.iptables.rules import policy_set_names, port_set_name, port_source_set_name
from metaleg.firewall.wire.ipset_ports import merge_runs, port_member
from metaleg.model import Family, PortRange, Protocol

ServiceKey = tuple[str, str]
Networks = tuple[str, ...]
"""A destination class: canonical (collapsed, sorted) networks of one family."""


class ClaimPolicy(NamedTuple):
    """What of a source's traffic is treated: by one Service (a claim), or in effect."""

    networks: Networks | None
    """None: every destination."""
    ports: tuple[PortRange, ...] | None
    """None: every protocol and port."""


UNPOLICED = ClaimPolicy(None, None)


def claim_policy(
    context: str, family: Family, destinations: tuple[str, ...], ports: tuple[PortRange, ...]
) -> ClaimPolicy:
    """The policy of one Service's entry (``context`` names it in errors): its destinations
    collapsed, its ports merged; raises :class:`BackendError` for data of another family
    or out of range."""
    networks: Networks | None = None
    if destinations:
        parsed = []
        for text in destinations:
            try:
                network = ipaddress.ip_network(text, strict=False)
            except ValueError as error:
                raise BackendError(f"{context}: invalid destination {text!r}") from error
            if network.version != family:
                raise BackendError(f"{context}: destination {text} is not IPv{int(family)}")
            parsed.append(network)
        networks = _collapse(parsed)
    merged: tuple[PortRange, ...] | None = None
    if ports:
        for entry in ports:
            if not 1 <= entry.first <= entry.last <= 0xFFFF:
                raise BackendError(f"{context}: invalid destination ports {entry}")
        merged = _merge_ports(ports)
    return ClaimPolicy(networks, merged)


def _collapse(networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Networks:
    collapsed = ipaddress.collapse_addresses(networks)  # type: ignore[type-var]
    return tuple(str(network) for network in collapsed)


def _merge_ports(ports: Iterable[PortRange]) -> tuple[PortRange, ...]:
    by_protocol: dict[Protocol, list[tuple[int, int]]] = {}
    for entry in ports:
        by_protocol.setdefault(entry.protocol, []).append((entry.first, entry.last))
    return tuple(
        PortRange(protocol, first, last)
        for protocol in sorted(by_protocol)
        for first, last in merge_runs(by_protocol[protocol])
    )


def effective_policy(policed: Iterable[ClaimPolicy], claims: int) -> ClaimPolicy:
    """The policy of a source with ``claims`` claims, ``policed`` those with a policy."""
    listed = list(policed)
    with_networks = [policy.networks for policy in listed if policy.networks is not None]
    with_ports = [policy.ports for policy in listed if policy.ports is not None]
    networks: Networks | None = None
    if with_networks and len(with_networks) == claims:
        networks = (
            with_networks[0]
            if len(with_networks) == 1
            else _collapse(ipaddress.ip_network(n) for ns in with_networks for n in ns)
        )
    ports: tuple[PortRange, ...] | None = None
    if with_ports and len(with_ports) == claims:
        ports = (
            with_ports[0]
            if len(with_ports) == 1
            else _merge_ports(p for ps in with_ports for p in ps)
        )
    return ClaimPolicy(networks, ports)


def port_members(address: str, ports: tuple[PortRange, ...]) -> set[str]:
    """The ``hash:ip,port`` members (runs) of one source's ports."""
    return {port_member(address, str(p.protocol), p.first, p.last) for p in ports}


def network_members(networks: Networks) -> frozenset[str]:
    """The ``hash:net`` members of a class (a /0, which ``hash:net`` cannot hold, as its
    two halves)."""
    members: set[str] = set()
    for text in networks:
        network = ipaddress.ip_network(text)
        if network.prefixlen == 0:
            members.update(str(half) for half in network.subnets(prefixlen_diff=1))
        else:
            members.add(text)
    return frozenset(members)


class PolicyLayout(NamedTuple):
    """What the rules of one family depend on: its classes and whether ports are policed."""

    classes: tuple[Networks, ...]
    """Sorted by their sets' names (the rules' order)."""
    ports: bool

    @property
    def policed(self) -> bool:
        return bool(self.classes) or self.ports

    def class_sets(self, family: Family) -> list[tuple[str, str]]:
        """(sources set, networks set) of each class, in order."""
        return [policy_set_names(family, networks) for networks in self.classes]


class FamilyPolicies:
    """One family's claims and effective policies."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self.claims: dict[str, int] = {}
        """Every claimed source and how many Services claim it."""
        self.policed: dict[str, dict[ServiceKey, ClaimPolicy]] = {}
        """Sources with a policed claim: those claims."""
        self.effective: dict[str, ClaimPolicy] = {}
        """Sources whose effective policy is not :data:`UNPOLICED`."""
        self.class_sizes: dict[Networks, int] = {}
        self.port_sources = 0

    def layout(self) -> PolicyLayout:
        """The family's classes and port policy."""
        return _layout(self.family, self.class_sizes, self.port_sources)


def _layout(family: Family, sizes: dict[Networks, int], port_sources: int) -> PolicyLayout:
    classes = sorted(
        (networks for networks, size in sizes.items() if size > 0),
        key=lambda networks: policy_set_names(family, networks)[0],
    )
    return PolicyLayout(tuple(classes), port_sources > 0)


FamilyPart = tuple[frozenset[str], ClaimPolicy]
"""A Service's sources in one family and their policy (from its rendered part)."""


class FamilyStep(NamedTuple):
    """One family's part of a :class:`PolicyStep`."""

    claims: dict[str, int]
    policed: dict[str, dict[ServiceKey, ClaimPolicy]]
    effective: dict[str, ClaimPolicy]
    class_sizes: dict[Networks, int]
    port_sources: int
    layout: PolicyLayout


class PolicyStep(NamedTuple):
    """The touched sources' claims and policies after a step, per family."""

    families: dict[Family, FamilyStep]
    layout_changed: bool
    """Whether a class or a family's port policy comes or goes (the rules change)."""

    def layouts(self, before: PolicyIndex) -> dict[Family, PolicyLayout]:
        """Every family's layout after the step."""
        return {
            family: self.families[family].layout
            if family in self.families
            else before.families[family].layout()
            for family in before.families
        }


class PolicyIndex:
    """Every family's :class:`FamilyPolicies`; see the module docstring."""

    def __init__(self, families: Iterable[Family]) -> None:
        self.families = {family: FamilyPolicies(family) for family in families}

    @classmethod
    def build(cls, parts: Iterable[tuple[ServiceKey, dict[Family, FamilyPart]]]) -> PolicyIndex:
        """The index of every Service's parts (``key -> family -> part``)."""
        index = cls((Family.IPV4, Family.IPV6))
        for key, by_family in parts:
            for family, (sources, policy) in by_family.items():
                family_index = index.families[family]
                claims = family_index.claims
                for address in sources:
                    claims[address] = claims.get(address, 0) + 1
                if policy != UNPOLICED:
                    policed = family_index.policed
                    for address in sources:
                        policed.setdefault(address, {})[key] = policy
        for family_index in index.families.values():
            for address, policies in family_index.policed.items():
                effective = effective_policy(policies.values(), family_index.claims[address])
                if effective != UNPOLICED:
                    family_index.effective[address] = effective
                    _count(family_index.class_sizes, effective, 1)
                    if effective.ports is not None:
                        family_index.port_sources += 1
        return index

    def layouts(self) -> dict[Family, PolicyLayout]:
        return {family: index.layout() for family, index in self.families.items()}

    def desired_sets(self) -> dict[str, SetSpec]:
        """Every policy set of every family, with all its members."""
        sets: dict[str, SetSpec] = {}
        for family, index in self.families.items():
            classes: dict[Networks, set[str]] = {}
            port_sources: set[str] = set()
            ports: set[str] = set()
            for address, policy in index.effective.items():
                if policy.networks is not None:
                    classes.setdefault(policy.networks, set()).add(address)
                if policy.ports is not None:
                    port_sources.add(address)
                    ports |= port_members(address, policy.ports)
            for networks, sources in classes.items():
                source_name, network_name = policy_set_names(family, networks)
                sets[source_name] = SetSpec(
                    source_name, HASH_IP, family, frozenset(sources), narrows=True
                )
                sets[network_name] = SetSpec(
                    network_name, HASH_NET, family, network_members(networks)
                )
            if port_sources:
                name = port_source_set_name(family)
                sets[name] = SetSpec(name, HASH_IP, family, frozenset(port_sources), narrows=True)
                name = port_set_name(family)
                sets[name] = SetSpec(name, HASH_IP_PORT_KIND, family, frozenset(ports))
        return sets

    def step(
        self,
        changes: Iterable[tuple[ServiceKey, dict[Family, FamilyPart], dict[Family, FamilyPart]]],
        before_sets: dict[str, SetSpec],
        after_sets: dict[str, SetSpec],
    ) -> PolicyStep:
        """The step for the Services that change, as (key, parts before, parts after); the
        sets they touch go into ``before_sets`` and ``after_sets`` (the touched members
        before and after, for :func:`~metaleg.firewall.iptables.ipsets.plan_sets`)."""
        deltas: dict[Family, dict[str, int]] = {family: {} for family in self.families}
        updates: dict[Family, dict[str, dict[ServiceKey, ClaimPolicy | None]]] = {
            family: {} for family in self.families
        }
        for key, old, new in changes:
            for parts, sign in ((old, -1), (new, 1)):
                for family, (sources, policy) in parts.items():
                    delta, update = deltas[family], updates[family]
                    for address in sources:
                        delta[address] = delta.get(address, 0) + sign
                        if policy != UNPOLICED:
                            # The part after the step overrides the one before.
                            update.setdefault(address, {})[key] = policy if sign > 0 else None
        families: dict[Family, FamilyStep] = {}
        changed = False
        for family, index in self.families.items():
            if not deltas[family] and not updates[family]:
                continue
            step = _family_step(family, index, deltas[family], updates[family])
            _step_sets(family, index, step, before_sets, after_sets)
            changed |= step.layout != index.layout()
            families[family] = step
        return PolicyStep(families, changed)

    def commit(self, step: PolicyStep) -> None:
        """Take ``step`` as applied."""
        for family, change in step.families.items():
            index = self.families[family]
            for address, count in change.claims.items():
                if count:
                    index.claims[address] = count
                else:
                    index.claims.pop(address, None)
            for address, policies in change.policed.items():
                if policies:
                    index.policed[address] = policies
                else:
                    index.policed.pop(address, None)
            for address, policy in change.effective.items():
                if policy == UNPOLICED:
                    index.effective.pop(address, None)
                else:
                    index.effective[address] = policy
            index.class_sizes = change.class_sizes
            index.port_sources = change.port_sources


def _count(sizes: dict[Networks, int], policy: ClaimPolicy, sign: int) -> None:
    if policy.networks is not None:
        size = sizes.get(policy.networks, 0) + sign
        if size:
            sizes[policy.networks] = size
        else:
            sizes.pop(policy.networks, None)


def _family_step(
    family: Family,
    index: FamilyPolicies,
    deltas: dict[str, int],
    updates: dict[str, dict[ServiceKey, ClaimPolicy | None]],
) -> FamilyStep:
    """The touched sources' claims, policed claims and effective policies after a step."""
    claims: dict[str, int] = {}
    policed: dict[str, dict[ServiceKey, ClaimPolicy]] = {}
    effective: dict[str, ClaimPolicy] = {}
    sizes = index.class_sizes
    copied = False
    port_sources = index.port_sources
    for address in deltas.keys() | updates.keys():
        count = claims[address] = index.claims.get(address, 0) + deltas.get(address, 0)
        policies = index.policed.get(address, {})
        update = updates.get(address)
        if update:
            policies = dict(policies)
            for key, policy in update.items():
                if policy is None:
                    policies.pop(key, None)
                else:
                    policies[key] = policy
            policed[address] = policies
        before = index.effective.get(address, UNPOLICED)
        after = effective_policy(policies.values(), count) if policies else UNPOLICED
        if after == before:
            continue
        effective[address] = after
        if before.networks != after.networks:
            if not copied:
                sizes, copied = dict(sizes), True
            _count(sizes, before, -1)
            _count(sizes, after, 1)
        port_sources += (after.ports is not None) - (before.ports is not None)
    layout = _layout(family, sizes, port_sources)
    return FamilyStep(claims, policed, effective, sizes, port_sources, layout)


def _step_sets(
    family: Family,
    index: FamilyPolicies,
    step: FamilyStep,
    before_sets: dict[str, SetSpec],
    after_sets: dict[str, SetSpec],
) -> None:
    """The touched members of the family's policy sets before and after ``step``."""
    leaving: dict[Networks, set[str]] = {}
    joining: dict[Networks, set[str]] = {}
    ports_before: set[str] = set()
    ports_after: set[str] = set()
    port_sources_before: set[str] = set()
    port_sources_after: set[str] = set()
    for address, after in step.effective.items():
        before = index.effective.get(address, UNPOLICED)
        if before.networks != after.networks:
            if before.networks is not None:
                leaving.setdefault(before.networks, set()).add(address)
            if after.networks is not None:
                joining.setdefault(after.networks, set()).add(address)
        if before.ports != after.ports:
            if before.ports is not None:
                port_sources_before.add(address)
                ports_before |= port_members(address, before.ports)
            if after.ports is not None:
                port_sources_after.add(address)
                ports_after |= port_members(address, after.ports)
    for networks in leaving.keys() | joining.keys():
        source_name, network_name = policy_set_names(family, networks)
        existed = index.class_sizes.get(networks, 0) > 0
        exists = step.class_sizes.get(networks, 0) > 0
        if existed:
            before_sets[source_name] = SetSpec(
                source_name, HASH_IP, family, frozenset(leaving.get(networks, ())), narrows=True
            )
        if exists:
            after_sets[source_name] = SetSpec(
                source_name, HASH_IP, family, frozenset(joining.get(networks, ())), narrows=True
            )
        if existed != exists:
            spec = SetSpec(network_name, HASH_NET, family, network_members(networks))
            (after_sets if exists else before_sets)[network_name] = spec
    if not (port_sources_before or port_sources_after or ports_before or ports_after):
        return
    source_name, port_name = port_source_set_name(family), port_set_name(family)
    # A source whose ports change stays policed: only its ports' members change.
    kept = port_sources_before & port_sources_after
    if index.port_sources:
        before_sets[source_name] = SetSpec(
            source_name, HASH_IP, family, frozenset(port_sources_before - kept), narrows=True
        )
        before_sets[port_name] = SetSpec(
            port_name, HASH_IP_PORT_KIND, family, frozenset(ports_before)
        )
    if step.port_sources:
        after_sets[source_name] = SetSpec(
            source_name, HASH_IP, family, frozenset(port_sources_after - kept), narrows=True
        )
        after_sets[port_name] = SetSpec(
            port_name, HASH_IP_PORT_KIND, family, frozenset(ports_after)
        )
