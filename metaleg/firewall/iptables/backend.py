"""The ``iptables`` firewall backend: :class:`IptablesBackend` carries out each change.

The backend keeps what the kernel holds as an
:class:`~metaleg.firewall.iptables.incremental.AppliedRendering` and derives each
change from the Services that differ (:mod:`metaleg.firewall.iptables.incremental`;
a full rendering, :mod:`metaleg.firewall.iptables.render`, when that cannot be
done). It carries the change out make-before-break (:meth:`IptablesBackend._execute`):
ipsets over netlink in batches (:mod:`metaleg.firewall.iptables.ipsets`), tables
by the helper process of each family, one commit per table
(:mod:`metaleg.firewall.iptables.helper_client`). Deleting the conntrack entries
a change outdates is the caller's part (:mod:`metaleg.firewall.selection`).
"""

from __future__ import annotations

import contextlib

import msgspec

from metaleg.backend import BackendError, EgressCount
from metaleg.firewall.iptables.counters import CountOwners, egress_counts
from metaleg.firewall.iptables.drift import IptablesDriftCheck
from metaleg.firewall.iptables.helper_client import TOOL, XtablesHelper
from metaleg.firewall.iptables.incremental import AppliedRendering
from metaleg.firewall.iptables.ipsets import IpsetClient, SetPlan, plan_sets
from metaleg.firewall.iptables.protocol import Mode, SyncReply, SyncRequest
from metaleg.firewall.iptables.render import FAMILIES
from metaleg.firewall.iptables.rules import TableSpec, is_stale_binding, snatted_set_name
from metaleg.model import Family, NodeDesiredState

BREAK_ORDER = ("filter", "mangle", "nat")
"""The order of the break phase (EXACT): filter first, so that the transit guard's exceptions
(RETURN for marked and SNATed sources) go before the MARK and SNAT rules they stand for, and
a stale binding DROP (taken out even earlier when it can, see ``IptablesBackend._execute``)
before its SNAT."""


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


