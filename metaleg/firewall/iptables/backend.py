"""The ``iptables`` firewall backend: legacy iptables/ip6tables rules plus ipsets.

Kernel layout (the Go original's, with the same names, so that an upgrade finds
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

How it works: :func:`render` turns a :class:`~metaleg.model.NodeDesiredState`
into plain data (sets and per-table specs, pure and unit-testable). The backend
keeps the applied state as a :class:`LiveRules` (each Service's rendered parts,
the mark set's owners, the tables) and derives each change from the Services
that differ, so that it costs what it changes: members only, unless a rule
changes (checked against :func:`render` by ``tests/test_iptables_incremental.py``).
Rules are written with python-iptables, one commit per table, by one helper
process per family (see :mod:`metaleg.firewall.iptables.helper` for why; they
build rules from cached parts, :mod:`metaleg.firewall.iptables.codec`); sets are
edited over netlink in batches (:mod:`metaleg.firewall.iptables.ipsets`,
:mod:`metaleg.firewall.wire.ipset`).
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import socket
import sys
from typing import NamedTuple

import msgspec

from metaleg.backend import BackendError
from metaleg.firewall.claims import ServiceKey, step_services
from metaleg.firewall.iptables.drift import IptablesDriftCheck
from metaleg.firewall.iptables.helper_client import TOOL, XtablesHelper
from metaleg.firewall.iptables.ipsets import (
    HASH_IP,
    HASH_IP_MARK,
    HASH_NET,
    IpsetClient,
    SetPlan,
    SetSpec,
    plan_sets,
)
from metaleg.firewall.iptables.protocol import Mode, SyncReply, SyncRequest
from metaleg.firewall.iptables.rules import (
    MARK_CHAIN,
    REJECT_CHAIN,
    SNAT_CHAIN,
    Rule,
    TableSpec,
    exclude_rule,
    exclude_set_name,
    is_stale_binding,
    jump_rule,
    mark_map_rule,
    mark_set_name,
    mark_skip_rule,
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
)
from metaleg.firewall.wire.ipset import skbmark_member
from metaleg.model import Action, Family, NodeDesiredState, ServiceEgress

TABLES = ("mangle", "nat", "filter")
"""The tables metaleg uses, in the order they are committed in the make phase (MERGE):
the MARK and SNAT rules exist before filter gains the transit guard's exceptions for them,
and the SNAT before the stale binding DROP that allows only its LB IP."""
BREAK_ORDER = ("filter", "mangle", "nat")
"""The order of the break phase (EXACT): filter first, so that the transit guard's exceptions
(RETURN for marked and SNATed sources) go before the MARK and SNAT rules they stand for, and
a stale binding DROP (taken out even earlier when it can, see ``IptablesBackend._execute``)
before its SNAT."""
FAMILIES = (Family.IPV4, Family.IPV6)


# --------------------------------------------------------------------------
# Rendering (pure)
# --------------------------------------------------------------------------


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
    return LiveRules(state).desired()


class _ServicePart(NamedTuple):
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


_ServiceParts = tuple[_ServicePart | None, _ServicePart | None]
"""Per family (:data:`FAMILIES` order); None without sources in the family."""
_MarkChange = tuple[tuple[ServiceKey, ...], str | None]
_SHARED_SETS = {
    (family, action): name_of(family)
    for family in FAMILIES
    for action, name_of in ((Action.SNAT, snatted_set_name), (Action.REJECT, rejected_set_name))
}
"""The set each SNAT and REJECT Service's sources are members of, per family."""
"""An address of the mark set after a step: its MARK claimants (sorted) and its member."""


class LiveStep(msgspec.Struct, frozen=True):
    """One incremental step of a :class:`LiveRules`, computed but not yet committed."""

    state: NodeDesiredState
    services: tuple[tuple[ServiceKey, ServiceEgress | None, _ServiceParts | None], ...]
    """The changed Services and their new parts (None: the Service is gone)."""
    plan: SetPlan
    tables: dict[Family, dict[str, TableSpec]] | None
    """The new tables, or None when no rule changes."""
    marks: dict[Family, dict[str, _MarkChange]]
    """Per family, the mark set's touched addresses."""
    shared: dict[str, dict[str, int]]
    """Per shared set (:func:`snatted_set_name`, :func:`rejected_set_name`), the touched
    addresses and how many Services claim each after the step."""
    transit_sets: dict[Family, SetSpec | None] | None
    """The new transit guard sets, or None when the guard is unchanged."""
    unbinds: bool
    """Whether a stale binding rule goes (see ``IptablesBackend._execute``, step 1)."""
    snat_keys: list[ServiceKey] | None = None
    """The new :attr:`LiveRules.snat_keys`, or None when no rule changes."""


