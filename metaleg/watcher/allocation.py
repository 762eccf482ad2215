"""Allocation of firewall-mark slots (and so routing tables) to gateway nodes.

A slot ``s`` in ``1..capacity`` gives the mark ``s << shift(FIREWALL_MASK)`` and
the table ``ROUTE_TABLE_ID_OFFSET + s``; slot 0 (mark 0) is never used. The
watcher allocates and ships the result inside every snapshot, so the firewall
and routing workers always agree without talking to each other.

Stability matters more than compactness: a node that changes slot briefly has
its forwarded traffic steered by a new mark, so an allocation is *sticky* (a
node keeps its slot while it is a gateway), and a new node prefers a slot
derived from a hash of its name, so that a restarted watcher without its saved
allocation usually arrives at the same slots.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping


def preferred_slot(node: str, capacity: int) -> int:
    """The slot a node gets when it is free: a stable hash of its name (CRC-32, not ``hash()``)."""
    return zlib.crc32(node.encode()) % capacity + 1


def allocate_slots(
    gateway_nodes: Iterable[str], previous: Mapping[str, int], capacity: int
) -> dict[str, int]:
    """Assign each gateway node a slot in ``1..capacity``.

    Nodes in ``previous`` with a valid slot keep it; the others, in name order,
    take their preferred slot when free, else the lowest free slot. Nodes left
    over when every slot is taken get none (their Services are rejected, fail
    closed). A pure function: same inputs, same result.
    """
    wanted = sorted(set(gateway_nodes))
    allocation: dict[str, int] = {}
    taken: set[int] = set()
    for node in wanted:
        slot = previous.get(node)
        if slot is not None and 1 <= slot <= capacity and slot not in taken:
            allocation[node] = slot
            taken.add(slot)
    for node in wanted:
        if node in allocation or len(taken) >= capacity:
            continue
        slot = preferred_slot(node, capacity)
        if slot in taken:
            slot = 1  # the lowest free slot; at most len(taken) steps, whatever the capacity
            while slot in taken:
                slot += 1
        allocation[node] = slot
        taken.add(slot)
    return allocation
