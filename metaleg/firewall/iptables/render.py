"""What the ``iptables`` backend puts into the kernel for a desired state: sets and tables.

The layout (the Go original's, with the same names, so that an upgrade finds
and cleans up its leftovers), per address family:

* ipsets ``METALEG-EXCLUDE-DST-<4|6>`` (``hash:net``, the excluded destinations),
  ``METALEG-TRANSIT-<4|6>`` (``hash:net``, the transit guard's sources: other
  nodes' pods), per SNAT Service ``METALEG-SRC-<4|6>-<12 hex>`` (``hash:ip``, its
  source IPs, for its SNAT and stale binding rules), ``METALEG-SNATTED-<4|6>`` and
  ``METALEG-REJECTED-<4|6>`` (``hash:ip``: the sources of every SNAT, resp. REJECT
  Service, for the rules that are the same for all of them) and
  ``METALEG-MARK-<4|6>`` (``hash:ip skbinfo``: every source of a MARK Service
  with its mark, ``<ip> skbmark <mark>/<mask>``). A change of a Service between
  MARK and REJECT, or of its sources, thus edits members and commits no table;
* mangle ``PREROUTING -j METALEG-RT-MARK``: exclude RETURN, then (while the
  family has MARK Services) ``-j SET --map-set METALEG-MARK-<f> src
  --map-mark``: one rule marks every source with its member's mark, applied
  like the Go original's per-Service ``-j MARK --set-xmark <mark>/<mask>``
  (only the mask's bits change). A source of two MARK Services gets the later
  one's mark, as the later of two MARK rules would set it. A gateway moving
  between other nodes thus changes members' marks in place (atomically, one
  netlink batch) and commits no table;
* nat ``POSTROUTING``: ``-m mark ! --mark 0x0/<mask> -j RETURN`` (marked packets
  skip the node's masquerade), then ``-j METALEG-SNAT``: exclude RETURN, then per
  SNAT Service ``... -j SNAT --to-source <LB IP>``;
* filter ``FORWARD -j METALEG-REJECT``: first, for the REJECT, SNAT and mark sets,
  ``-m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m set --match-set
  <set> dst -m set ! --match-set METALEG-EXCLUDE-DST-<f> src -j DROP`` (stray
  replies after a gateway move, see :func:`stray_reply_rule`); exclude RETURN, then
  ``-m set --match-set METALEG-REJECTED-<f> src -j REJECT --reject-with
  icmp(6)-port-unreachable``; per SNAT Service in order ``-m set --match-set <src>
  src -m mark --mark 0x0/<mask> -m conntrack ! --ctrepldst <LB IP> --ctstatus
  CONFIRMED --ctdir ORIGINAL -j DROP`` (a flow whose conntrack entry predates the
  SNAT and carries another binding: dropped until the conntrack flush after the
  change, see :func:`stale_binding_rule`, and for its place in a change,
  ``IptablesBackend._execute``); ``-m set --match-set METALEG-SNATTED-<f> src -m
  conntrack ! --ctstate DNAT --ctdir REPLY -j DROP`` (the pods' answers in a
  connection opened to their pod IP, :func:`reply_leak_rule`); then the transit
  guard (only while the family's guard list is non-empty): ``-m mark ! --mark
  0x0/<mask> -j RETURN`` (marked: forwarded to a gateway), ``-m set --match-set
  METALEG-SNATTED-<f> src -j RETURN`` (SNATed here), and finally ``-m conntrack
  --ctstate NEW -m set --match-set METALEG-TRANSIT-<f> src -j REJECT``: a new
  connection of another node's pod that this node neither SNATs nor marks would
  leave with the node's own (masqueraded) address, so it is rejected (see
  :attr:`~metaleg.model.NodeDesiredState.transit_guard_ipv4`).

Rules that are the same for every Service match a shared set, so that filter
holds one rule per SNAT Service (its stale binding DROP) plus a few: each table
commit (libiptc reads and writes the whole table) costs less, and the SNATed set
is the guard's exception, whose members change between table commits
(``IptablesBackend._execute``).

Destination policies (:mod:`metaleg.firewall.iptables.policy`) add, in a family
with policed sources, right after each exclusion RETURN, a rule per destination
class and one for ports through which the traffic a policy does not cover leaves
the chain (RETURN in ``METALEG-RT-MARK`` and ``METALEG-SNAT``, ``-g
METALEG-UNCOVERED`` in ``METALEG-REJECT``), and the stray reply DROPs jump to
``METALEG-STRAY`` instead.

Counters: the shared SNAT, REJECT and mark sets have the ``counters`` extension,
and only one rule's lookup counts each: the reply leak DROP's (every forwarded
packet of a SNAT source that reaches it: its traffic to covered, not excluded
destinations), the REJECT's, and the mark rule's (``--map-set``); every other
lookup of these sets says ``! --update-counters``. Their members' counters summed
per Service are :meth:`IptablesBackend.read_counts
<metaleg.firewall.iptables.backend.IptablesBackend.read_counts>`.

:class:`Rendering` renders a :class:`~metaleg.model.NodeDesiredState` per
Service (pure data, unit-testable) and writes the complete
:class:`DesiredFirewall`; :mod:`metaleg.firewall.iptables.incremental` moves
it from one state to the next.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import NamedTuple

import msgspec

from metaleg.backend import BackendError
from metaleg.firewall.claims import ServiceKey
from metaleg.firewall.iptables.ipsets import HASH_IP, HASH_IP_MARK, HASH_NET, SetSpec
from metaleg.firewall.iptables.policy import (
    UNPOLICED,
    ClaimPolicy,
    FamilyPart,
    PolicyIndex,
    PolicyLayout,
    claim_policy,
)
from metaleg.firewall.iptables.rules import (
    MARK_CHAIN,
    REJECT_CHAIN,
    SNAT_CHAIN,
    STRAY_CHAIN,
    UNCOVERED_CHAIN,
    Rule,
    TableSpec,
    drop_rule,
    exclude_rule,
    exclude_set_name,
    jump_rule,
    mark_map_rule,
    mark_set_name,
    mark_skip_rule,
    port_set_name,
    port_source_set_name,
    reject_rule,
    rejected_set_name,
    reply_leak_rule,
    snat_rule,
    snatted_set_name,
    source_return_rule,
    source_set_name,
    stale_binding_rule,
    stray_reply_rule,
    transit_reject_rule,
    transit_set_name,
    uncovered_rule,
)
from metaleg.firewall.wire.ipset import skbmark_member
from metaleg.model import Action, Family, NodeDesiredState, ServiceEgress

TABLES = ("mangle", "nat", "filter")
"""The tables metaleg uses, in the order they are committed in the make phase (``Mode.KEEP_OLD``):
the MARK and SNAT rules exist before filter gains the transit guard's exceptions for them,
and the SNAT before the stale binding DROP that allows only its LB IP."""
FAMILIES = (Family.IPV4, Family.IPV6)


class DesiredFirewall(msgspec.Struct, frozen=True):
    """Everything the backend puts into the kernel for one state: sets and tables."""

    sets: dict[str, SetSpec]
    tables: dict[Family, dict[str, TableSpec]]
    """Per family, per table name (``mangle``, ``nat``, ``filter``)."""


def exclude_networks(cidrs: tuple[str, ...], family: Family) -> frozenset[str]:
    """The canonical members of the exclude set for one family (see :func:`net_members`)."""
    return net_members(exclude_set_name(family), cidrs, family)


def net_members(set_name: str, cidrs: tuple[str, ...], family: Family) -> frozenset[str]:
    """The canonical members of a ``hash:net`` set of one family, from CIDRs.

    ``hash:net`` cannot hold a /0, so "everything" is stored as its two halves.
    Errors name the set.
    """
    networks: set[str] = set()
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError as error:
            raise BackendError(f"ipset {set_name}: invalid CIDR {cidr!r}: {error}") from error
        if network.version != family:
            raise BackendError(f"ipset {set_name}: {cidr} is not an IPv{int(family)} network")
        if network.prefixlen == 0:
            networks.update(str(half) for half in network.subnets(prefixlen_diff=1))
        else:
            networks.add(str(network))
    return frozenset(networks)


def render(state: NodeDesiredState) -> DesiredFirewall:
    """The complete kernel state for ``state``: every set and every table of both families.

    Raises :class:`BackendError` for data the kernel objects cannot express
    (e.g. SNAT without an address), before anything is touched.
    """
    return Rendering(state).desired()


class RenderedFamily(NamedTuple):
    """One Service in one family, rendered."""

    action: Action
    source_set: SetSpec | None
    """SNAT: its ``METALEG-SRC-*`` set, which its SNAT and stale binding rules match;
    REJECT and MARK Services have none (their sources are members of a shared set)."""
    rules: tuple[Rule, ...]
    """SNAT: the SNAT rule (nat) and the stale binding DROP (filter); none otherwise."""
    sources: frozenset[str]
    """The canonical source addresses."""
    marks: tuple[tuple[str, str], ...]
    """MARK: each source's member of the mark set, (address, member), by address."""
    policy: ClaimPolicy = UNPOLICED
    """The Service's destination policy in the family."""


