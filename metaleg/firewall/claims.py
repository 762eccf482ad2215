"""Which Service owns each source IP of the applied state, kept up to date change by change.

A source claimed by several Services gets one treatment: the first Service's by
``(namespace, name)``, within a Service its first entry's (the rule of
:func:`metaleg.firewall.conntrack.source_treatments`; the watcher gives each source
to one Service only, so this is rare). Both firewall backends need, for each
change, the sources whose treatment changes and how (the nftables backend
patches its sets and maps from them; both delete exactly those sources'
outdated conntrack entries). :class:`SourceClaims` answers that from the
Services that differ between two snapshots, so a change costs what it changes,
not what the state holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from metaleg.firewall import conntrack
from metaleg.firewall.conntrack import EgressView, FlushPlan, IPNetwork, Treatment
from metaleg.model import Family, NodeDesiredState, ServiceEgress

ServiceKey = tuple[str, str]
"""``(namespace, name)``: the order of ``NodeDesiredState.services``."""

ServiceChange = tuple[ServiceKey, ServiceEgress | None, ServiceEgress | None]
"""(key, before, after) of a Service that differs between two states (None: absent)."""

OwnedClaims = tuple[Family, dict[str, Treatment]]
"""The sources of one Service entry's family that the Service owns, with their treatments."""


def service_claims(
    service: ServiceEgress, fwmask: int, *, whole_state: bool = False
) -> dict[Family, dict[str, Treatment]]:
    """The sources one Service claims and their treatments, canonical; within the
    Service the first entry naming a source wins (as in ``conntrack.source_treatments``).

    ``whole_state``: part of a walk over every Service (a full build), which goes
    through conntrack's memo; an incremental step computes its few Services
    directly, so that the memo does not collect the entries of every change.
    Raises :class:`~metaleg.firewall.conntrack.TreatmentError` naming the Service.
    """
    result: dict[Family, dict[str, Treatment]] = {}
    treatments_of = (
        conntrack.entry_treatments if whole_state else conntrack.compute_entry_treatments
    )
    for entry in service.families:
        table = result.setdefault(entry.family, {})
        for source, treatment in treatments_of(
            service.key, entry, service.destination_ports, fwmask
        ):
            table.setdefault(source, treatment)
    return result


def changed_services(
    old: tuple[ServiceEgress, ...],
    new: tuple[ServiceEgress, ...],
    by_key: Mapping[ServiceKey, ServiceEgress],
) -> list[ServiceChange] | None:
    """The Services that differ between two states' ``services``, as (key, old, new).

    ``old`` is known to be strictly sorted by key (``by_key`` maps it); None when
    ``new`` is not, since conflicts are then resolved by an order this cannot follow.
    Unchanged Services compare equal (immutable Structs), so this is one cheap pass.
    """
    if len(old) == len(new):
        positions = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
        if all(
            old[i].namespace == new[i].namespace and old[i].name == new[i].name for i in positions
        ):
            # Same keys in the same places: new is ordered like old.
            return [((new[i].namespace, new[i].name), old[i], new[i]) for i in positions]
    keys = [(service.namespace, service.name) for service in new]
    if any(a >= b for a, b in itertools.pairwise(keys)):
        return None
    changed: list[ServiceChange] = []
    for key, service in zip(keys, new, strict=True):
        before = by_key.get(key)
        if before is None or before != service:
            changed.append((key, before, service))
    changed += [(key, by_key[key], None) for key in by_key.keys() - set(keys)]
    return changed


def step_services(
    old: NodeDesiredState,
    new: NodeDesiredState,
    by_key: Mapping[ServiceKey, ServiceEgress],
    ordered: bool,
) -> list[ServiceChange] | None:
    """The Services an incremental step from ``old`` to ``new`` changes, or None when the
    step must go the full way: ``old`` not sorted (``ordered``), another mask or
    exclusion (they change every source's treatment), or ``new`` not sorted."""
    if (
        not ordered
        or new.fwmask != old.fwmask
        or new.exclude_dst_ipv4 != old.exclude_dst_ipv4
        or new.exclude_dst_ipv6 != old.exclude_dst_ipv6
    ):
        return None
    return changed_services(old.services, new.services, by_key)


@dataclass
class SourceChange:
    """One source touched by a step: who claims it afterwards and its treatment before
    and after (None: not treated)."""

    family: Family
    source: str
    claimants: tuple[ServiceKey, ...]
    """Every Service claiming the source after the change, sorted (the first owns it)."""
    before: Treatment | None
    after: Treatment | None


@dataclass
class ClaimStep:
    """One step of a :class:`SourceClaims`, computed but not yet committed."""

    state: NodeDesiredState
    services: list[ServiceChange]
    sources: list[SourceChange]
    """Every source a changed Service claims before or after (treatment changed or not)."""
    flush: FlushPlan
    """The conntrack step: exactly the sources whose treatment changed, with their
    old and new treatments (the views hold only those: :meth:`FlushPlan.wants`
    never looks at others)."""


