"""Which firewall backend runs, and what it does besides rendering rules.

FIREWALL_BACKEND ``auto`` (the default) looks at the node's iptables rules, as
kube-proxy and iptables-wrapper do (:mod:`metaleg.firewall.detect`): rules
written in the legacy tables do not stop a masquerade that lives in nft
tables, so metaleg must act in the mode the node's other components use.
``iptables`` and ``nftables`` force a backend.

:class:`ManagedFirewall` wraps the chosen backend with two duties that do not
depend on how rules are rendered:

- after the first successful full re-sync it removes the *other* backend's
  leftovers (a backend switch, or an upgrade from the Go original, which used
  the same legacy chain names) — only then, so there is never a moment with
  neither backend's rules in place;
- after each call, it deletes the conntrack entries the call outdated (an
  existing flow keeps its NAT binding and would bypass new rules), the same way
  for every backend (:mod:`metaleg.firewall.flows`): the plan comes from the
  backend when it scopes its own changes (nftables), else from the applied
  states (iptables; the last one kept in METALEG_RUN_DIR); one deleter carries
  it out, keeps a failed deletion and retries it after the next call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from metaleg.backend import (
    Backend,
    BackendError,
    DriftDetecting,
    DriftDetector,
    EgressCount,
    EgressCounting,
)
from metaleg.config import Config
from metaleg.firewall.applied_state import AppliedStateFile
from metaleg.firewall.detect import choose_for_node
from metaleg.firewall.flows import AppliedStateScoping, FlowScoping, OutdatedFlowDeleter
from metaleg.metrics import ERRORS
from metaleg.model import NodeDesiredState
from metaleg.node_events import post_node_event

log = logging.getLogger(__name__)

APPLIED_STATE_FILE = "firewall-applied.msgpack"


def choose_backend(configured: str) -> tuple[str, str]:
    """(backend, why): the configured one, or the detected one for ``auto``, if this kernel
    can run it (:func:`metaleg.firewall.detect.choose_for_node`); ``none`` when none can."""
    choice = choose_for_node(configured)
    return choice.backend or UNUSABLE, choice.reason


UNUSABLE = "none"


class UnusableBackend:
    """Stands in when no backend can run on this node: every apply fails with the reason,
    so the worker reports it (``last_error``, not ready) and retries with back-off,
    touching nothing. Loading the missing module and restarting the pod fixes it."""

    name = UNUSABLE

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def apply(self, state: NodeDesiredState) -> None:
        raise BackendError(self.reason)

    def resync(self, state: NodeDesiredState) -> None:
        raise BackendError(self.reason)

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        pass


def new_backend(name: str, reason: str = "") -> Backend:
    if name == UNUSABLE:
        return UnusableBackend(reason)
    if name == "iptables":
        from metaleg.firewall.iptables.backend import IptablesBackend

        return IptablesBackend()
    if name == "nftables":
        from metaleg.firewall.nftables.backend import NftablesBackend

        return NftablesBackend()
    raise ValueError(f"unknown firewall backend {name!r}")


class ManagedFirewall:
    """The chosen backend plus leftover cleanup and conntrack scoping (see the module doc)."""

    def __init__(
        self,
        backend: Backend,
        other: str | None,
        run_dir: str | None,
        deleter: OutdatedFlowDeleter | None = None,
    ) -> None:
        """``other``: the backend whose leftovers go after the first re-sync; ``run_dir``:
        where the applied state is kept for a backend that does not scope its own changes
        (None: nowhere); ``deleter``: carries out the plans (a test's, to make one fail)."""
        self.backend = backend
        self.name = backend.name
        self.other = other
        self.deleter = deleter if deleter is not None else OutdatedFlowDeleter()
        state_file = (
            AppliedStateFile(os.path.join(run_dir, APPLIED_STATE_FILE)) if run_dir else None
        )
        self.state_scoping: AppliedStateScoping | None = None
        """The plans from the applied states, for a backend without :class:`FlowScoping`."""
        self.scoping: FlowScoping
        if isinstance(backend, FlowScoping):
            self.scoping = backend
            if state_file is not None:
                state_file.remove()  # another backend's, outdated by this one's changes
        else:
            self.scoping = self.state_scoping = AppliedStateScoping(state_file)

    def apply(self, state: NodeDesiredState) -> None:
        applied = None
        try:
            self.backend.apply(state)
            applied = state
        finally:
            self._delete_outdated_flows(applied)

    def resync(self, state: NodeDesiredState) -> None:
        applied = None
        try:
            self.backend.resync(state)
            applied = state
        finally:
            self._delete_outdated_flows(applied)
        if self.other is not None:
            self._remove_leftovers(self.other)
            self.other = None

    def cleanup(self) -> None:
        cleaned = False
        try:
            self.backend.cleanup()
            cleaned = True
        finally:
            if cleaned and self.state_scoping is not None:
                self.state_scoping.cleaned_up()
            self.deleter.delete(self.scoping.take_outdated_flows())

    def close(self) -> None:
        self.backend.close()

    def unfinished_work(self) -> str:
        """A failed deletion of outdated conntrack entries, pending its retry ('' when
        none; see :class:`metaleg.backend.UnfinishedWork`)."""
        return self.deleter.failure()

    def drift_detector(self) -> DriftDetector | None:
        """The chosen backend's drift detector, if it has one."""
        if isinstance(self.backend, DriftDetecting):
            return self.backend.drift_detector()
        return None

    def read_counts(self) -> list[EgressCount]:
        """The chosen backend's per-Service counters (none when it cannot count)."""
        if isinstance(self.backend, EgressCounting):
            return self.backend.read_counts()
        return []

    def _delete_outdated_flows(self, applied: NodeDesiredState | None) -> None:
        """After a call to the backend: delete the entries it outdated, and those a failed
        deletion left. ``applied``: the state the call applied (None: the call failed)."""
        if applied is not None and self.state_scoping is not None:
            self.state_scoping.applied_state(applied)
        self.deleter.delete(self.scoping.take_outdated_flows())

    def _remove_leftovers(self, name: str) -> None:
        other = new_backend(name)
        try:
            other.cleanup()
            log.info("removed leftovers of the %s backend (if any)", name, extra={"backend": name})
        except Exception as error:
            ERRORS.labels("firewall", "cleanup").inc()
            log.warning("could not remove leftovers of the %s backend: %s", name, error)
        finally:
            if isinstance(other, FlowScoping):  # flows its rules bound, if it knows them
                self.deleter.delete(other.take_outdated_flows())
            other.close()


def build_firewall(
    config: Config, choose: Callable[[str], tuple[str, str]] = choose_backend
) -> ManagedFirewall:
    """The firewall worker's backend, chosen and logged once at start (``choose``: a test
    injects the choice, e.g. that none can run)."""
    name, why = choose(config.firewall_backend)
    if name == UNUSABLE:
        log.error("no firewall backend can run on this node: %s", why, extra={"backend": name})
        return ManagedFirewall(new_backend(name, why), None, config.run_dir)
    log.info("using the %s firewall backend: %s", name, why, extra={"backend": name})
    other = "nftables" if name == "iptables" else "iptables"
    return ManagedFirewall(new_backend(name), other, config.run_dir)


NO_BACKEND_EVENT_REASON = "NoFirewallBackend"


def report_unusable(config: Config, firewall: ManagedFirewall) -> None:
    """When no backend can run here, say so on the Node too (a Warning Event, posted once
    at the worker's start): status and readiness show it on the node, the Event shows it
    to whoever looks at the cluster."""
    if not isinstance(firewall.backend, UnusableBackend):
        return
    message = f"metaleg cannot program egress on this node: {firewall.backend.reason}"
    failure = post_node_event(config, NO_BACKEND_EVENT_REASON, message)
    if failure:
        log.warning("could not post the Event about the missing firewall backend: %s", failure)