def policy_parts(parts: RenderedService | None) -> dict[Family, FamilyPart]:
    """A Service's sources and policy per family, as :class:`PolicyIndex` takes them."""
    if parts is None:
        return {}
    return {
        family: (part.sources, part.policy)
        for family, part in zip(FAMILIES, parts, strict=True)
        if part is not None
    }


def shared_set(name: str, family: Family, members: frozenset[str]) -> SetSpec:
    """A shared SNAT or REJECT set (counted: its members' counters are per-Service counts)."""
    return SetSpec(name, HASH_IP, family, members, counters=True)


def mark_set(family: Family, members: frozenset[str]) -> SetSpec:
    """The mark set of a family (counted, as :func:`shared_set`)."""
    return SetSpec(mark_set_name(family), HASH_IP_MARK, family, members, counters=True)


RenderedService = tuple[RenderedFamily | None, RenderedFamily | None]
"""Per family (:data:`FAMILIES` order); None without sources in the family."""
SHARED_SETS = {
    (family, action): name_of(family)
    for family in FAMILIES
    for action, name_of in ((Action.SNAT, snatted_set_name), (Action.REJECT, rejected_set_name))
}
"""The set each SNAT and REJECT Service's sources are members of, per family."""


class Rendering:
    """A desired state rendered per Service, with what the tables and shared sets are built from.

    Holds each Service's rendered parts, the mark set's owner of every address (the
    *later* MARK Service in order: with one MARK rule per Service, the later rule
    would set the mark), how many Services claim each member of the shared SNAT and
    REJECT sets, and the tables; :meth:`desired` writes the complete
    :class:`DesiredFirewall`.
    """

    def __init__(self, state: NodeDesiredState, previous: Rendering | None = None) -> None:
        """Render ``state`` in full, reusing ``previous``'s parts of unchanged Services
        (canonicalising 20000 source IPs at N=1000 costs ~0.15 s). Raises
        :class:`BackendError` naming a bad entry."""
        if not 0 < state.fwmask <= 0xFFFFFFFF:
            raise BackendError(f"firewall mask {state.fwmask:#x} is not a non-zero 32-bit mask")
        self.state = state
        self.fwmask = state.fwmask
        reuse = previous if previous is not None and previous.fwmask == state.fwmask else None
        self.services: dict[ServiceKey, ServiceEgress] = {}
        self.parts: dict[ServiceKey, RenderedService] = {}
        self.ordered = True
        self.mark_owner: dict[Family, dict[str, ServiceKey]] = {f: {} for f in FAMILIES}
        """Per family, address -> the MARK Service whose mark it gets."""
        self.mark_contenders: dict[Family, dict[str, tuple[ServiceKey, ...]]] = {
            f: {} for f in FAMILIES
        }
        """Addresses of several MARK Services: all of them, sorted (rare)."""
        self.marked: dict[Family, dict[str, str]] = {f: {} for f in FAMILIES}
        """Per family, address -> its member of the mark set."""
        self.shared: dict[str, dict[str, int]] = {name: {} for name in SHARED_SETS.values()}
        """Per shared set, its members and how many Services claim each."""
        self.snat_keys: list[ServiceKey] = []
        """The Services with rules of their own (SNAT in a family), in state order (sorted
        when the state is): the tables are built from these alone."""
        previous_key: ServiceKey | None = None
        for service in state.services:
            key = (service.namespace, service.name)
            if previous_key is not None and key <= previous_key:
                self.ordered = False
            previous_key = key
            parts = (
                reuse.parts[key]
                if reuse is not None and reuse.services.get(key) == service
                else None
            )
            if parts is None:
                parts = render_service(service, state.fwmask)
            self.services[key] = service
            self.parts[key] = parts
            if has_own_rules(parts):
                self.snat_keys.append(key)
            for family, part in zip(FAMILIES, parts, strict=True):
                if part is None:
                    continue
                shared_name = SHARED_SETS.get((family, part.action))
                if shared_name is not None:
                    claims = self.shared[shared_name]
                    for address in part.sources:
                        claims[address] = claims.get(address, 0) + 1
                if not part.marks:
                    continue
                owner, contenders = self.mark_owner[family], self.mark_contenders[family]
                for address, _ in part.marks:
                    first = owner.get(address)
                    if first is not None and first != key:
                        contenders[address] = (*contenders.get(address, (first,)), key)
                    owner[address] = key
                self.marked[family].update(part.marks)
        for family_contenders in self.mark_contenders.values():
            for address, keys in family_contenders.items():
                family_contenders[address] = tuple(sorted(set(keys)))
        self.excluded = {
            family: exclude_networks(_exclude_cidrs(state, family), family) for family in FAMILIES
        }
        self.transit_sets = transit_guard_sets(state)
        self.policies = PolicyIndex.build(
            (key, policy_parts(parts)) for key, parts in self.parts.items()
        )
        self.tables = self.build_tables(
            [self.parts[key] for key in self.snat_keys],
            {f: bool(self.marked[f]) for f in FAMILIES},
            {name for name, claims in self.shared.items() if claims},
            self.transit_sets,
            self.policies.layouts(),
        )

    def desired(self) -> DesiredFirewall:
        """Every set and table of the rendered state."""
        sets: dict[str, SetSpec] = {}
        for family in FAMILIES:
            if self.excluded[family]:
                name = exclude_set_name(family)
                sets[name] = SetSpec(name, HASH_NET, family, self.excluded[family])
        for parts in self.parts.values():
            for part in parts:
                if part is not None and part.source_set is not None:
                    sets[part.source_set.name] = part.source_set
        for (family, _), name in SHARED_SETS.items():
            if self.shared[name]:
                sets[name] = shared_set(name, family, frozenset(self.shared[name]))
        for family in FAMILIES:
            if self.marked[family]:
                spec = mark_set(family, frozenset(self.marked[family].values()))
                sets[spec.name] = spec
            transit = self.transit_sets[family]
            if transit is not None:
                sets[transit.name] = transit
        sets.update(self.policies.desired_sets())
        return DesiredFirewall(sets=sets, tables=self.tables)

    def build_tables(
        self,
        in_order: list[RenderedService],
        has_marks: dict[Family, bool],
        shared: set[str],
        transit_sets: dict[Family, SetSpec | None],
        policies: dict[Family, PolicyLayout],
    ) -> dict[Family, dict[str, TableSpec]]:
        """The tables of both families from the SNAT Services' rules (``in_order``: their
        parts, in Service order), the rules over the sets that are not empty
        (``has_marks``, ``shared``) and the destination policies' rules (``policies``)."""
        fwmask = self.fwmask
        tables: dict[Family, dict[str, TableSpec]] = {}
        for index, family in enumerate(FAMILIES):
            excluded = bool(self.excluded[family])
            head = (exclude_rule(family),) if excluded else ()
            layout = policies[family]
            policed = layout.policed
            snatted, rejected = snatted_set_name(family), rejected_set_name(family)
            snat_rules: list[Rule] = []
            stale_bindings: list[Rule] = []
            for parts in in_order:
                part = parts[index]
                if part is not None and part.rules:  # SNAT
                    snat_rules.append(part.rules[0])
                    stale_bindings.append(part.rules[1])
            if snat_rules:
                snat_rules[:0] = policy_rules(family, layout, "RETURN")
            snat_rules[:0] = head
            strays: list[Rule] = []
            reject_rules: list[Rule] = [*head, *policy_rules(family, layout, UNCOVERED_CHAIN)]
            guard_returns: list[Rule] = []
            if rejected in shared:
                strays.append(stray_reply_rule(rejected, family, excluded, policed))
                reject_rules.append(reject_rule(rejected, family))
            reject_rules += stale_bindings
            if snatted in shared:
                strays.append(stray_reply_rule(snatted, family, excluded, policed))
                reject_rules.append(reply_leak_rule(snatted))
                guard_returns.append(source_return_rule(snatted))
            mark_rules: list[Rule] = list(head)
            if has_marks[family]:
                mark_rules += policy_rules(family, layout, "RETURN")
                mark_rules.append(mark_map_rule(family))
                strays.append(stray_reply_rule(mark_set_name(family), family, excluded, policed))
            transit_reject: tuple[Rule, ...] = ()
            if transit_sets[family] is not None:
                transit_reject = (transit_reject_rule(family),)
                reject_rules += (mark_skip_rule(fwmask), *guard_returns, *transit_reject)
            filter_chains = {REJECT_CHAIN: (*strays, *reject_rules)}
            if policed:
                filter_chains[UNCOVERED_CHAIN] = transit_reject
                filter_chains[STRAY_CHAIN] = (
                    *policy_rules(family, layout, "RETURN", reply=True),
                    drop_rule(),
                )
            tables[family] = {
                "mangle": TableSpec(
                    name="mangle",
                    chains={MARK_CHAIN: tuple(mark_rules)},
                    heads={"PREROUTING": (jump_rule(MARK_CHAIN),)},
                ),
                "nat": TableSpec(
                    name="nat",
                    chains={SNAT_CHAIN: tuple(snat_rules)},
                    heads={"POSTROUTING": (mark_skip_rule(fwmask), jump_rule(SNAT_CHAIN))},
                ),
                "filter": TableSpec(
                    name="filter",
                    chains=filter_chains,
                    heads={"FORWARD": (jump_rule(REJECT_CHAIN),)},
                ),
            }
        return tables