class LiveRules:
    """The iptables backend's rendering of the applied state, indexed by Service so that a
    change costs what it changes.

    Holds each Service's rendered parts, the mark set's owner of every address (the
    *later* MARK Service in order: with one MARK rule per Service, the later rule
    would set the mark), how many Services claim each member of the shared SNAT and
    REJECT sets, and the tables. :meth:`step` computes the set plan and, only when
    some rule changes, the new tables, from the Services that differ between two
    snapshots (a state whose Services are not sorted by key takes the full path);
    :meth:`commit` takes a step as applied; :meth:`desired` writes the complete
    :class:`DesiredFirewall` (for re-syncs and the full path).
    """

    def __init__(self, state: NodeDesiredState, previous: LiveRules | None = None) -> None:
        """Render ``state`` in full, reusing ``previous``'s parts of unchanged Services
        (canonicalising 20000 source IPs at N=1000 costs ~0.15 s). Raises
        :class:`BackendError` naming a bad entry."""
        if not 0 < state.fwmask <= 0xFFFFFFFF:
            raise BackendError(f"firewall mask {state.fwmask:#x} is not a non-zero 32-bit mask")
        self.state = state
        self.fwmask = state.fwmask
        reuse = previous if previous is not None and previous.fwmask == state.fwmask else None
        self.services: dict[ServiceKey, ServiceEgress] = {}
        self.parts: dict[ServiceKey, _ServiceParts] = {}
        self.ordered = True
        self.mark_owner: dict[Family, dict[str, ServiceKey]] = {f: {} for f in FAMILIES}
        """Per family, address -> the MARK Service whose mark it gets."""
        self.mark_contenders: dict[Family, dict[str, tuple[ServiceKey, ...]]] = {
            f: {} for f in FAMILIES
        }
        """Addresses of several MARK Services: all of them, sorted (rare)."""
        self.marked: dict[Family, dict[str, str]] = {f: {} for f in FAMILIES}
        """Per family, address -> its member of the mark set."""
        self.shared: dict[str, dict[str, int]] = {name: {} for name in _SHARED_SETS.values()}
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
                parts = _render_service(service, state.fwmask)
            self.services[key] = service
            self.parts[key] = parts
            if _has_rules(parts):
                self.snat_keys.append(key)
            for family, part in zip(FAMILIES, parts, strict=True):
                if part is None:
                    continue
                shared_name = _SHARED_SETS.get((family, part.action))
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
        self.transit_sets = _transit_sets(state)
        self.tables = self._tables(
            [self.parts[key] for key in self.snat_keys],
            {f: bool(self.marked[f]) for f in FAMILIES},
            {name for name, claims in self.shared.items() if claims},
            self.transit_sets,
        )

    def desired(self) -> DesiredFirewall:
        """Every set and table of the applied state."""
        sets: dict[str, SetSpec] = {}
        for family in FAMILIES:
            if self.excluded[family]:
                name = exclude_set_name(family)
                sets[name] = SetSpec(name, HASH_NET, family, self.excluded[family])
        for parts in self.parts.values():
            for part in parts:
                if part is not None and part.source_set is not None:
                    sets[part.source_set.name] = part.source_set
        for (family, _), name in _SHARED_SETS.items():
            if self.shared[name]:
                sets[name] = SetSpec(name, HASH_IP, family, frozenset(self.shared[name]))
        for family in FAMILIES:
            if self.marked[family]:
                name = mark_set_name(family)
                members = frozenset(self.marked[family].values())
                sets[name] = SetSpec(name, HASH_IP_MARK, family, members)
            transit = self.transit_sets[family]
            if transit is not None:
                sets[transit.name] = transit
        return DesiredFirewall(sets=sets, tables=self.tables)

    def step(self, new: NodeDesiredState) -> LiveStep | None:
        """The step to ``new``, or None when it needs the full path (another mask or
        exclusion, Services out of order). Raises :class:`BackendError` for a bad
        entry, before anything changes."""
        old = self.state
        changes = step_services(old, new, self.services, self.ordered)
        if changes is None:
            return None
        before_sets: dict[str, SetSpec] = {}
        after_sets: dict[str, SetSpec] = {}
        rules_changed = unbinds = False
        new_parts: dict[ServiceKey, _ServiceParts | None] = {}
        # Per family, the mark set's addresses the changed Services claim before or
        # after, and which of them claim it after.
        claimed: dict[Family, dict[str, list[ServiceKey]]] = {f: {} for f in FAMILIES}
        # Per shared set, the change of each touched address's count of claims.
        shared_delta: dict[str, dict[str, int]] = {}
        for key, _, service in changes:
            was = self.parts.get(key, (None, None))
            parts = _render_service(service, self.fwmask) if service is not None else None
            new_parts[key] = parts
            for index, family in enumerate(FAMILIES):
                old_part, new_part = was[index], parts[index] if parts is not None else None
                if old_part is not None and old_part.source_set is not None:
                    before_sets[old_part.source_set.name] = old_part.source_set
                if new_part is not None and new_part.source_set is not None:
                    after_sets[new_part.source_set.name] = new_part.source_set
                if _rules_of(old_part) != _rules_of(new_part):
                    rules_changed = True
                    if old_part is not None and old_part.action is Action.SNAT:
                        unbinds |= new_part is None or old_part.rules[1] not in new_part.rules
                for part, sign in ((old_part, -1), (new_part, 1)):
                    if part is None:
                        continue
                    shared_name = _SHARED_SETS.get((family, part.action))
                    if shared_name is not None:
                        delta = shared_delta.setdefault(shared_name, {})
                        for address in part.sources:
                            delta[address] = delta.get(address, 0) + sign
                family_claimed = claimed[family]
                if old_part is not None:
                    for address, _ in old_part.marks:
                        family_claimed.setdefault(address, [])
                if new_part is not None:
                    for address, _ in new_part.marks:
                        family_claimed.setdefault(address, []).append(key)
        members: dict[tuple[ServiceKey, int], dict[str, str]] = {}

        def member(key: ServiceKey, index: int, address: str) -> str:
            found = members.get((key, index))
            if found is None:
                parts = new_parts[key] if key in new_parts else self.parts[key]
                assert parts is not None
                part = parts[index]
                assert part is not None
                found = members[key, index] = dict(part.marks)
            return found[address]

        marks: dict[Family, dict[str, _MarkChange]] = {}
        has_marks: dict[Family, bool] = {}
        for index, family in enumerate(FAMILIES):
            owner, contenders = self.mark_owner[family], self.mark_contenders[family]
            marked = self.marked[family]
            family_marks: dict[str, _MarkChange] = {}
            lost: set[str] = set()
            gained: set[str] = set()
            count = len(marked)
            for address, claimers in claimed[family].items():
                first = owner.get(address)
                keys = contenders.get(address) or ((first,) if first is not None else ())
                claimants = tuple(sorted([*(k for k in keys if k not in new_parts), *claimers]))
                before = marked.get(address)
                after = member(claimants[-1], index, address) if claimants else None
                family_marks[address] = (claimants, after)
                if before != after:
                    if before is not None:
                        lost.add(before)
                        count -= 1
                    if after is not None:
                        gained.add(after)
                        count += 1
            marks[family] = family_marks
            had, has_marks[family] = bool(marked), count > 0
            if had != has_marks[family]:
                rules_changed = True  # the MARK rule and its stray DROP come or go
            name = mark_set_name(family)
            # Partial sets: plan_sets diffs only the members of touched addresses.
            if had:
                before_sets[name] = SetSpec(name, HASH_IP_MARK, family, frozenset(lost))
            if has_marks[family]:
                after_sets[name] = SetSpec(name, HASH_IP_MARK, family, frozenset(gained))
        shared: dict[str, dict[str, int]] = {}
        present = {name for name, claims in self.shared.items() if claims}
        for (family, _), name in _SHARED_SETS.items():
            claim_changes = shared_delta.get(name)
            if not claim_changes:
                continue
            claims = self.shared[name]
            counts: dict[str, int] = {}
            lost, gained = set(), set()
            for address, change in claim_changes.items():
                if change == 0:
                    continue
                before_count = claims.get(address, 0)
                counts[address] = after_count = before_count + change
                if before_count == 0:
                    gained.add(address)
                elif after_count == 0:
                    lost.add(address)
            shared[name] = counts
            had = bool(claims)
            if len(claims) + len(gained) - len(lost) > 0:
                present.add(name)
                after_sets[name] = SetSpec(name, HASH_IP, family, frozenset(gained))
            else:
                present.discard(name)
            if had:
                before_sets[name] = SetSpec(name, HASH_IP, family, frozenset(lost))
            if had != (name in present):
                rules_changed = True  # the rules that match the set come or go
        transit_sets = None
        if (new.transit_guard_ipv4, new.transit_guard_ipv6) != (
            old.transit_guard_ipv4,
            old.transit_guard_ipv6,
        ):
            transit_sets = _transit_sets(new)
            for family in FAMILIES:
                was_set, now_set = self.transit_sets[family], transit_sets[family]
                if (was_set is None) != (now_set is None):
                    rules_changed = True  # the guard comes or goes
                if was_set is not None:
                    before_sets[was_set.name] = was_set
                if now_set is not None:
                    after_sets[now_set.name] = now_set
        tables = snat_keys = None
        if rules_changed:
            # Only the Services with rules of their own (N/16 in the benchmark) are
            # walked, not all N: the SNAT Services' keys are kept sorted, as the
            # state's Services are on this path (step_services checked).
            snat_keys = self.snat_keys
            for key, _, _ in changes:
                had, has = _has_rules(self.parts.get(key)), _has_rules(new_parts[key])
                if had == has:
                    continue
                if snat_keys is self.snat_keys:
                    snat_keys = list(snat_keys)
                if has:
                    bisect.insort(snat_keys, key)
                else:
                    del snat_keys[bisect.bisect_left(snat_keys, key)]
            in_order: list[_ServiceParts] = []
            for key in snat_keys:
                parts = new_parts[key] if key in new_parts else self.parts[key]
                assert parts is not None
                in_order.append(parts)
            tables = self._tables(
                in_order,
                has_marks,
                present,
                transit_sets if transit_sets is not None else self.transit_sets,
            )
        return LiveStep(
            state=new,
            services=tuple((key, service, new_parts[key]) for key, _, service in changes),
            plan=plan_sets(before_sets, after_sets),
            tables=tables,
            marks=marks,
            shared=shared,
            transit_sets=transit_sets,
            unbinds=unbinds,
            snat_keys=snat_keys,
        )

    def commit(self, step: LiveStep) -> None:
        """Take ``step`` as applied (the kernel holds it)."""
        for key, service, parts in step.services:
            if service is None or parts is None:
                self.services.pop(key, None)
                self.parts.pop(key, None)
            else:
                self.services[key] = service
                self.parts[key] = parts
        for family, changes in step.marks.items():
            owner, contenders = self.mark_owner[family], self.mark_contenders[family]
            marked = self.marked[family]
            for address, (claimants, member) in changes.items():
                if claimants:
                    owner[address] = claimants[-1]
                else:
                    owner.pop(address, None)
                if len(claimants) > 1:
                    contenders[address] = claimants
                else:
                    contenders.pop(address, None)
                if member is None:
                    marked.pop(address, None)
                else:
                    marked[address] = member
        for name, counts in step.shared.items():
            claims = self.shared[name]
            for address, count in counts.items():
                if count:
                    claims[address] = count
                else:
                    claims.pop(address, None)
        if step.transit_sets is not None:
            self.transit_sets = step.transit_sets
        if step.tables is not None:
            self.tables = step.tables
        if step.snat_keys is not None:
            self.snat_keys = step.snat_keys
        self.state = step.state

    def _tables(
        self,
        in_order: list[_ServiceParts],
        has_marks: dict[Family, bool],
        shared: set[str],
        transit_sets: dict[Family, SetSpec | None],
    ) -> dict[Family, dict[str, TableSpec]]:
        """The tables of both families from the SNAT Services' rules (``in_order``: their
        parts, in Service order), and the rules over the sets that are not empty
        (``has_marks``, ``shared``)."""
        fwmask = self.fwmask
        tables: dict[Family, dict[str, TableSpec]] = {}
        for index, family in enumerate(FAMILIES):
            excluded = bool(self.excluded[family])
            head = (exclude_rule(family),) if excluded else ()
            snatted, rejected = snatted_set_name(family), rejected_set_name(family)
            snat_rules: list[Rule] = list(head)
            stale_bindings: list[Rule] = []
            for parts in in_order:
                part = parts[index]
                if part is not None and part.rules:  # SNAT
                    snat_rules.append(part.rules[0])
                    stale_bindings.append(part.rules[1])
            strays: list[Rule] = []
            reject_rules: list[Rule] = list(head)
            guard_returns: list[Rule] = []
            if rejected in shared:
                strays.append(stray_reply_rule(rejected, family, excluded))
                reject_rules.append(reject_rule(rejected, family))
            reject_rules += stale_bindings
            if snatted in shared:
                strays.append(stray_reply_rule(snatted, family, excluded))
                reject_rules.append(reply_leak_rule(snatted))
                guard_returns.append(source_return_rule(snatted))
            mark_rules: list[Rule] = list(head)
            if has_marks[family]:
                mark_rules.append(mark_map_rule(family))
                strays.append(stray_reply_rule(mark_set_name(family), family, excluded))
            if transit_sets[family] is not None:
                reject_rules += (
                    mark_skip_rule(fwmask),
                    *guard_returns,
                    transit_reject_rule(family),
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
                    chains={REJECT_CHAIN: (*strays, *reject_rules)},
                    heads={"FORWARD": (jump_rule(REJECT_CHAIN),)},
                ),
            }
        return tables


