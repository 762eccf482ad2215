"""The ``iptables`` backend's incremental path: a change costs what it changes.

:class:`AppliedRendering` is the :class:`~metaleg.firewall.iptables.render.Rendering`
of the state the kernel holds. :meth:`AppliedRendering.step` computes, from the
Services that differ between two snapshots, the set plan and, only when some rule
changes, the new tables (a pod IP or a gateway moving between other nodes changes
set members only); :meth:`AppliedRendering.commit` takes the step as applied.
``tests/test_iptables_incremental.py`` checks every step against the full render.
"""

from __future__ import annotations

import bisect

import msgspec

from metaleg.firewall.claims import ServiceKey, step_services
from metaleg.firewall.iptables.ipsets import HASH_IP, HASH_IP_MARK, SetPlan, SetSpec, plan_sets
from metaleg.firewall.iptables.render import (
    FAMILIES,
    SHARED_SETS,
    RenderedFamily,
    RenderedService,
    Rendering,
    has_own_rules,
    render_service,
    transit_guard_sets,
)
from metaleg.firewall.iptables.rules import Rule, TableSpec, mark_set_name
from metaleg.model import Action, Family, NodeDesiredState, ServiceEgress

MarkClaim = tuple[tuple[ServiceKey, ...], str | None]
"""An address of the mark set after a step: its MARK claimants (sorted) and its member
(None: no longer marked)."""


class PendingStep(msgspec.Struct, frozen=True):
    """One step of an :class:`AppliedRendering`, computed but not yet committed."""

    state: NodeDesiredState
    services: tuple[tuple[ServiceKey, ServiceEgress | None, RenderedService | None], ...]
    """The changed Services and their new parts (None: the Service is gone)."""
    plan: SetPlan
    tables: dict[Family, dict[str, TableSpec]] | None
    """The new tables, or None when no rule changes."""
    marks: dict[Family, dict[str, MarkClaim]]
    """Per family, the mark set's touched addresses."""
    shared: dict[str, dict[str, int]]
    """Per shared set (:data:`~metaleg.firewall.iptables.render.SHARED_SETS`), the touched
    addresses and how many Services claim each after the step."""
    transit_sets: dict[Family, SetSpec | None] | None
    """The new transit guard sets, or None when the guard is unchanged."""
    unbinds: bool
    """Whether a stale binding rule goes (see ``IptablesBackend._execute``, step 1)."""
    snat_keys: list[ServiceKey] | None = None
    """The new :attr:`AppliedRendering.snat_keys`, or None when no rule changes."""


class AppliedRendering(Rendering):
    """The rendering of the state the kernel holds, moved forward one step per change.

    A state whose Services are not sorted by key takes the full path (:meth:`step`
    returns None): the backend renders it anew and compares the whole.
    """

    def step(self, new: NodeDesiredState) -> PendingStep | None:
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
        new_parts: dict[ServiceKey, RenderedService | None] = {}
        # Per family, the mark set's addresses the changed Services claim before or
        # after, and which of them claim it after.
        claimed: dict[Family, dict[str, list[ServiceKey]]] = {f: {} for f in FAMILIES}
        # Per shared set, the change of each touched address's count of claims.
        shared_delta: dict[str, dict[str, int]] = {}
        for key, _, service in changes:
            was = self.parts.get(key, (None, None))
            parts = render_service(service, self.fwmask) if service is not None else None
            new_parts[key] = parts
            for index, family in enumerate(FAMILIES):
                old_part, new_part = was[index], parts[index] if parts is not None else None
                if old_part is not None and old_part.source_set is not None:
                    before_sets[old_part.source_set.name] = old_part.source_set
                if new_part is not None and new_part.source_set is not None:
                    after_sets[new_part.source_set.name] = new_part.source_set
                if _own_rules(old_part) != _own_rules(new_part):
                    rules_changed = True
                    if old_part is not None and old_part.action is Action.SNAT:
                        unbinds |= new_part is None or old_part.rules[1] not in new_part.rules
                for part, sign in ((old_part, -1), (new_part, 1)):
                    if part is None:
                        continue
                    shared_name = SHARED_SETS.get((family, part.action))
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

        marks: dict[Family, dict[str, MarkClaim]] = {}
        has_marks: dict[Family, bool] = {}
        for index, family in enumerate(FAMILIES):
            owner, contenders = self.mark_owner[family], self.mark_contenders[family]
            marked = self.marked[family]
            family_marks: dict[str, MarkClaim] = {}
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
        for (family, _), name in SHARED_SETS.items():
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
            transit_sets = transit_guard_sets(new)
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
                had, has = has_own_rules(self.parts.get(key)), has_own_rules(new_parts[key])
                if had == has:
                    continue
                if snat_keys is self.snat_keys:
                    snat_keys = list(snat_keys)
                if has:
                    bisect.insort(snat_keys, key)
                else:
                    del snat_keys[bisect.bisect_left(snat_keys, key)]
            in_order: list[RenderedService] = []
            for key in snat_keys:
                parts = new_parts[key] if key in new_parts else self.parts[key]
                assert parts is not None
                in_order.append(parts)
            tables = self.build_tables(
                in_order,
                has_marks,
                present,
                transit_sets if transit_sets is not None else self.transit_sets,
            )
        return PendingStep(
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

    def commit(self, step: PendingStep) -> None:
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


def _own_rules(part: RenderedFamily | None) -> tuple[Rule, ...]:
    """What of a Service's part the tables depend on: its SNAT and stale binding rules
    (the other Services' rules match shared sets: their members change, not the rules)."""
    return () if part is None else part.rules
