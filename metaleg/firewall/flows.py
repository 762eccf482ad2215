"""Deleting the conntrack entries applied changes outdated: one policy for both backends.

Which entries a change outdates is :mod:`metaleg.firewall.conntrack`'s rule (a
:class:`~metaleg.firewall.conntrack.FlushPlan` per change). This module decides
who computes each change's plan, when it is carried out, and what happens when
that fails; :class:`~metaleg.firewall.selection.ManagedFirewall` wires it the
same way for every backend: after each ``apply``, ``resync`` and ``cleanup`` it
takes the call's plan from the backend's :class:`FlowScoping` and hands it to
its one :class:`OutdatedFlowDeleter`.

Who computes the plan:

- a backend that knows the kernel's state better than the states it was given
  scopes its changes itself (:class:`FlowScoping`; the nftables backend: each
  incremental step's plan, and on a recreate the table it found in the kernel,
  so that a restart over an intact table deletes nothing and a repaired table
  deletes the flows the damage let through);
- for the others, :class:`AppliedStateScoping` computes it from the applied
  state and the next one (the Services that changed,
  :class:`~metaleg.firewall.claims.SourceClaims`), and keeps the applied state in
  ``METALEG_RUN_DIR`` (:mod:`metaleg.firewall.applied_state`), so that a restarted
  worker deletes nothing it does not have to, while a fresh agent on a node
  where pods already send deletes their node-IP-masqueraded flows.

When: after the call returns, that is after the kernel took the whole change
(the nftables transaction; the iptables backend's last commit, make-before-break).
Flows whose entries still carry an old binding in between are dropped by the
backends' stale binding and egress checks, and the stray reply rules keep the
deletion from letting a peer's late answer open a reversed entry.

When it fails: the rules are in place, and stale flows are the lesser harm than
failing the apply (which would hold back readiness and the start-up gate for
rules that work). So the call succeeds; the failure is logged, counted
(``metaleg_errors_total{process="firewall",kind="conntrack"}``), kept as the
pending plan (merged with the next ones, :meth:`FlushPlan.merged`) and tried
again after every later call; :meth:`OutdatedFlowDeleter.failure` says so, and
the worker shows it in the status and calls ``apply`` again, with back-off, until
it is gone. Deleted entries are counted in ``metaleg_conntrack_entries_deleted_total``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from metaleg.firewall import conntrack
from metaleg.firewall.applied_state import AppliedStateFile
from metaleg.firewall.claims import SourceClaims
from metaleg.firewall.conntrack import EgressView, FlushPlan
from metaleg.metrics import CONNTRACK_FLUSHED, ERRORS
from metaleg.model import NodeDesiredState

log = logging.getLogger(__name__)


@runtime_checkable
class FlowScoping(Protocol):
    """Something that works out which conntrack entries the changes it made outdated."""

    def take_outdated_flows(self) -> FlushPlan | None:
        """The plan of the last ``apply``, ``resync`` or ``cleanup`` (None: nothing
        outdated, or the call failed before it changed the kernel); taken, it is gone."""


class OutdatedFlowDeleter:
    """Deletes the entries of each plan; a failed deletion stays pending and is retried
    with the next (see the module doc for the policy)."""

    def __init__(
        self, delete: Callable[[FlushPlan], int] = conntrack.delete_outdated_entries
    ) -> None:
        """``delete``: carries out a plan in the current namespace, returns how many
        entries went (a test puts a failing call in front of the real one)."""
        self._delete = delete
        self.pending: FlushPlan | None = None
        """What a failed deletion left (merged across failures), until one succeeds."""
        self._failure = ""

    def failure(self) -> str:
        """Why the pending deletion failed ('' when none is pending), for the status."""
        return self._failure

    def delete(self, plan: FlushPlan | None) -> int:
        """Delete the entries of ``plan`` and of the pending plan (None: the pending one
        only); return how many went. Never raises: a failure is logged and counted, and
        the plan stays pending."""
        if self.pending is not None:
            plan = self.pending.merged(plan) if plan is not None else self.pending
        if plan is None or not plan:
            self.pending, self._failure = None, ""
            return 0
        try:
            deleted = self._delete(plan)
        except Exception as error:  # the rules are in place: report, keep, retry
            self.pending = plan
            self._failure = f"deleting outdated conntrack entries failed (retried): {error}"
            ERRORS.labels("firewall", "conntrack").inc()
            log.error(
                "deleting outdated conntrack entries failed; retrying after the next change "
                "or re-sync: %s",
                error,
                extra={"sources": sum(len(s) for s in plan.sources.values())},
            )
            return 0
        if self._failure:
            log.info("deleted the outdated conntrack entries left by a failed deletion")
        self.pending, self._failure = None, ""
        CONNTRACK_FLUSHED.labels("firewall").inc(deleted)
        return deleted


class AppliedStateScoping:
    """The conntrack scoping of a backend that has none of its own (:class:`FlowScoping`),
    computed from the applied states (see the module doc)."""

    def __init__(self, state_file: AppliedStateFile | None) -> None:
        """``state_file``: where the applied state outlives the process (None: nowhere,
        a fresh instance then takes every treated source's flows as outdated)."""
        self.state_file = state_file
        self.applied = state_file.load() if state_file is not None else None
        """The last state applied (None: unknown, nothing installed as far as we know)."""
        self._claims: SourceClaims | None = None
        """Who claims which source in ``applied``, kept from the call that applied it, so
        that a change's plan costs what the change does."""
        self._outdated: FlushPlan | None = None

    def applied_state(self, state: NodeDesiredState) -> None:
        """``state`` is now applied: the plan from the one before, and ``state`` saved.

        Never raises: a plan that cannot be computed is logged and counted (the
        backend accepted ``state``, so its entries are valid; this is a bug).
        """
        if state is self.applied:
            return
        claims, self._claims = self._claims, None
        changes = None
        try:
            step = claims.step(state) if claims is not None else None
            if claims is not None and step is not None:
                claims.commit(step)
                plan, changes = step.flush, step.services
            else:
                plan = FlushPlan.between(EgressView.of(self.applied), EgressView.of(state))
                claims = SourceClaims.build(state)[0]
            self._claims = claims
            self._outdated = plan if plan else None
        except Exception as error:
            ERRORS.labels("firewall", "conntrack").inc()
            log.error("cannot tell which conntrack entries the change outdated: %s", error)
        self.applied = state
        if self.state_file is not None:
            self.state_file.save(state, changes)

    def cleaned_up(self) -> None:
        """Nothing is applied any more: every treated source's flows are outdated (they
        would keep a SNAT or a null binding the rules no longer give), and the saved
        state goes."""
        if self.applied is not None:
            old = EgressView.of(self.applied)
            plan = FlushPlan.between(old, EgressView(exclude=old.exclude))
            self._outdated = plan if plan else None
        self.applied, self._claims = None, None
        if self.state_file is not None:
            self.state_file.remove()

    def take_outdated_flows(self) -> FlushPlan | None:
        plan, self._outdated = self._outdated, None
        return plan
