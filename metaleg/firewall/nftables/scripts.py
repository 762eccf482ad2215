"""The nft scripts that write the table: each one transaction.

libnftables sends a script as one netlink batch and the kernel commits all or
nothing. :func:`full_script` recreates the whole table (``add table; delete
table; add table ...``), so packets see either the old or the new table, never
an empty one. :func:`diff_script` changes only elements and, when the gateway
slots in use change, adds the new slots' sets, flushes and rewrites ``fwmark``
(at most two rules per slot; no rule handles needed) and deletes the gone
slots' sets. A source whose packets count as another Service or action than
before is deleted from ``count<f>`` and added again in the same transaction, so
that its element's counter starts from 0. Only ``table inet metaleg`` is ever
touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from metaleg.firewall.nftables.content import TableContent
from metaleg.firewall.nftables.layout import (
    MARK_CHAIN,
    QUALIFIED_TABLE,
    expected_sets,
    mark_chain,
    set_order,
    slot_sets,
    table_chains,
)


def element_additions(name: str, items: Iterable[str]) -> list[str]:
    """The command adding ``items`` to set or map ``name``, sorted (none for no items)."""
    listed = sorted(items)
    return [f"add element {QUALIFIED_TABLE} {name} {{ {', '.join(listed)} }}"] if listed else []


def element_deletions(name: str, items: Iterable[str]) -> list[str]:
    """The command deleting ``items`` from set or map ``name``, sorted (none for no items)."""
    listed = sorted(items)
    return [f"delete element {QUALIFIED_TABLE} {name} {{ {', '.join(listed)} }}"] if listed else []


class SlotCommands(NamedTuple):
    """The commands of a transaction that adds and removes gateway slots, around its
    element changes."""

    before_elements: list[str]
    """The new slots' sets (elements are added to them)."""
    after_elements: list[str]
    """The chain ``fwmark`` rewritten, then the gone slots' sets deleted (a set can go only
    once no rule refers to it, and once its elements are gone)."""


def slot_change_commands(
    new: Iterable[int], gone: Iterable[int], fwmarks: Iterable[int], fwmask: int
) -> SlotCommands:
    """The commands that add slots ``new`` and remove slots ``gone`` (``fwmarks``: the
    slots after the transaction)."""
    new, gone = sorted(new), sorted(gone)
    if not new and not gone:
        return SlotCommands([], [])
    before = [spec.declaration(name) for name, spec in slot_sets(new).items()]
    chain = mark_chain(fwmarks, fwmask)
    after = [f"flush chain {QUALIFIED_TABLE} {MARK_CHAIN}", *chain.rule_commands()]
    after += [f"delete set {QUALIFIED_TABLE} {name}" for name in slot_sets(gone)]
    return SlotCommands(before, after)


def full_script(content: TableContent, fwmask: int, reject_with: str) -> str:
    """One transaction that replaces the whole table with ``content``.

    ``add table`` first makes ``delete table`` succeed whether or not the table
    exists; both run in the same batch as the new definition, so the kernel
    swaps old for new atomically.
    """
    fwmarks = content.fwmarks()
    commands = [
        f"add table {QUALIFIED_TABLE}",
        f"delete table {QUALIFIED_TABLE}",
        f"add table {QUALIFIED_TABLE}",
    ]
    commands += [spec.declaration(name) for name, spec in expected_sets(fwmarks).items()]
    sets, maps = content.element_sets(), content.element_maps()
    for name in set_order(fwmarks):
        if name in maps:
            commands += element_additions(name, (f"{k} : {v}" for k, v in maps[name].items()))
        else:
            commands += element_additions(name, sets[name])
    # Chains last (they reference the sets and maps above), jump targets first.
    for chain in table_chains(fwmask, reject_with, fwmarks):
        commands += [chain.declaration(), *chain.rule_commands()]
    return "\n".join(commands) + "\n"


def diff_script(old: TableContent, new: TableContent, fwmask: int) -> str:
    """One transaction that turns ``old`` into ``new`` (empty string: nothing to do).

    Order inside the batch: sets of new gateway slots, element deletions (removed
    keys and keys whose value changes; none from the sets of gone slots), element
    additions, then, if the slots changed, the chain ``fwmark`` rewritten and the
    gone slots' sets deleted. Element changes never make nf_tables validate the
    table, and a rewritten ``fwmark`` has it walk the rules only (no verdict map).
    """
    old_marks, new_marks = old.fwmarks(), new.fwmarks()
    before, after = slot_change_commands(
        new_marks - old_marks, old_marks - new_marks, new_marks, fwmask
    )
    commands = before
    old_sets, new_sets = old.element_sets(), new.element_sets()
    old_maps, new_maps = old.element_maps(), new.element_maps()
    rekeyed = old.rekeyed_counts(new)
    for name in set_order(old_marks & new_marks):
        if name in new_maps:
            was, now = old_maps[name], new_maps[name]
            commands += element_deletions(name, (k for k, v in was.items() if now.get(k) != v))
        else:
            gone = old_sets[name] - new_sets[name]
            commands += element_deletions(name, gone | rekeyed.get(name, set()))
    for name in set_order(new_marks):
        if name in new_maps:
            was, now = old_maps[name], new_maps[name]
            commands += element_additions(
                name, (f"{k} : {v}" for k, v in now.items() if was.get(k) != v)
            )
        else:
            added = new_sets[name] - old_sets.get(name, frozenset())
            commands += element_additions(name, added | rekeyed.get(name, set()))
    commands += after
    return "\n".join(commands) + "\n" if commands else ""
