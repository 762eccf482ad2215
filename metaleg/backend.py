"""The interface between a data-plane worker and the backend that renders kernel state.

Both the firewall worker and the routing worker drive a backend through this
protocol; the worker owns the loop (snapshots, periodic re-sync, reports), the
backend owns the kernel objects.
"""

from __future__ import annotations

from typing import Protocol

from metaleg.model import NodeDesiredState


class BackendError(RuntimeError):
    """Applying desired state failed; the message says which kernel object and why."""


class Backend(Protocol):
    """Renders a :class:`NodeDesiredState` into kernel state in the current network namespace."""

    name: str

    def apply(self, state: NodeDesiredState) -> None:
        """Bring the kernel to ``state``, changing only what differs from the last applied state.

        Called for every new state: complete, or built from the state before by a change
        (:func:`metaleg.ipc.apply_change`), in which case every unchanged Service is the
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
