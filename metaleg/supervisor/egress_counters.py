"""Per-Service egress counters: the firewall's kernel counter readings made Prometheus counters.

The firewall worker reads the kernel's counters of each labelled Service's
treated traffic (:meth:`metaleg.backend.EgressCounting.read_counts`) every
:data:`metaleg.worker.COUNT_INTERVAL` seconds and sends them when they changed
(:class:`metaleg.ipc.EgressCounts`). Kernel counters are not Prometheus
counters: they start again at 0 when their kernel object is recreated (a
re-sync repair, a Service re-rendered, a backend switch) and vanish with the
Service. :class:`EgressCounterTotals` turns the readings into totals that only
grow for as long as the supervisor runs: a reading smaller than the one before
is a reset, and what it shows is added as new traffic. A Service that is no
longer in a reading loses its series (Prometheus sees the series end; if the
Service comes back, a new series starts).

``action`` in the exported series is what an operator asks about: ``snat``
(SNATed to the LB IP on this node, the gateway), ``forward`` (marked and routed
to the gateway node), ``reject`` (fail closed: no usable gateway).
"""

from __future__ import annotations

from collections.abc import Iterable

from metaleg.backend import EgressCount
from metaleg.model import Action, Family

ACTION_LABELS = {Action.SNAT: "snat", Action.MARK: "forward", Action.REJECT: "reject"}
"""The ``action`` label of each firewall action."""

CounterKey = tuple[str, str, Family, Action]
"""(namespace, Service name, family, action)."""


class EgressTotals:
    """Packets and bytes of one key since the supervisor first saw it."""

    __slots__ = ("bytes", "packets")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0


class EgressCounterTotals:
    """Monotonic totals per (Service, family, action) from successive kernel readings."""

    def __init__(self) -> None:
        self._last: dict[CounterKey, tuple[int, int]] = {}
        self._totals: dict[CounterKey, EgressTotals] = {}

    def update(self, counts: Iterable[EgressCount]) -> None:
        """Take one complete reading: every key it holds grows by its traffic since the
        reading before (all of it, the first time and after a reset); keys it does not
        hold are dropped."""
        last: dict[CounterKey, tuple[int, int]] = {}
        totals: dict[CounterKey, EgressTotals] = {}
        for count in counts:
            if count.packets < 0 or count.bytes < 0:
                continue  # not a counter reading; never let a total go down
            key = (count.namespace, count.name, count.family, count.action)
            before = self._last.get(key)
            total = self._totals.get(key) or EgressTotals()
            if before is None or count.packets < before[0] or count.bytes < before[1]:
                total.packets += count.packets
                total.bytes += count.bytes
            else:
                total.packets += count.packets - before[0]
                total.bytes += count.bytes - before[1]
            last[key] = (count.packets, count.bytes)
            totals[key] = total
        self._last, self._totals = last, totals

    def totals(self) -> dict[CounterKey, tuple[int, int]]:
        """(packets, bytes) per key, for the metrics endpoint and status."""
        return {key: (total.packets, total.bytes) for key, total in self._totals.items()}

    def per_service(self) -> dict[tuple[str, str], dict[str, tuple[int, int]]]:
        """(namespace, name) -> action label -> (packets, bytes), both families together."""
        services: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
        for (namespace, name, _, action), total in self._totals.items():
            actions = services.setdefault((namespace, name), {})
            label = ACTION_LABELS[action]
            packets, size = actions.get(label, (0, 0))
            actions[label] = (packets + total.packets, size + total.bytes)
        return services
