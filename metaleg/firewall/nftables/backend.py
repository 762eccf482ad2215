"""The nftables firewall backend: one private table, a few static rules, dynamic sets and maps.

The table's layout, and why it is so, is described in
:mod:`metaleg.firewall.nftables.layout`.

Every :meth:`NftablesBackend.apply` is ONE nft transaction
(:mod:`metaleg.firewall.nftables.scripts`).

Incremental changes cost what they change, not what the table holds
(:mod:`metaleg.firewall.nftables.incremental`).

A periodic re-sync lists and compares the table in a short-lived forked child
(:func:`metaleg.lifecycle.check_in_child`), so that the listing's peak memory
does not stay with the long-lived firewall process; only a table that differs
is read again here, to repair it.

The backend scopes its own changes' conntrack deletions
(:class:`~metaleg.firewall.flows.FlowScoping`): each call records which entries
it outdated, from the step's Services or, when it recreates the table, from what
the kernel held before, and the caller deletes them once the call returned, that
is after the transaction (:mod:`metaleg.firewall.flows`).
"""

from __future__ import annotations

import logging
import time

from metaleg.backend import BackendError, EgressCount
from metaleg.firewall.conntrack import EgressView, FlushPlan
from metaleg.firewall.nftables.content import TableContent
from metaleg.firewall.nftables.counters import CountLedger, read_counted_sources
from metaleg.firewall.nftables.drift import NftDriftWatch
from metaleg.firewall.nftables.incremental import AppliedTable
from metaleg.firewall.nftables.kernel import ActualTable, differences, read_table
from metaleg.firewall.nftables.layout import QUALIFIED_TABLE, REJECT_WITH, TABLE
from metaleg.firewall.nftables.libnftables import Nft, NftError
from metaleg.firewall.nftables.scripts import diff_script, full_script
from metaleg.firewall.wire.nfnetlink import NetfilterSocket
from metaleg.lifecycle import ForkedCheckError, check_in_child, release_memory
from metaleg.model import Family, NodeDesiredState

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 120.0
"""Seconds a re-sync's comparison in a child may take, with room to spare (~2.6 s at N=5000
Services); a child still running then is killed and the worker compares by itself."""