def _has_rules(parts: _ServiceParts | None) -> bool:
    """Whether a Service has rules of its own in some family (it is SNATed there)."""
    return parts is not None and any(part is not None and part.rules for part in parts)


def _rules_of(part: _ServicePart | None) -> tuple[Rule, ...]:
    """What of a Service's part the tables depend on: its SNAT and stale binding rules
    (the other Services' rules match shared sets: their members change, not the rules)."""
    return () if part is None else part.rules


def _exclude_cidrs(state: NodeDesiredState, family: Family) -> tuple[str, ...]:
    return state.exclude_dst_ipv4 if family is Family.IPV4 else state.exclude_dst_ipv6


def _transit_sets(state: NodeDesiredState) -> dict[Family, SetSpec | None]:
    """The transit guard's set of each family (None: no guard in the family)."""
    result: dict[Family, SetSpec | None] = {}
    for family in FAMILIES:
        cidrs = state.transit_guard_ipv4 if family is Family.IPV4 else state.transit_guard_ipv6
        name = transit_set_name(family)
        guarded = net_members(name, cidrs, family)
        result[family] = SetSpec(name, HASH_NET, family, guarded) if guarded else None
    return result


def _render_service(service: ServiceEgress, fwmask: int) -> _ServiceParts:
    """One Service's parts in both families."""
    return (
        _render_family(service, Family.IPV4, fwmask),
        _render_family(service, Family.IPV6, fwmask),
    )