def policy_rules(
    family: Family, layout: PolicyLayout, into: str, *, reply: bool = False
) -> list[Rule]:
    """The rules through which traffic that ``layout``'s policies do not cover goes ``into``
    (RETURN, or the uncovered chain); ``reply``: for packets *to* the sources."""
    rules = [
        uncovered_rule(sources, networks, "dst", into=into, reply=reply)
        for sources, networks in layout.class_sets(family)
    ]
    if layout.ports:
        rules.append(
            uncovered_rule(
                port_source_set_name(family),
                port_set_name(family),
                "src,dst",
                into=into,
                reply=reply,
            )
        )
    return rules


def has_own_rules(parts: RenderedService | None) -> bool:
    """Whether a Service has rules of its own in some family (it is SNATed there)."""
    return parts is not None and any(part is not None and part.rules for part in parts)


def _exclude_cidrs(state: NodeDesiredState, family: Family) -> tuple[str, ...]:
    return state.exclude_dst_ipv4 if family is Family.IPV4 else state.exclude_dst_ipv6


def transit_guard_sets(state: NodeDesiredState) -> dict[Family, SetSpec | None]:
    """The transit guard's set of each family (None: no guard in the family)."""
    result: dict[Family, SetSpec | None] = {}
    for family in FAMILIES:
        cidrs = state.transit_guard_ipv4 if family is Family.IPV4 else state.transit_guard_ipv6
        name = transit_set_name(family)
        guarded = net_members(name, cidrs, family)
        result[family] = SetSpec(name, HASH_NET, family, guarded) if guarded else None
    return result