class SourceClaims:
    """The applied state's Services and, per family, which of them claim each source.

    :meth:`build` makes one from a whole state; :meth:`step` computes the step to
    another state without changing anything, :meth:`commit` takes it as applied.
    A state whose Services are not sorted by key, or a step that changes the
    mask or the excluded networks, has no step (None): callers go the full way.
    """

    def __init__(
        self,
        state: NodeDesiredState,
        services: dict[ServiceKey, ServiceEgress],
        owner: dict[Family, dict[str, ServiceKey]],
        shared_sources: dict[Family, dict[str, tuple[ServiceKey, ...]]],
        ordered: bool,
    ) -> None:
        self.state = state
        self.fwmask = state.fwmask
        self.services = services
        self.owner = owner
        """Per family, source -> the Service that owns it (the first claimant)."""
        self.shared_sources = shared_sources
        """Per family, each source that several Services claim -> all of them, sorted (rare;
        the first owns it)."""
        self.ordered = ordered
        self.exclude_networks: dict[Family, tuple[IPNetwork, ...]] = {
            Family.IPV4: conntrack.collapse_cidrs(state.exclude_dst_ipv4, Family.IPV4),
            Family.IPV6: conntrack.collapse_cidrs(state.exclude_dst_ipv6, Family.IPV6),
        }

    @classmethod
    def build(cls, state: NodeDesiredState) -> tuple[SourceClaims, list[OwnedClaims]]:
        """The claims of a whole state, and what each Service owns, in Service order
        (for a backend's full render; the dicts are shared, not copied).

        Raises :class:`~metaleg.firewall.conntrack.TreatmentError` for a bad entry.
        """
        services: dict[ServiceKey, ServiceEgress] = {}
        owners: dict[Family, dict[str, ServiceKey]] = {f: {} for f in Family}
        shared_sources: dict[Family, dict[str, tuple[ServiceKey, ...]]] = {f: {} for f in Family}
        owned: list[OwnedClaims] = []
        ordered = True
        previous: ServiceKey | None = None
        for service in state.services:
            key = (service.namespace, service.name)
            if previous is not None and key <= previous:
                ordered = False
            previous = key
            services[key] = service
            for family, claims in service_claims(service, state.fwmask, whole_state=True).items():
                owner = owners[family]
                if owner.keys().isdisjoint(claims):  # the rule: no source of another
                    owner.update(dict.fromkeys(claims, key))
                    owned.append((family, claims))
                    continue
                family_shared, mine = shared_sources[family], {}
                for source, treatment in claims.items():
                    first = owner.get(source)
                    if first is None:
                        owner[source] = key
                        mine[source] = treatment
                    else:
                        family_shared[source] = (
                            *family_shared.get(source, (first,)),
                            key,
                        )
                owned.append((family, mine))
        for family_shared in shared_sources.values():
            for source, keys in family_shared.items():
                family_shared[source] = tuple(sorted(keys))
        conntrack.walked_whole_state()  # every entry of the state was looked up above
        return cls(state, services, owners, shared_sources, ordered), owned

    def step(self, new: NodeDesiredState) -> ClaimStep | None:
        """The step from the applied state to ``new``, or None when it needs the full way
        (another mask or exclusion, Services out of order). Raises
        :class:`~metaleg.firewall.conntrack.TreatmentError` for a bad entry."""
        services = step_services(self.state, new, self.services, self.ordered)
        if services is None:
            return None
        old_claims = {
            key: service_claims(before, self.fwmask) if before is not None else {}
            for key, before, _ in services
        }
        new_claims = {
            key: service_claims(after, self.fwmask) if after is not None else {}
            for key, _, after in services
        }
        unchanged_claims: dict[ServiceKey, dict[Family, dict[str, Treatment]]] = {}

        def claim(key: ServiceKey, family: Family, source: str, after: bool) -> Treatment:
            claims = (new_claims if after else old_claims).get(key)
            if claims is None:  # an unchanged Service contending for a changed source
                claims = unchanged_claims.get(key)
                if claims is None:
                    claims = unchanged_claims[key] = service_claims(self.services[key], self.fwmask)
            return claims[family][source]

        changes: list[SourceChange] = []
        for family in Family:
            claimers: dict[str, list[ServiceKey]] = {}
            touched: set[str] = set()
            for key, _, _ in services:
                touched.update(old_claims[key].get(family, ()))
                for source in new_claims[key].get(family, ()):
                    claimers.setdefault(source, []).append(key)
            touched.update(claimers)
            owner, shared_sources = self.owner[family], self.shared_sources[family]
            for source in touched:
                first = owner.get(source)
                keys = shared_sources.get(source) or ((first,) if first is not None else ())
                before = claim(keys[0], family, source, False) if keys else None
                claimants = tuple(
                    sorted([*(k for k in keys if k not in new_claims), *claimers.get(source, ())])
                )
                after = claim(claimants[0], family, source, True) if claimants else None
                changes.append(SourceChange(family, source, claimants, before, after))
        moved = [c for c in changes if c.before != c.after]
        flush = FlushPlan(
            {f: {c.source for c in moved if c.family == f} for f in Family},
            self._treatment_view(moved, before=True),
            self._treatment_view(moved, before=False),
        )
        return ClaimStep(new, services, changes, flush)

    def _treatment_view(self, changes: list[SourceChange], before: bool) -> EgressView:
        treatments: dict[Family, dict[str, Treatment]] = {f: {} for f in Family}
        for change in changes:
            treatment = change.before if before else change.after
            if treatment is not None:
                treatments[change.family][change.source] = treatment
        return EgressView(treatments, self.exclude_networks)

    def commit(self, step: ClaimStep) -> None:
        """Take ``step`` as applied."""
        for change in step.sources:
            family, source, claimants = change.family, change.source, change.claimants
            owner, shared_sources = self.owner[family], self.shared_sources[family]
            if not claimants:
                owner.pop(source, None)
            else:
                owner[source] = claimants[0]
            if len(claimants) > 1:
                shared_sources[source] = claimants
            else:
                shared_sources.pop(source, None)
        for key, before, service in step.services:
            if before is not None:
                conntrack.forget_entries(before, self.fwmask)
            if service is None:
                del self.services[key]
            else:
                self.services[key] = service
        self.state = step.state
