"""Incremental changes: a change costs what it changes, not what the table holds.

The backend keeps an :class:`AppliedTable`: the applied state, its content and, per
source, the Services claiming it (:class:`~metaleg.firewall.claims.SourceClaims`).
Each step is derived from the Services that differ between two snapshots
(unchanged ones compare equal) and patched in only once the kernel took its
transaction. The step's script is the one :func:`~.scripts.diff_script` would
write for the full contents, and its conntrack plan covers exactly the sources
whose treatment changed (both checked against the full render by
``tests/test_nft_incremental.py``). In the kernel, too, an element change costs
the same at any N (no verdict map, see :mod:`.layout`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from metaleg.backend import BackendError
from metaleg.firewall.claims import ClaimStep, SourceChange, SourceClaims
from metaleg.firewall.conntrack import (
    EVERY_DESTINATION,
    DestinationPolicy,
    FlushPlan,
    Treatment,
    TreatmentError,
    equal_but_for_policy,
)
from metaleg.firewall.nftables.content import (
    CountKey,
    TableContent,
    canonical_policy,
    exclude_prefixes,
    mark_literal,
    policy_elements,
    transit_prefixes,
)
from metaleg.firewall.nftables.layout import SUFFIX, set_order, slot_set_name
from metaleg.firewall.nftables.scripts import (
    element_additions,
    element_deletions,
    slot_change_commands,
)
from metaleg.model import Action, Family, NodeDesiredState


@dataclass
class PendingStep:
    """One incremental step of an :class:`AppliedTable`, computed but not yet committed."""

    script: str
    """The nft transaction (empty: nothing to do in the kernel)."""
    claim_step: ClaimStep
    """The Services and sources that change (see :class:`~metaleg.firewall.claims.ClaimStep`)."""
    new_transit: dict[Family, frozenset[str]] | None
    """The transit guard's prefixes after the step (None: unchanged)."""
    new_marks: list[int]
    """Gateway slots the step creates (their rules are new to the baseline)."""

    @property
    def sources(self) -> list[SourceChange]:
        return self.claim_step.sources

    @property
    def flush(self) -> FlushPlan:
        """The conntrack step: exactly the sources whose treatment changed."""
        return self.claim_step.flush


_COUNT_VERSIONS = itertools.count(1)