def render_service(service: ServiceEgress, fwmask: int) -> RenderedService:
    """One Service's parts in both families."""
    return (
        _render_family(service, Family.IPV4, fwmask),
        _render_family(service, Family.IPV6, fwmask),
    )


def _render_family(service: ServiceEgress, family: Family, fwmask: int) -> RenderedFamily | None:
    result: RenderedFamily | None = None
    seen = False
    for entry in service.families:
        if entry.family != family:
            continue
        context = f"service {service.key} IPv{int(family)}"
        if seen:
            raise BackendError(f"{context}: more than one entry for the family")
        seen = True
        if not entry.source_ips:
            continue  # nothing to match: no rule and no (empty) set
        sources = _source_members(context, family, entry.source_ips)
        policy = claim_policy(context, family, entry.destinations, service.destination_ports)
        if entry.action is Action.SNAT:
            snat_ip = _snat_address(context, family, entry.snat_ip)
            set_name = source_set_name(family, service.namespace, service.name)
            rules = (snat_rule(set_name, snat_ip), stale_binding_rule(set_name, snat_ip, fwmask))
            source_set = SetSpec(set_name, HASH_IP, family, sources)
            result = RenderedFamily(Action.SNAT, source_set, rules, sources, (), policy)
        elif entry.action is Action.MARK:
            fwmark = _fwmark(context, entry.fwmark, fwmask)
            marks = tuple(
                (address, skbmark_member(address, fwmark, fwmask)) for address in sorted(sources)
            )
            result = RenderedFamily(Action.MARK, None, (), sources, marks, policy)
        else:  # Action.REJECT, and anything unknown: fail closed
            result = RenderedFamily(Action.REJECT, None, (), sources, (), policy)
    return result