class NftablesBackend:
    """Renders :class:`NodeDesiredState` into ``table inet metaleg`` (see the module doc).

    Knob: ``reject_with`` (one of :data:`REJECT_WITH`).
    """

    name = "nftables"

    def __init__(
        self,
        *,
        reject_with: str = "icmpx admin-prohibited",
    ) -> None:
        if reject_with not in REJECT_WITH:
            raise ValueError(f"nftables: reject_with {reject_with!r} is not one of {REJECT_WITH}")
        self.reject_with = reject_with
        self._nft: Nft | None = None
        self._applied: AppliedTable | None = None
        """What we last committed (None: unknown, the next apply recreates the table)."""
        self._fwmask: int | None = None
        self._baseline: dict[str, str] = {}
        """rule comment -> expression, as the kernel listed it right after we wrote it."""
        self._outdated: FlushPlan | None = None
        """The conntrack entries the current (or last) call outdated."""
        self.last_duration = 0.0
        """Seconds the last nft transaction took (for metrics and tests)."""
        self.last_script_chars = 0
        """Length of the last nft transaction's script (what a change costs, for tests)."""
        self.transactions = 0
        """nft transactions committed by this backend (for metrics and tests)."""
        self._drift: NftDriftWatch | None = None
        self._counter_socket: NetfilterSocket | None = None
        """The netlink socket counters are read over (opened on first use, like ``nft``)."""
        self._ledger = CountLedger()

    def drift_detector(self) -> NftDriftWatch:
        """Watches the kernel's nftables notifications for others' changes to our table."""
        if self._drift is None:
            self._drift = NftDriftWatch(TABLE)
        return self._drift

    # The context is opened lazily so that a backend built before entering a
    # namespace (or before a fork) acts where it is used.
    @property
    def nft(self) -> Nft:
        if self._nft is None:
            try:
                self._nft = Nft()
            except NftError as error:
                raise BackendError(f"nftables: {error}") from error
        return self._nft

    def apply(self, state: NodeDesiredState) -> None:
        self._outdated = None
        applied = self._applied
        if applied is None or self._fwmask != state.fwmask:
            self._recreate(AppliedTable(state), self._kernel_content(), "first apply")
            return
        step = applied.step_to(state)
        if step is None:
            # Another exclusion set, or Services out of order: render and compare it all.
            self._apply_full_diff(applied, state)
            return
        if step.script:
            if not self._run_incremental(step.script, state):
                return
            applied.commit(step)
            if step.new_marks:
                self._record_baseline(merge=True)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("nftables updated", extra={"elements": applied.content.counts()})
        else:
            applied.commit(step)
        self._outdate(step.flush)

    def _apply_full_diff(self, applied: AppliedTable, state: NodeDesiredState) -> None:
        fresh = AppliedTable(state)
        script = diff_script(applied.content, fresh.content, state.fwmask)
        if script:
            if not self._run_incremental(script, state):
                return
            if fresh.content.fwmarks() - applied.content.fwmarks():
                self._record_baseline(merge=True)
        self._applied = fresh
        self._ledger.restarted(applied.restarted_counts)
        self._ledger.restarted(applied.content.restarted_counts(fresh.content))
        self._outdate(FlushPlan.between(applied.content.view, fresh.content.view))

    def _run_incremental(self, script: str, state: NodeDesiredState) -> bool:
        """Run an incremental transaction; False when it failed and the table was recreated."""
        try:
            self._run(script)
        except BackendError as error:
            # Our idea of the table was wrong (someone changed it); a full
            # recreate is one atomic transaction too, so just do that.
            log.warning(
                "incremental nftables update failed; recreating the table",
                extra={"error": str(error)},
            )
            self._applied = None
            self._recreate(AppliedTable(state), self._kernel_content(), "repair")
            return False
        return True

    def resync(self, state: NodeDesiredState) -> None:
        self._outdated = None
        # The listing happens in a child, or in _read_table, which trims after it (and
        # the worker trims after every re-sync).
        applied = self._applied
        if applied is None or applied.state != state:
            applied = AppliedTable(state)
        # A fresh process cannot vouch for rules it did not write: it recreates once
        # (atomic, cheap) and records what the kernel made of them.
        trusted = (
            self._applied is not None and self._fwmask == state.fwmask and bool(self._baseline)
        )
        # Drift reported by the kernel's notifications: the table is known to have been
        # changed, so skip asking a child whether it differs (at N=1000, ~0.4 s of a repair).
        drifted = self._drift is not None and self._drift.take_foreign()
        if trusted and not drifted and self._table_matches(applied.content, state.fwmask):
            self._applied = applied
            return
        # Missing, differing or not ours yet: read it here to know what to repair and
        # which flows the repair outdates.
        actual = self._read_table()
        if actual is None:
            reason = "table missing"
        elif not trusted:
            reason = "first re-sync of this process"
        else:
            problems = differences(
                actual, applied.content, state.fwmask, self.reject_with, self._baseline
            )
            if not problems:  # changed back since the child's reading, or the child failed
                self._applied = applied
                return
            reason = "; ".join(problems[:10])
            log.warning("nftables table differs; recreating it", extra={"problems": problems})
        old = actual.content() if actual else None
        del actual
        self._recreate(applied, old, reason)

    def _table_matches(self, desired: TableContent, fwmask: int) -> bool:
        """Whether the kernel's table is exactly ``desired``, read and compared in a child.

        The listing of every element is this process's largest allocation
        (libnftables's cache, the JSON text, the decoded document: ~5 MiB at
        N=1000), and done here, part of that peak would stay resident for good.
        A forked child reads and compares with a fresh libnftables context and
        answers yes or no; its memory goes with it. False when the child fails:
        the caller then reads and compares in this process and logs what differs.
        """
        reject_with, baseline = self.reject_with, self._baseline

        def check() -> bool:
            actual = read_table(Nft())
            return actual is not None and not differences(
                actual, desired, fwmask, reject_with, baseline
            )

        try:
            return check_in_child(check, timeout=CHECK_TIMEOUT)
        except ForkedCheckError as error:
            log.warning(
                "cannot compare table %s in a child process; comparing here",
                QUALIFIED_TABLE,
                extra={"error": str(error)},
            )
            return False

    def cleanup(self) -> None:
        self._outdated = None
        old = self._kernel_content()
        try:
            # "add" first so that "delete" cannot fail on a missing table.
            self._run(f"add table {QUALIFIED_TABLE}\ndelete table {QUALIFIED_TABLE}\n")
        finally:
            self._applied = None
            self._baseline = {}
        if old is not None:
            # Flows we SNATed or null-bound would keep that binding after the
            # rules are gone; let them re-enter through the node's own rules.
            self._outdate(FlushPlan.between(old.view, EgressView(exclude=old.view.exclude)))

    def read_counts(self) -> list[EgressCount]:
        """Per Service, family and action, the packets and bytes the kernel counted for the
        applied table's sources (see :mod:`.counters`): one netlink dump per family;
        none before the first application. Raises ``OSError`` when the kernel cannot be
        asked."""
        if self._applied is None:
            return []
        if self._counter_socket is None:
            self._counter_socket = NetfilterSocket()
        self._ledger.restarted(self._applied.restarted_counts)
        self._applied.restarted_counts = {family: set() for family in Family}
        counted = self._applied.content.count
        readings = {
            family: read_counted_sources(self._counter_socket, family) for family in counted
        }
        return self._ledger.update(readings, counted, self._applied.count_version)

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None
        if self._counter_socket is not None:
            self._counter_socket.close()
            self._counter_socket = None

    # --- internals ---

    def _run(self, script: str) -> None:
        """Run ``script`` as one transaction (raises :class:`BackendError`)."""
        started = time.monotonic()
        self.last_script_chars = len(script)
        try:
            self.nft.run(script)
        except NftError as error:
            raise BackendError(f"nftables: table {QUALIFIED_TABLE}: {error}") from error
        finally:
            self.last_duration = time.monotonic() - started
        self.transactions += 1
        if self._drift is not None:
            self._drift.after_own_write()  # so that our own transaction is not drift

    def _read_table(self) -> ActualTable | None:
        try:
            return read_table(self.nft)
        finally:
            # libnftables built its cache of every listed element and freed it, as
            # Python did the decoded listing; glibc keeps freed memory mapped until
            # a trim, so without one every reading would leave its peak resident.
            release_memory()

    def _kernel_content(self) -> TableContent | None:
        actual = self._read_table()
        return actual.content() if actual is not None else None

    def _recreate(self, applied: AppliedTable, old: TableContent | None, reason: str) -> None:
        desired = applied.content
        self._run(full_script(desired, applied.fwmask, self.reject_with))
        self._ledger.restarted_all()  # every element of count<f> is new
        log.info(
            "nftables table recreated",
            extra={
                "reason": reason,
                "seconds": round(self.last_duration, 4),
                "elements": desired.counts(),
            },
        )
        self._applied = applied
        self._fwmask = applied.fwmask
        self._record_baseline()
        # libnftables keeps what a script added (every element of the table, here) in
        # its context's cache and frees it on the next command: ~10 ms at N=1000 that
        # would land on the first incremental step. A fresh context costs far less.
        self.close()
        # Old treatments as the kernel held them: a restart over an intact
        # table then flushes nothing. With no table at all, every flow of a
        # treated source was the node's (masqueraded) and must be re-tracked.
        before = old if old is not None else TableContent(exclude=desired.exclude)
        self._outdate(FlushPlan.between(before.view, desired.view))

    def _record_baseline(self, merge: bool = False) -> None:
        """Record the expressions of our rules as the kernel lists them (terse: no elements).

        ``merge`` (after an incremental change that added gateway slots) records
        only tags not yet known, so that a rule edited since the last full
        recreate is not accepted as the new normal.
        """
        try:
            document = self.nft.json(f"list table {QUALIFIED_TABLE}", terse=True)
        except NftError as error:
            log.warning("cannot read back table %s: %s", QUALIFIED_TABLE, error)
            if not merge:
                self._baseline = {}
            return
        listed = {
            comment: expression
            for rules in ActualTable.parse(document).rules.values()
            for comment, expression in rules
            if comment is not None
        }
        self._baseline = {**listed, **self._baseline} if merge else listed

    def _outdate(self, plan: FlushPlan) -> None:
        """Record that this call outdated the entries ``plan`` selects."""
        if plan:
            self._outdated = self._outdated.merged(plan) if self._outdated else plan

    def take_outdated_flows(self) -> FlushPlan | None:
        """The conntrack entries the last call outdated (see the module doc); taken, they
        are gone. A call that failed before its transaction outdated none."""
        plan, self._outdated = self._outdated, None
        return plan