def _render_family(service: ServiceEgress, family: Family, fwmask: int) -> _ServicePart | None:
    result: _ServicePart | None = None
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
        if entry.action is Action.SNAT:
            snat_ip = _snat_address(context, family, entry.snat_ip)
            set_name = source_set_name(family, service.namespace, service.name)
            rules = (snat_rule(set_name, snat_ip), stale_binding_rule(set_name, snat_ip, fwmask))
            source_set = SetSpec(set_name, HASH_IP, family, sources)
            result = _ServicePart(Action.SNAT, source_set, rules, sources, ())
        elif entry.action is Action.MARK:
            fwmark = _fwmark(context, entry.fwmark, fwmask)
            marks = tuple(
                (address, skbmark_member(address, fwmark, fwmask)) for address in sorted(sources)
            )
            result = _ServicePart(Action.MARK, None, (), sources, marks)
        else:  # Action.REJECT, and anything unknown: fail closed
            result = _ServicePart(Action.REJECT, None, (), sources, ())
    return result


def changed_tables(
    before: dict[Family, dict[str, TableSpec]] | None, after: dict[Family, dict[str, TableSpec]]
) -> dict[Family, tuple[TableSpec, ...]]:
    """Per family, the table specs of ``after`` that differ from ``before`` (all if unknown)."""
    return {
        family: tuple(
            spec
            for name, spec in after[family].items()
            if before is None or before[family].get(name) != spec
        )
        for family in FAMILIES
    }


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


