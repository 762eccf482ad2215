"""The supervised worker processes: which there are, and what the supervisor knows of each."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from metaleg.forkserver import ForkedProcess
from metaleg.supervisor.status import CRASH_LOOP_CRASHES, CRASH_LOOP_WINDOW

WORKERS = {
    "watcher": "metaleg.watcher",
    "firewall": "metaleg.firewall",
    "routing": "metaleg.routing",
    "audit": "metaleg.audit",
}
DATAPLANE_WORKERS = ("firewall", "routing")
STATE_WORKERS = (*DATAPLANE_WORKERS, "audit")
"""The workers that hold the desired state (Hello, Snapshot, StateChange, Applied). The audit
process (``AUDIT_LOG=on``) gets it like the others but gates neither readiness nor health."""
RESTART_INITIAL = 0.5
"""The first restart comes within a second of the crash..."""
RESTART_MAX = 30.0
"""...later ones back off exponentially up to this..."""
RESTART_RESET_AFTER = 60.0
"""...until a worker has stayed up this long."""


@dataclass
class Worker:
    """A supervised worker process and what it reported."""

    name: str
    module: str
    process: ForkedProcess | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_delay: float = RESTART_INITIAL
    next_start: float = 0.0
    applied_generation: int = 0
    last_error: str = ""
    backend: str = ""
    crashes: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=10))
    working: bool = False
    """It reported success since its last start (applied a snapshot, or published a state)."""
    drift_repairs: int = 0
    """Drift repairs this data-plane worker reported (every process of it)."""
    last_drift: str = ""
    last_drift_at: float = 0.0
    """time.monotonic() when the last drift repair was reported."""
    unfinished: str = ""
    """What the data-plane worker's last application left to retry (``Applied.unfinished``)."""
    sent_generation: int = 0
    """The generation this data-plane worker holds once it has read what it was sent, so
    that a change from it is enough; 0: unknown, the next one is a complete snapshot."""
    owes_snapshot: bool = False
    """A frame for this data-plane worker could not be queued (its queue was full, or it
    was not connected): the complete current state goes to it as soon as it can take it."""
    reported_generation: int = 0
    """The generation its last ``Applied`` said it holds (applied or failed)."""
    last_sent_at: float = 0.0
    """time.monotonic() of the last frame queued for it."""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def crash_looping(self, now: float) -> bool:
        """Crashed often lately and has not done its job since: restarting the pod may help.

        A worker that was killed a few times but came back and works is not crash-looping.
        """
        recent = [t for t in self.crashes if now - t < CRASH_LOOP_WINDOW]
        return len(recent) >= CRASH_LOOP_CRASHES and not (self.running and self.working)