class IptablesBackend:
    """Renders a :class:`~metaleg.model.NodeDesiredState` into legacy iptables rules and ipsets
    in the network namespace of the current process (the layout:
    :mod:`metaleg.firewall.iptables.render`).

    Not thread-safe: one caller at a time. ``last_changes`` lists, after each
    call, what was changed (empty when nothing was), for logs and tests.
    """

    name = "iptables"

    def __init__(self, *, timeout: float = 120.0) -> None:
        self._ipsets = IpsetClient()
        self._helpers = {family: XtablesHelper(family, timeout) for family in FAMILIES}
        self._applied: AppliedRendering | None = None
        """What the kernel holds after the last successful call; None when unknown."""
        self._set_generation = 0
        """Sent with every helper request; changes whenever sets may have been destroyed
        (or recreated) since the previous request, see ``SyncRequest.set_generation``."""
        self._sets_uncertain = True
        self.last_changes: tuple[str, ...] = ()
        self._drift: IptablesDriftCheck | None = None
        self._count_owners: CountOwners | None = None
        """Whose counts each counted set member holds, for the applied state it was built for."""

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
        costs what it changes (:class:`AppliedRendering`), except when the mask or
        the exclusions change: then both states are rendered in full and compared.
        """
        failed = True
        try:
            self._apply(state)
            failed = False
        finally:
            self._after_write(failed or bool(self.last_changes) or self._applied is None)

    def _apply(self, state: NodeDesiredState) -> None:
        applied = self._applied
        if applied is None:
            self._resync(state)
            return
        step = applied.step(state)
        if step is None:
            fresh = AppliedRendering(state, applied)
            before, after = applied.desired(), fresh.desired()
            plan = plan_sets(before.sets, after.sets)
            tables = changed_tables(before.tables, after.tables)
            if plan.empty and not any(tables.values()):
                self._applied, self.last_changes = fresh, ()
                return
            self._execute(plan, tables, collect_garbage=False, before=applied.tables)
            self._applied = fresh
            return
        tables = (
            changed_tables(applied.tables, step.tables)
            if step.tables is not None
            else {family: () for family in FAMILIES}
        )
        if step.plan.empty and not any(tables.values()):
            applied.commit(step)
            self.last_changes = ()
            return
        # Without a stale binding rule going, step 1 has nothing to do: skip looking.
        unbind_from = applied.tables if step.unbinds else None
        self._execute(step.plan, tables, collect_garbage=False, before=unbind_from)
        applied.commit(step)
        self._applied = applied

    def read_counts(self) -> list[EgressCount]:
        """Per Service, family and action, the packets and bytes of its treated traffic, from
        the shared sets' member counters (:mod:`metaleg.firewall.iptables.counters`)."""
        applied = self._applied
        if applied is None:
            raise BackendError(
                "egress counters: what the kernel holds is not known (the last change failed)"
            )
        owners = self._count_owners
        if owners is None or owners.state is not applied.state:
            # The old index goes before the new one is built: one index less at the peak.
            owners = self._count_owners = None
            owners = self._count_owners = CountOwners(applied)
        return egress_counts(owners, self._ipsets.read_counters)

    def resync(self, state: NodeDesiredState) -> None:
        """Compare with the kernel, repair every difference and delete stale metaleg objects."""
        try:
            self._resync(state)
        finally:
            self._after_write(True)

    def _resync(self, state: NodeDesiredState) -> None:
        self._start_helpers()
        applied = AppliedRendering(state, self._applied)
        current = self._ipsets.list_sets()
        desired = applied.desired()
        plan = plan_sets(current, desired.sets)
        del current
        self._execute(plan, changed_tables(None, desired.tables), collect_garbage=True)
        self._applied = applied

    def cleanup(self) -> None:
        """Remove every metaleg jump, rule, chain and set of both families. Idempotent."""
        self._applied = None
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
           kept (KEEP_OLD), so every table covers old and new; the members that
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
        self._applied = None
        self.last_changes = ()
        if collect_garbage or self._sets_uncertain:
            self._set_generation += 1
        self._sets_uncertain = True  # until this change is complete
        generation = self._set_generation
        changes: list[str] = []
        if before is not None:
            self._drop_departing_stale_bindings(before, tables, generation, changes)
        plan, exceptions = split_exceptions(plan)
        changes += plan.describe_make()
        self._ipsets.make(plan)
        if plan.recreate:
            self._set_generation += 1
            generation = self._set_generation
        kept_old = self._commit_keeping_old(tables, exceptions, generation, changes)
        # Garbage collection looks at every table (stale chains, other tables), so it
        # gets all specs even where step 3 already reached them.
        final = {
            family: _in_break_order(tables[family] if collect_garbage else kept_old[family])
            for family in FAMILIES
        }
        self._commit_exact(final, exceptions, collect_garbage, generation, changes)
        errors = self._ipsets.unmake(plan)
        self._sets_uncertain = bool(plan.destroy)
        changes += plan.describe_break()
        self.last_changes = tuple(changes)
        if errors:
            raise BackendError("; ".join(errors))

    def _drop_departing_stale_bindings(
        self,
        before: dict[Family, dict[str, TableSpec]],
        tables: dict[Family, tuple[TableSpec, ...]],
        generation: int,
        changes: list[str],
    ) -> None:
        """Step 1 of :meth:`_execute`: commit the tables that lose stale binding rules
        without them, and otherwise as they are."""
        requests = {}
        for family in FAMILIES:
            early = without_departing_stale_bindings(before[family], tables[family])
            if early:
                requests[family] = SyncRequest(
                    tables=early, mode=Mode.EXACT, set_generation=generation
                )
        for family, reply in self._request_all(requests).items():
            changes += self._describe(family, reply)

    def _commit_keeping_old(
        self,
        tables: dict[Family, tuple[TableSpec, ...]],
        exceptions: SetPlan,
        generation: int,
        changes: list[str],
    ) -> dict[Family, tuple[TableSpec, ...]]:
        """Step 3 of :meth:`_execute`: commit ``tables`` keeping the old rules, mangle and
        nat, then the SNATed sets' new members (``exceptions.add``), then filter (one
        request per family when no member is added). Returns, per family, the tables
        that kept old rules."""
        phases = [tables]
        if exceptions.add:
            filter_specs, other_specs = _split_filter(tables)
            phases = [other_specs, filter_specs]
        kept_old: dict[Family, tuple[TableSpec, ...]] = {family: () for family in FAMILIES}
        for phase, phase_tables in enumerate(phases):
            if phase == 1:
                changes += SetPlan(add=exceptions.add).describe_make()
                self._ipsets.make(SetPlan(add=exceptions.add))
            requests = {
                family: SyncRequest(tables=specs, mode=Mode.KEEP_OLD, set_generation=generation)
                for family, specs in phase_tables.items()
                if specs
            }
            for family, reply in self._request_all(requests).items():
                changes += self._describe(family, reply)
                kept_old[family] += tuple(
                    spec
                    for spec, result in zip(phase_tables[family], reply.results, strict=True)
                    if not result.exact
                )
        return kept_old

    def _commit_exact(
        self,
        final: dict[Family, tuple[TableSpec, ...]],
        exceptions: SetPlan,
        collect_garbage: bool,
        generation: int,
        changes: list[str],
    ) -> None:
        """Step 4 of :meth:`_execute`: commit the ``final`` tables exactly, filter first,
        then the SNATed sets lose their members that go (``exceptions.remove``), then
        mangle and nat."""
        phases = [final]
        if exceptions.remove:
            filter_specs, other_specs = _split_filter(final)
            # Garbage collection cleans the tables its request does not name: all of them.
            phases = [filter_specs, final if collect_garbage else other_specs]
        for phase, phase_tables in enumerate(phases):
            if phase == 1:
                self._ipsets.unmake(SetPlan(remove=exceptions.remove))
                changes += SetPlan(remove=exceptions.remove).describe_break()
            last = phase == len(phases) - 1
            requests = {
                family: SyncRequest(
                    tables=specs,
                    mode=Mode.EXACT,
                    collect_garbage=collect_garbage and last,
                    set_generation=generation,
                )
                for family, specs in phase_tables.items()
                if specs or (collect_garbage and last)
            }
            for family, reply in self._request_all(requests).items():
                changes += self._describe(family, reply)

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


def without_departing_stale_bindings(
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


def _in_break_order(specs: tuple[TableSpec, ...]) -> tuple[TableSpec, ...]:
    """``specs`` in :data:`BREAK_ORDER` (tables it does not name last, in their order)."""
    rank = {name: index for index, name in enumerate(BREAK_ORDER)}
    return tuple(sorted(specs, key=lambda spec: rank.get(spec.name, len(rank))))