# --------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------


class IptablesBackend:
    """Renders a :class:`~metaleg.model.NodeDesiredState` into legacy iptables rules and ipsets
    in the network namespace of the current process (see the module docstring for the layout).

    Not thread-safe: one caller at a time. ``last_changes`` lists, after each
    call, what was changed (empty when nothing was), for logs and tests.
    """

    name = "iptables"

    def __init__(self, *, timeout: float = 120.0) -> None:
        self._ipsets = IpsetClient()
        self._helpers = {family: XtablesHelper(family, timeout) for family in FAMILIES}
        self._live: LiveRules | None = None
        """What the kernel holds after the last successful call; None when unknown."""
        self._set_generation = 0
        """Sent with every helper request; changes whenever sets may have been destroyed
        (or recreated) since the previous request, see ``SyncRequest.set_generation``."""
        self._sets_uncertain = True
        self.last_changes: tuple[str, ...] = ()
        self._drift: IptablesDriftCheck | None = None

    def helper_pids(self) -> dict[Family, int | None]:
        """The process ids of the running helper processes (for health checks and tests)."""
        return {family: helper.pid for family, helper in self._helpers.items()}

    def drift_detector(self) -> IptablesDriftCheck:
        """A periodic check of metaleg's jumps, chains and ipsets against what it last wrote."""
        if self._drift is None:
            self._drift = IptablesDriftCheck()
        return self._drift

    def _after_write(self, changed: bool) -> None:
        """Have the drift check take what the kernel holds as its new baseline (we just wrote it)."""
        if self._drift is not None and changed:
            self._drift.after_own_write()

    def apply(self, state: NodeDesiredState) -> None:
        """Change what differs from the last applied state; an unchanged state touches nothing.

        Without a known last state (first call, or after a failure) this is a
        :meth:`resync`, since only the kernel can tell what is there. A change
        costs what it changes (:class:`LiveRules`), except when the mask or
        the exclusions change: then both states are rendered in full and compared.
        """
        failed = True
        try:
            self._apply(state)
            failed = False
        finally:
            self._after_write(failed or bool(self.last_changes) or self._live is None)

    def _apply(self, state: NodeDesiredState) -> None:
        live = self._live
        if live is None:
            self._resync(state)
            return
        step = live.step(state)
        if step is None:
            fresh = LiveRules(state, live)
            before, after = live.desired(), fresh.desired()
            plan = plan_sets(before.sets, after.sets)
            tables = changed_tables(before.tables, after.tables)
            if plan.empty and not any(tables.values()):
                self._live, self.last_changes = fresh, ()
                return
            self._execute(plan, tables, collect_garbage=False, before=live.tables)
            self._live = fresh
            return
        tables = (
            changed_tables(live.tables, step.tables)
            if step.tables is not None
            else {family: () for family in FAMILIES}
        )
        if step.plan.empty and not any(tables.values()):
            live.commit(step)
            self.last_changes = ()
            return
        # Without a stale binding rule going, step 1 has nothing to do: skip looking.
        unbind_from = live.tables if step.unbinds else None
        self._execute(step.plan, tables, collect_garbage=False, before=unbind_from)
        live.commit(step)
        self._live = live

    def resync(self, state: NodeDesiredState) -> None:
        """Compare with the kernel, repair every difference and delete stale metaleg objects."""
        try:
            self._resync(state)
        finally:
            self._after_write(True)

    def _resync(self, state: NodeDesiredState) -> None:
        self._start_helpers()
        live = LiveRules(state, self._live)
        current = self._ipsets.list_sets()
        desired = live.desired()
        plan = plan_sets(current, desired.sets)
        del current
        self._execute(plan, changed_tables(None, desired.tables), collect_garbage=True)
        self._live = live

    def cleanup(self) -> None:
        """Remove every metaleg jump, rule, chain and set of both families. Idempotent."""
        self._live = None
        self._sets_uncertain = True
        errors: list[str] = []
        changes: list[str] = []
        for family in FAMILIES:
            try:
                reply = self._helpers[family].request(SyncRequest(tables=(), collect_garbage=True))
                changes += self._describe(family, reply)
            except BackendError as error:
                errors.append(str(error))
        try:
            names = tuple(sorted(self._ipsets.list_sets()))
            failed = self._ipsets.unmake(SetPlan(destroy=names))
            errors += failed
            changes += [
                f"ipset {name}: destroy"
                for name in names
                if not any(f"ipset {name}:" in error for error in failed)
            ]
        except BackendError as error:
            errors.append(str(error))
        self.last_changes = tuple(changes)
        if errors:
            raise BackendError("cleanup incomplete: " + "; ".join(errors))

    def close(self) -> None:
        """Stop the helper processes and close the netlink socket."""
        if self._drift is not None:
            self._drift.close()
        for helper in self._helpers.values():
            helper.stop()
        self._ipsets.close()

    # -- internals ----------------------------------------------------------

    def _start_helpers(self) -> None:
        """Start helpers that do not run, so that their start-up (~0.3 s: Python and
        python-iptables) overlaps rendering and the ipset batch."""
        for helper in self._helpers.values():
            # On failure the first request tries again and reports the error.
            with contextlib.suppress(BackendError):
                helper.start()

    def _execute(
        self,
        plan: SetPlan,
        tables: dict[Family, tuple[TableSpec, ...]],
        *,
        collect_garbage: bool,
        before: dict[Family, dict[str, TableSpec]] | None = None,
    ) -> None:
        """Carry out one change, make-before-break, so that traffic stays covered.

        A source that is protected before and after the change (rejected, marked
        or SNATed) must never be neither in between, e.g. when a Service goes
        from REJECT to MARK (filter loses a rule, mangle gains one) or a pod IP
        moves from one Service's set to another's. Commits of different tables
        are not atomic together, so:

        1. with ``before`` (what the kernel holds: an apply, not a resync), commit
           the tables that lose stale binding rules (:func:`stale_binding_rule`)
           without them, and otherwise as they are, before anything is added.
           Such a DROP allows one LB IP only: kept while nat gains the SNAT to a
           new LB IP, it would drop the flows SNATed to that; kept next to its
           successor (the LB IP changes) the two would drop every flow of the
           source. Taking it out early costs nothing: it only matters between a
           commit and the conntrack flush after it, and that flush has run since
           the commit that brought it. The new DROP comes with filter in step 3,
           after the new SNAT exists (:data:`TABLES`), and a departing SNAT goes
           after its DROP (:data:`BREAK_ORDER`), so the rule never drops a flow
           bound to the SNAT that is in place;
        2. create sets and add members (new rules need them; extra members only
           widen the coverage of existing rules), in one netlink batch. A source
           whose mark changes is added to the mark set with its new mark: the
           kernel replaces the mark in place;
        3. commit each changed table with the new rules added and the old ones
           kept (MERGE), so every table covers old and new; the members that
           the SNATed set (:func:`snatted_set_name`) gains are added after
           mangle and nat and before filter: the set is the transit guard's
           exception for sources that nat SNATs, so a source joins it only once
           its SNAT rule exists;
        4. commit the final rules where step 3 kept something (EXACT; skipped
           for tables that only gained rules), filter first (:data:`BREAK_ORDER`):
           the transit guard lets a source pass because nat SNATs it or mangle
           marks it, so its exception must go before the SNAT or MARK rule; for
           the same reason the SNATed set loses members after filter and before
           mangle and nat;
        5. remove members and destroy sets no rule uses any more.

        A resync does not know the kernel's old rules, so it skips step 1: should
        it find a stale binding rule for another LB IP of the same source, both
        DROPs stand between its two commits of filter (fail closed, milliseconds).

        Any failure stops here with the kernel covering at least the old state,
        and makes the next apply a full resync.
        """
        self._live = None
        self.last_changes = ()
        if collect_garbage or self._sets_uncertain:
            self._set_generation += 1
        self._sets_uncertain = True  # until this change is complete
        generation = self._set_generation
        changes: list[str] = []
        early_requests = {}
        for family in FAMILIES:
            early = () if before is None else unbind_first(before[family], tables[family])
            if early:
                early_requests[family] = SyncRequest(
                    tables=early, mode=Mode.EXACT, set_generation=generation
                )
        for family, reply in self._request_all(early_requests).items():
            changes += self._describe(family, reply)
        plan, exceptions = split_exceptions(plan)
        changes += plan.describe_make()
        self._ipsets.make(plan)
        if plan.recreate:
            self._set_generation += 1
            generation = self._set_generation
        # MERGE: mangle and nat, the exceptions' new members, filter (one request per
        # family when no exception is added).
        merge_phases = [tables]
        if exceptions.add:
            filter_specs, other_specs = _split_filter(tables)
            merge_phases = [other_specs, filter_specs]
        pending: dict[Family, tuple[TableSpec, ...]] = {family: () for family in FAMILIES}
        for phase, phase_tables in enumerate(merge_phases):
            if phase == 1:
                changes += SetPlan(add=exceptions.add).describe_make()
                self._ipsets.make(SetPlan(add=exceptions.add))
            merges = {
                family: SyncRequest(tables=specs, mode=Mode.MERGE, set_generation=generation)
                for family, specs in phase_tables.items()
                if specs
            }
            for family, reply in self._request_all(merges).items():
                changes += self._describe(family, reply)
                pending[family] += tuple(
                    spec
                    for spec, result in zip(phase_tables[family], reply.results, strict=True)
                    if not result.exact
                )
        # Garbage collection looks at every table (stale chains, other tables), so it
        # gets all specs even where step 3 already reached them.
        final = {
            family: _break_order(tables[family] if collect_garbage else pending[family])
            for family in FAMILIES
        }
        # EXACT: filter, the exceptions' members that go, mangle and nat.
        exact_phases = [final]
        if exceptions.remove:
            filter_specs, other_specs = _split_filter(final)
            # Garbage collection cleans the tables its request does not name: all of them.
            exact_phases = [filter_specs, final if collect_garbage else other_specs]
        for phase, phase_tables in enumerate(exact_phases):
            if phase == 1:
                self._ipsets.unmake(SetPlan(remove=exceptions.remove))
                changes += SetPlan(remove=exceptions.remove).describe_break()
            last = phase == len(exact_phases) - 1
            exacts = {
                family: SyncRequest(
                    tables=specs,
                    mode=Mode.EXACT,
                    collect_garbage=collect_garbage and last,
                    set_generation=generation,
                )
                for family, specs in phase_tables.items()
                if specs or (collect_garbage and last)
            }
            for family, reply in self._request_all(exacts).items():
                changes += self._describe(family, reply)
        errors = self._ipsets.unmake(plan)
        self._sets_uncertain = bool(plan.destroy)
        changes += plan.describe_break()
        self.last_changes = tuple(changes)
        if errors:
            raise BackendError("; ".join(errors))

    def _request_all(self, requests: dict[Family, SyncRequest]) -> dict[Family, SyncReply]:
        """Send each family's request to its helper at once, then collect the answers.

        The helpers work in parallel (the families are independent); the first
        error is raised after every helper has answered.
        """
        sent: list[Family] = []
        replies: dict[Family, SyncReply] = {}
        first: BackendError | None = None
        for family, request in requests.items():
            try:
                self._helpers[family].send(request)
                sent.append(family)
            except BackendError as error:
                first = first or error
        for family in sent:
            try:
                replies[family] = self._helpers[family].receive()
            except BackendError as error:
                first = first or error
        if first is not None:
            raise first
        return replies

    def _describe(self, family: Family, reply: SyncReply) -> list[str]:
        return [
            f"{TOOL[family]} table {result.name}: commit"
            for result in reply.results
            if result.committed
        ]


