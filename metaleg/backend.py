"""The interface between a data-plane worker and the backend that renders kernel state.

Both the firewall worker and the routing worker drive a backend through this
protocol; the worker owns the loop (snapshots, periodic re-sync, reports), the
backend owns the kernel objects.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from metaleg.model import Action, Family, NodeDesiredState


class BackendError(RuntimeError):
    """Applying desired state failed; the message says which kernel object and why."""


class Backend(Protocol):
    """Renders a :class:`NodeDesiredState` into kernel state in the current network namespace."""

    name: str

    def apply(self, state: NodeDesiredState) -> None:
        """Bring the kernel to ``state``, changing only what differs from the last applied state.

        Called for every new state: complete, or built from the state before by a change
        (:func:`metaleg.state_changes.apply_change`), in which case every unchanged Service is the
        same object as in the state before, and comparing two states' Services position
        by position costs a pointer comparison for each unchanged one. Idempotent:
        applying the same state twice changes nothing the second time. Raises :class:`BackendError` on failure,
        leaving the previously applied state in place as far as possible.
        """

    def resync(self, state: NodeDesiredState) -> None:
        """Read the kernel's actual state, repair any difference from ``state`` and delete
        every stale object in metaleg's namespace of names (garbage collection).

        Called at start and every RECONCILIATION_INTERVAL.
        """

    def cleanup(self) -> None:
        """Remove every kernel object metaleg owns. Idempotent."""

    def close(self) -> None:
        """Release sockets and helper processes."""


class Drift(NamedTuple):
    """A change to metaleg's kernel objects that metaleg did not make."""

    kind: str
    """What drifted, the label of ``metaleg_drift_repairs_total``: ``nft_table``,
    ``nft_chain``, ``nft_set``, ``nft_element``, ``nft_rule``, ``iptables_chain``,
    ``iptables_jump``, ``ipset``, ``policy_rule``, ``route``."""
    detail: str
    """What was found, for the log and the status (one line)."""


class DriftDetector(Protocol):
    """Notices, between re-syncs, that someone else changed metaleg's kernel objects.

    The worker polls :meth:`fds` for readability (kernel notifications) and
    calls :meth:`check` when one is readable, every :attr:`check_interval`
    seconds (for kernel objects without notifications), and after each of its
    own applications (so that its own writes' notifications are consumed while
    the detector's idea of the desired state matches them). A drift found makes
    the worker run the backend's full :meth:`Backend.resync` at once.
    """

    check_interval: float | None
    """Seconds between periodic checks; None: notifications only."""

    def fds(self) -> list[int]:
        """File descriptors to poll for readability (opened on first call)."""

    def check(self) -> list[Drift]:
        """Consume pending notifications (never blocks) and return the foreign changes found."""

    def close(self) -> None:
        """Release the sockets."""


@runtime_checkable
class DriftDetecting(Protocol):
    """A backend that can watch its kernel objects for drift between re-syncs."""

    def drift_detector(self) -> DriftDetector | None:
        """The backend's detector (the same object every call), or None when it has none.

        Called in the worker's process and network namespace, before the first apply.
        """


@runtime_checkable
class UnfinishedWork(Protocol):
    """A backend whose call can succeed (the kernel holds the state) and still leave
    something to do that a later call retries (the firewall: deleting outdated conntrack
    entries, :mod:`metaleg.firewall.flows`)."""

    def unfinished_work(self) -> str:
        """What the last call left undone ('' when nothing): the worker reports it in the
        status (``Applied.unfinished``) and calls ``apply`` again, with back-off, until
        it is ''."""


class EgressCount(NamedTuple):
    """The kernel's packet and byte counts of one Service's traffic in one family that the
    firewall treated in one way, since the counting kernel object was created."""

    namespace: str
    name: str
    family: Family
    action: Action
    """``SNAT``: SNATed to the LB IP here (gateway); ``MARK``: marked and routed to the
    gateway node (forwarder); ``REJECT``: rejected, fail closed (no usable gateway)."""
    packets: int
    bytes: int


@runtime_checkable
class EgressCounting(Protocol):
    """A firewall backend that reads per-Service counters from the kernel's own counters."""

    def read_counts(self) -> list[EgressCount]:
        """The current counts of every labelled Service's treated traffic on this node.

        Cheap enough to call every few seconds at N = 1000 Services (one dump of the
        counting objects, no per-Service kernel request). A count may go back to a smaller
        value when its kernel object was recreated (a re-sync repair, a Service's rules
        re-rendered): the caller treats that as a reset, not as negative traffic.
        """
