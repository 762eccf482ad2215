"""The difference between two rule sequences as edit operations, linear for the usual change.

The helper rewrites a chain by applying the operations from the kernel's rules
to the desired ones, so that unchanged rules stay in place with their counters.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

Opcode = tuple[str, int, int, int, int]


def opcodes(old: Sequence[Any], new: Sequence[Any]) -> list[Opcode]:
    """``difflib.SequenceMatcher(None, old, new).get_opcodes()``, but linear for the usual
    change: the common head and tail are matched first, and a middle whose elements are
    unique on both sides and keep their order (rules only inserted or deleted, as a
    change of Services does) is walked once; difflib sees only what is left."""
    end = min(len(old), len(new))
    head = 0
    while head < end and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < end - head and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    result: list[Opcode] = []
    if head:
        result.append(("equal", 0, head, 0, head))
    middle_old = old[head : len(old) - tail]
    middle_new = new[head : len(new) - tail]
    if middle_old or middle_new:
        walked = _insertions_and_deletions(middle_old, middle_new)
        middle: list[Opcode] = (
            walked
            if walked is not None
            else list(
                difflib.SequenceMatcher(None, middle_old, middle_new, autojunk=False).get_opcodes()
            )
        )
        for tag, i1, i2, j1, j2 in middle:
            result.append((tag, i1 + head, i2 + head, j1 + head, j2 + head))
    if tail:
        result.append(("equal", len(old) - tail, len(old), len(new) - tail, len(new)))
    return result


def _insertions_and_deletions(old: Sequence[Any], new: Sequence[Any]) -> list[Opcode] | None:
    """The opcodes from ``old`` to ``new`` in one walk, when both hold unique elements and
    the common ones are in the same order; None otherwise (a move: difflib decides)."""
    old_set, new_set = set(old), set(new)
    if len(old_set) != len(old) or len(new_set) != len(new):
        return None
    result: list[Opcode] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and j < len(new) and old[i] == new[j]:
            start_i, start_j = i, j
            while i < len(old) and j < len(new) and old[i] == new[j]:
                i, j = i + 1, j + 1
            result.append(("equal", start_i, i, start_j, j))
            continue
        start_i, start_j = i, j
        while i < len(old) and old[i] not in new_set:
            i += 1
        while j < len(new) and new[j] not in old_set:
            j += 1
        if i == start_i and j == start_j:
            return None  # both are common, yet different: the order changed
        if i > start_i and j > start_j:
            result.append(("replace", start_i, i, start_j, j))
        elif i > start_i:
            result.append(("delete", start_i, i, start_j, j))
        else:
            result.append(("insert", start_i, i, start_j, j))
    return result