def unbind_first(
    old: dict[str, TableSpec], changed: tuple[TableSpec, ...]
) -> tuple[TableSpec, ...]:
    """The tables of ``old`` that lose stale binding rules in ``changed``, without those
    rules and otherwise unchanged (step 1 of :meth:`IptablesBackend._execute`)."""
    result: list[TableSpec] = []
    for new in changed:
        spec = old.get(new.name)
        if spec is None:
            continue
        kept = {rule for rules in new.chains.values() for rule in rules}
        chains = {
            name: tuple(rule for rule in rules if not is_stale_binding(rule) or rule in kept)
            for name, rules in spec.chains.items()
        }
        if chains != spec.chains:
            result.append(TableSpec(name=spec.name, chains=chains, heads=spec.heads))
    return tuple(result)


def split_exceptions(plan: SetPlan) -> tuple[SetPlan, SetPlan]:
    """``plan`` without the member changes of the SNATed sets, and those changes: they
    have their own place in a change (``IptablesBackend._execute``, steps 3 and 4)."""
    exceptions = {snatted_set_name(family) for family in FAMILIES}
    add = tuple(entry for entry in plan.add if entry[0].name in exceptions)
    remove = tuple(entry for entry in plan.remove if entry[0].name in exceptions)
    if not add and not remove:
        return plan, SetPlan()
    rest = msgspec.structs.replace(
        plan,
        add=tuple(entry for entry in plan.add if entry[0].name not in exceptions),
        remove=tuple(entry for entry in plan.remove if entry[0].name not in exceptions),
    )
    return rest, SetPlan(add=add, remove=remove)


def _split_filter(
    tables: dict[Family, tuple[TableSpec, ...]],
) -> tuple[dict[Family, tuple[TableSpec, ...]], dict[Family, tuple[TableSpec, ...]]]:
    """Per family, filter's spec and the other tables' specs (in their order)."""
    filter_specs = {f: tuple(s for s in specs if s.name == "filter") for f, specs in tables.items()}
    others = {f: tuple(s for s in specs if s.name != "filter") for f, specs in tables.items()}
    return filter_specs, others


def _break_order(specs: tuple[TableSpec, ...]) -> tuple[TableSpec, ...]:
    """``specs`` in :data:`BREAK_ORDER` (tables it does not name last, in their order)."""
    rank = {name: index for index, name in enumerate(BREAK_ORDER)}
    return tuple(sorted(specs, key=lambda spec: rank.get(spec.name, len(rank))))