class AppliedTable:
    """What the backend last committed, indexed so that a change costs what it changes.

    Holds the applied state's :class:`~metaleg.firewall.claims.SourceClaims` (which
    Service owns each source) and its :class:`TableContent` (mutable sets and maps,
    patched in place). Owned by one backend; :meth:`step_to` computes a step
    without touching anything, :meth:`commit` applies it once the kernel took the
    transaction.
    """

    def __init__(self, state: NodeDesiredState) -> None:
        """Render ``state`` in full (raises :class:`BackendError` naming a bad entry)."""
        try:
            self.claims, owned = SourceClaims.build(state)
        except TreatmentError as error:
            raise BackendError(f"nftables: {error}") from error
        self.sources_per_mark: Counter[int] = Counter()
        """gateway mark -> sources marked with it (both families): the slots in use."""
        snat: dict[Family, dict[str, str]] = {f: {} for f in Family}
        mark: dict[Family, dict[str, int]] = {f: {} for f in Family}
        reject: dict[Family, set[str]] = {f: set() for f in Family}
        self.restarted_counts: dict[Family, set[str]] = {f: set() for f in Family}
        """Sources whose element of ``count<f>`` a committed step deleted (and maybe added
        again, from 0) since the owner last took them (:mod:`.counters`)."""
        self.count_version = next(_COUNT_VERSIONS)
        """Changes whenever the counted sources or their keys do (unique across tables)."""
        self.content = TableContent(
            exclude=exclude_prefixes(state),
            snat=snat,
            mark=mark,
            transit={f: set(members) for f, members in transit_prefixes(state).items()},
        )
        for family, claims in owned:
            if not claims:
                continue
            owner = self.claims.owner[family][next(iter(claims))]
            treatments = set(claims.values())
            if len(treatments) == 1:  # the rule: one entry per family
                treatment = treatments.pop()
                self._add_sources_alike(family, claims, treatment, snat, mark, reject)
                self._police_and_count_alike(family, owner, claims, treatment)
            else:
                self._add_sources(family, claims.items(), snat, mark, reject)
                for source, treatment in claims.items():
                    self._police_and_count_alike(family, owner, (source,), treatment)
        del owned
        self.content.reject.update(reject)

    @property
    def state(self) -> NodeDesiredState:
        """The applied state."""
        return self.claims.state

    @property
    def fwmask(self) -> int:
        """The applied state's mask (a step never changes it)."""
        return self.claims.fwmask

    def _add_sources_alike(
        self,
        family: Family,
        sources: Iterable[str],
        treatment: Treatment,
        snat: dict[Family, dict[str, str]],
        mark: dict[Family, dict[str, int]],
        reject: dict[Family, set[str]],
    ) -> None:
        """:meth:`_add_sources` of sources that share one treatment, in bulk."""
        if treatment.action == Action.SNAT:
            assert treatment.snat_ip is not None
            snat[family].update(dict.fromkeys(sources, treatment.snat_ip))
        elif treatment.action == Action.MARK:
            assert treatment.fwmark is not None
            added = dict.fromkeys(sources, treatment.fwmark)
            mark[family].update(added)
            self.sources_per_mark[treatment.fwmark] += len(added)
        else:
            reject[family].update(sources)

    def _police_and_count_alike(
        self,
        family: Family,
        owner: tuple[str, str],
        sources: Collection[str],
        treatment: Treatment,
    ) -> None:
        """Enter ``sources`` (owned by Service ``owner``, all with ``treatment``) into the
        destination policy's sets and the counted sources."""
        content = self.content
        policy = canonical_policy(treatment.policy, family)
        if policy != EVERY_DESTINATION:
            content.policy[family].update(dict.fromkeys(sources, policy))
        key = CountKey(owner[0], owner[1], family, treatment.action)
        content.count[family].update(dict.fromkeys(sources, key))

    def _add_sources(
        self,
        family: Family,
        claims: Iterable[tuple[str, Treatment]],
        snat: dict[Family, dict[str, str]],
        mark: dict[Family, dict[str, int]],
        reject: dict[Family, set[str]],
    ) -> None:
        for source, treatment in claims:
            if treatment.action == Action.SNAT:
                assert treatment.snat_ip is not None
                snat[family][source] = treatment.snat_ip
            elif treatment.action == Action.MARK:
                assert treatment.fwmark is not None
                mark[family][source] = treatment.fwmark
                self.sources_per_mark[treatment.fwmark] += 1
            else:
                reject[family].add(source)

    def step_to(self, new: NodeDesiredState) -> PendingStep | None:
        """The step from the applied state to ``new``, or None when it needs the full path
        (another mask or exclusion, Services out of order). Raises :class:`BackendError`
        for a bad entry, before anything changes."""
        try:
            claim_step = self.claims.step(new)
        except TreatmentError as error:
            raise BackendError(f"nftables: {error}") from error
        if claim_step is None:
            return None
        old = self.claims.state
        transit = None
        if (new.transit_guard_ipv4, new.transit_guard_ipv6) != (
            old.transit_guard_ipv4,
            old.transit_guard_ipv6,
        ):
            transit = transit_prefixes(new)
        script, new_marks = self._step_script(claim_step.sources, transit)
        return PendingStep(script, claim_step, transit, new_marks)

    def _step_script(
        self, changes: list[SourceChange], transit: dict[Family, frozenset[str]] | None
    ) -> tuple[str, list[int]]:
        """The transaction, command for command what :func:`diff_script` writes for the
        full contents before and after (elements sorted alike), and the marks whose slots
        it creates."""
        deletions, additions, mark_delta = _element_changes(changes)
        self._policy_and_count_changes(changes, deletions, additions)
        if transit is not None:
            for family in Family:
                s, have = SUFFIX[family], self.content.transit[family]
                deletions[f"transit{s}"] = list(have - transit[family])
                additions[f"transit{s}"] = list(transit[family] - have)
        current = self.sources_per_mark
        new_marks = sorted(m for m, n in mark_delta.items() if n > 0 and not current[m])
        gone_marks = sorted(m for m, n in mark_delta.items() if n < 0 and current[m] + n == 0)
        kept = {m for m, n in current.items() if n > 0} - set(gone_marks)
        commands, last = slot_change_commands(
            new_marks, gone_marks, kept | set(new_marks), self.fwmask
        )
        for name in set_order(kept):
            commands += element_deletions(name, deletions.get(name, ()))
        for name in set_order(kept | set(new_marks)):
            commands += element_additions(name, additions.get(name, ()))
        commands += last
        return ("\n".join(commands) + "\n" if commands else ""), new_marks

    def _policy_and_count_changes(
        self,
        changes: list[SourceChange],
        deletions: dict[str, list[str]],
        additions: dict[str, list[str]],
    ) -> None:
        """Add the element changes of the destination policy's sets and of the counted
        sources to ``deletions`` and ``additions``. What a source had is read from the
        applied content, what it gets from its claim after the change."""
        content = self.content
        for change in changes:
            family, source = change.family, change.source
            s = SUFFIX[family]
            was = content.policy[family].get(source, EVERY_DESTINATION)
            now = _policy_after(change)
            if was != now:
                _policy_element_changes(source, s, was, now, deletions, additions)
            counted, key = content.count[family].get(source), _count_key_after(change)
            if counted != key:
                # Deleted and added again: the element's counter starts from 0 for its new key.
                if counted is not None:
                    deletions.setdefault(f"count{s}", []).append(source)
                if key is not None:
                    additions.setdefault(f"count{s}", []).append(source)

    def _commit_policy_and_count(self, change: SourceChange) -> None:
        """Take the destination policy and the count key of ``change``'s source as applied."""
        family, source = change.family, change.source
        policies, counted = self.content.policy[family], self.content.count[family]
        policy, key = _policy_after(change), _count_key_after(change)
        if policy != EVERY_DESTINATION:
            policies[source] = policy
        else:
            policies.pop(source, None)
        if counted.get(source) == key:
            return
        self.count_version = next(_COUNT_VERSIONS)
        if source in counted:
            self.restarted_counts[family].add(source)
        if key is not None:
            counted[source] = key
        else:
            counted.pop(source, None)

    def commit(self, step: PendingStep) -> None:
        """Take ``step`` as applied (the kernel committed its script)."""
        content = self.content
        for source_change in step.sources:
            self._commit_policy_and_count(source_change)
            family, source = source_change.family, source_change.source
            before, after = source_change.before, source_change.after
            if equal_but_for_policy(before, after):
                continue
            if before is not None:
                if before.action == Action.SNAT:
                    del content.snat[family][source]
                elif before.action == Action.MARK:
                    assert before.fwmark is not None
                    del content.mark[family][source]
                    self.sources_per_mark[before.fwmark] -= 1
                    if not self.sources_per_mark[before.fwmark]:
                        del self.sources_per_mark[before.fwmark]
                else:
                    _mutable_set(content.reject, family).discard(source)
            if after is not None:
                if after.action == Action.SNAT:
                    assert after.snat_ip is not None
                    content.snat[family][source] = after.snat_ip
                elif after.action == Action.MARK:
                    assert after.fwmark is not None
                    content.mark[family][source] = after.fwmark
                    self.sources_per_mark[after.fwmark] += 1
                else:
                    _mutable_set(content.reject, family).add(source)
        if step.new_transit is not None:
            for family in Family:
                content.transit[family] = set(step.new_transit[family])
        self.claims.commit(step.claim_step)
        content.__dict__.pop("view", None)  # the cached conntrack view is outdated


