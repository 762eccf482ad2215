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
from typing import NamedTuple

import msgspec

from metaleg.firewall.claims import ServiceChange, ServiceKey, step_services
from metaleg.firewall.iptables.ipsets import SetPlan, SetSpec, plan_sets
from metaleg.firewall.iptables.policy import PolicyStep
from metaleg.firewall.iptables.render import (
    FAMILIES,
    SHARED_SETS,
    RenderedFamily,
    RenderedService,
    Rendering,
    has_own_rules,
    mark_set,
    policy_parts,
    render_service,
    shared_set,
    transit_guard_sets,
)
from metaleg.firewall.iptables.rules import Rule, TableSpec, mark_set_name
from metaleg.model import Action, Family, NodeDesiredState, ServiceEgress

MarkClaim = tuple[tuple[ServiceKey, ...], str | None]
"""An address of the mark set after a step: its MARK claimants (sorted) and its member
(None: no longer marked)."""


class _ServiceWalk(NamedTuple):
    """The changed Services of a step, rendered, and what they touch."""

    changes: list[ServiceChange]
    new_parts: dict[ServiceKey, RenderedService | None]
    """Each changed Service's parts after the step (None: the Service is gone)."""
    claimed: dict[Family, dict[str, list[ServiceKey]]]
    """Per family, the mark set's addresses the changed Services claim before or after,
    and which of them claim it after."""
    shared_delta: dict[str, dict[str, int]]
    """Per shared set, the change of each touched address's count of claims."""
    rules_changed: bool
    """Whether some changed Service's own rules (SNAT, stale binding DROP) change."""
    unbinds: bool
    """Whether a stale binding rule goes."""


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
    policies: PolicyStep
    """The destination policies' step (:meth:`~metaleg.firewall.iptables.policy.PolicyIndex.step`)."""
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
        changes = step_services(self.state, new, self.services, self.ordered)
        if changes is None:
            return None
        # The sets before and after the step, partial: plan_sets diffs only what they
        # hold (a shared set's or the mark set's touched members).
        before_sets: dict[str, SetSpec] = {}
        after_sets: dict[str, SetSpec] = {}
        walk = self._walk_services(changes, before_sets, after_sets)
        marks, has_marks, marks_come_or_go = self._step_marks(walk, before_sets, after_sets)
        shared, present, shared_come_or_go = self._step_shared(walk, before_sets, after_sets)
        transit_sets, guard_comes_or_goes = self._step_transit(new, before_sets, after_sets)
        policies = self.policies.step(
            (
                (key, policy_parts(self.parts.get(key)), policy_parts(walk.new_parts[key]))
                for key, _, _ in changes
            ),
            before_sets,
            after_sets,
        )
        tables = snat_keys = None
        if (
            walk.rules_changed
            or marks_come_or_go
            or shared_come_or_go
            or guard_comes_or_goes
            or policies.layout_changed
        ):
            snat_keys = self._snat_keys_after(walk)
            in_order: list[RenderedService] = []
            for key in snat_keys:
                parts = walk.new_parts[key] if key in walk.new_parts else self.parts[key]
                assert parts is not None
                in_order.append(parts)
            tables = self.build_tables(
                in_order,
                has_marks,
                present,
                transit_sets if transit_sets is not None else self.transit_sets,
                policies.layouts(self.policies),
            )
        return PendingStep(
            state=new,
            services=tuple((key, service, walk.new_parts[key]) for key, _, service in changes),
            plan=plan_sets(before_sets, after_sets),
            tables=tables,
            marks=marks,
            shared=shared,
            transit_sets=transit_sets,
            unbinds=walk.unbinds,
            policies=policies,
            snat_keys=snat_keys,
        )

    def _walk_services(
        self,
        changes: list[ServiceChange],
        before_sets: dict[str, SetSpec],
        after_sets: dict[str, SetSpec],
    ) -> _ServiceWalk:
        """Render the changed Services; their own sets go into ``before_sets`` and
        ``after_sets``."""
        rules_changed = unbinds = False
        new_parts: dict[ServiceKey, RenderedService | None] = {}
        claimed: dict[Family, dict[str, list[ServiceKey]]] = {f: {} for f in FAMILIES}
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
        return _ServiceWalk(changes, new_parts, claimed, shared_delta, rules_changed, unbinds)

    def _step_marks(
        self, walk: _ServiceWalk, before_sets: dict[str, SetSpec], after_sets: dict[str, SetSpec]
    ) -> tuple[dict[Family, dict[str, MarkClaim]], dict[Family, bool], bool]:
        """The mark set's touched addresses per family, whether each family has marked
        sources after the step, and whether that changes for some family (its MARK rule
        and stray reply DROP come or go)."""
        members: dict[tuple[ServiceKey, int], dict[str, str]] = {}

        def member(key: ServiceKey, index: int, address: str) -> str:
            found = members.get((key, index))
            if found is None:
                parts = walk.new_parts[key] if key in walk.new_parts else self.parts[key]
                assert parts is not None
                part = parts[index]
                assert part is not None
                found = members[key, index] = dict(part.marks)
            return found[address]

        marks: dict[Family, dict[str, MarkClaim]] = {}
        has_marks: dict[Family, bool] = {}
        come_or_go = False
        for index, family in enumerate(FAMILIES):
            owner, contenders = self.mark_owner[family], self.mark_contenders[family]
            marked = self.marked[family]
            family_marks: dict[str, MarkClaim] = {}
            lost: set[str] = set()
            gained: set[str] = set()
            count = len(marked)
            for address, claimers in walk.claimed[family].items():
                first = owner.get(address)
                keys = contenders.get(address) or ((first,) if first is not None else ())
                claimants = tuple(
                    sorted([*(k for k in keys if k not in walk.new_parts), *claimers])
                )
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
            come_or_go |= had != has_marks[family]
            name = mark_set_name(family)
            if had:
                before_sets[name] = mark_set(family, frozenset(lost))
            if has_marks[family]:
                after_sets[name] = mark_set(family, frozenset(gained))
        return marks, has_marks, come_or_go

    def _step_shared(
        self, walk: _ServiceWalk, before_sets: dict[str, SetSpec], after_sets: dict[str, SetSpec]
    ) -> tuple[dict[str, dict[str, int]], set[str], bool]:
        """Per shared set, the touched addresses' claim counts after the step; the shared
        sets that are not empty after it; whether one becomes empty or stops being so
        (the rules that match it come or go)."""
        shared: dict[str, dict[str, int]] = {}
        present = {name for name, claims in self.shared.items() if claims}
        come_or_go = False
        for (family, _), name in SHARED_SETS.items():
            claim_changes = walk.shared_delta.get(name)
            if not claim_changes:
                continue
            claims = self.shared[name]
            counts: dict[str, int] = {}
            lost: set[str] = set()
            gained: set[str] = set()
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
                after_sets[name] = shared_set(name, family, frozenset(gained))
            else:
                present.discard(name)
            if had:
                before_sets[name] = shared_set(name, family, frozenset(lost))
            come_or_go |= had != (name in present)
        return shared, present, come_or_go

    def _step_transit(
        self,
        new: NodeDesiredState,
        before_sets: dict[str, SetSpec],
        after_sets: dict[str, SetSpec],
    ) -> tuple[dict[Family, SetSpec | None] | None, bool]:
        """The new transit guard sets (None: the guard is unchanged), and whether the
        guard comes or goes in some family."""
        old = self.state
        if (new.transit_guard_ipv4, new.transit_guard_ipv6) == (
            old.transit_guard_ipv4,
            old.transit_guard_ipv6,
        ):
            return None, False
        transit_sets = transit_guard_sets(new)
        come_or_go = False
        for family in FAMILIES:
            was_set, now_set = self.transit_sets[family], transit_sets[family]
            come_or_go |= (was_set is None) != (now_set is None)
            if was_set is not None:
                before_sets[was_set.name] = was_set
            if now_set is not None:
                after_sets[now_set.name] = now_set
        return transit_sets, come_or_go

    def _snat_keys_after(self, walk: _ServiceWalk) -> list[ServiceKey]:
        """The Services with rules of their own after the step, sorted.

        Only those are walked to build the tables, not every Service: their keys are
        kept sorted, as the state's Services are on this path (step_services checked).
        The list is copied only if it changes."""
        snat_keys = self.snat_keys
        for key, _, _ in walk.changes:
            had, has = has_own_rules(self.parts.get(key)), has_own_rules(walk.new_parts[key])
            if had == has:
                continue
            if snat_keys is self.snat_keys:
                snat_keys = list(snat_keys)
            if has:
                bisect.insort(snat_keys, key)
            else:
                del snat_keys[bisect.bisect_left(snat_keys, key)]
        return snat_keys

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
        self.policies.commit(step.policies)
        self.state = step.state


def _own_rules(part: RenderedFamily | None) -> tuple[Rule, ...]:
    """What of a Service's part the tables depend on: its SNAT and stale binding rules
    (the other Services' rules match shared sets: their members change, not the rules)."""
    return () if part is None else part.rules