_ADDRESS_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}


def _source_members(context: str, family: Family, addresses: tuple[str, ...]) -> frozenset[str]:
    members: set[str] = set()
    address_family = _ADDRESS_FAMILY[family]
    for text in addresses:
        try:
            # The C parser is ~10x faster than ipaddress and writes the same text
            # (except IPv4 inside IPv6, which ipaddress may write differently).
            # Interned: one copy of the text however many indexes keep the address.
            canonical = socket.inet_ntop(address_family, socket.inet_pton(address_family, text))
            if "." not in canonical or family is Family.IPV4:
                members.add(sys.intern(canonical))
                continue
        except OSError:
            pass  # ipaddress decides, and says what is wrong
        try:
            address = ipaddress.ip_address(text)
        except ValueError as error:
            raise BackendError(f"{context}: invalid source IP {text!r}") from error
        if address.version != family:
            raise BackendError(f"{context}: source IP {text} is not IPv{int(family)}")
        members.add(str(address))
    return frozenset(members)


def _snat_address(context: str, family: Family, snat_ip: str | None) -> str:
    if snat_ip is None:
        raise BackendError(f"{context}: action snat without snat_ip")
    try:
        address = ipaddress.ip_address(snat_ip)
    except ValueError as error:
        raise BackendError(f"{context}: invalid snat_ip {snat_ip!r}") from error
    if address.version != family:
        raise BackendError(f"{context}: snat_ip {snat_ip} is not IPv{int(family)}")
    return str(address)


def _fwmark(context: str, fwmark: int | None, fwmask: int) -> int:
    if fwmark is None or fwmark == 0 or fwmark & ~fwmask:
        shown = "none" if fwmark is None else f"{fwmark:#x}"
        raise BackendError(f"{context}: fwmark {shown} is not a non-zero mark within {fwmask:#x}")
    return fwmark