def _policy_after(change: SourceChange) -> DestinationPolicy:
    """The canonical destination policy of ``change``'s source after the change."""
    after = change.after
    return canonical_policy(after.policy, change.family) if after else EVERY_DESTINATION


def _count_key_after(change: SourceChange) -> CountKey | None:
    """What ``change``'s source counts as after the change (None: not treated): its owner's
    (the first claimant's) Service, the family and the action."""
    if change.after is None or not change.claimants:
        return None
    namespace, name = change.claimants[0]
    return CountKey(namespace, name, change.family, change.after.action)


def _policy_element_changes(
    source: str,
    suffix: str,
    was: DestinationPolicy,
    now: DestinationPolicy,
    deletions: dict[str, list[str]],
    additions: dict[str, list[str]],
) -> None:
    """The element changes of the destination policy's sets for ``source`` (of the family
    of ``suffix``), whose canonical policy goes from ``was`` to ``now``."""
    was_dst, was_port = policy_elements(source, was)
    now_dst, now_port = policy_elements(source, now)
    for kind, before, after in (("dst", was_dst, now_dst), ("port", was_port, now_port)):
        name = f"{kind}{suffix}"
        if before != after:
            deletions.setdefault(name, []).extend(set(before) - set(after))
            additions.setdefault(name, []).extend(set(after) - set(before))
        if bool(before) != bool(after):
            changed = (additions if after else deletions).setdefault(f"policed_{name}", [])
            changed.append(source)


def _mutable_set(sets: dict[Family, AbstractSet[str]], family: Family) -> set[str]:
    members = sets[family]
    if not isinstance(members, set):
        members = sets[family] = set(members)
    return members


def _element_changes(
    changes: list[SourceChange],
) -> tuple[dict[str, list[str]], dict[str, list[str]], Counter[int]]:
    """The element deletions and additions (set or map name -> elements) of ``changes``,
    and per mark the change in the number of its sources."""
    deletions: dict[str, list[str]] = {}
    additions: dict[str, list[str]] = {}
    mark_delta: Counter[int] = Counter()
    for change in changes:
        before, after = change.before, change.after
        if equal_but_for_policy(before, after):
            continue
        family = change.family
        s = SUFFIX[family]
        if before is not None:
            if before.action == Action.SNAT:
                deletions.setdefault(f"snat{s}", []).append(change.source)
            elif before.action == Action.MARK:
                assert before.fwmark is not None
                deletions.setdefault(f"mark{s}", []).append(change.source)
                slot = slot_set_name(family, before.fwmark)
                deletions.setdefault(slot, []).append(change.source)
                mark_delta[before.fwmark] -= 1
            elif after is None or after.action != Action.REJECT:
                deletions.setdefault(f"reject{s}", []).append(change.source)
        if after is not None:
            if after.action == Action.SNAT:
                additions.setdefault(f"snat{s}", []).append(f"{change.source} : {after.snat_ip}")
            elif after.action == Action.MARK:
                assert after.fwmark is not None
                additions.setdefault(f"mark{s}", []).append(
                    f"{change.source} : {mark_literal(after.fwmark)}"
                )
                slot = slot_set_name(family, after.fwmark)
                additions.setdefault(slot, []).append(change.source)
                mark_delta[after.fwmark] += 1
            elif before is None or before.action != Action.REJECT:
                additions.setdefault(f"reject{s}", []).append(change.source)
    return deletions, additions, mark_delta
