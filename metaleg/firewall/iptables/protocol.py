"""The messages between the iptables backend and its helper processes.

The backend sends a :class:`SyncRequest` ("make these tables look like this")
over a socket pair, msgpack-encoded; the helper
(:mod:`metaleg.firewall.iptables.helper`) answers with a :class:`SyncReply`.
The helper decodes requests as :class:`ReceivedRequest`, which keeps chains'
rules encoded until it needs them.
"""

from __future__ import annotations

import enum

import msgspec

from metaleg.firewall.iptables.rules import Rule, TableSpec


class Mode(enum.StrEnum):
    """How a table is brought towards its :class:`TableSpec`."""

    KEEP_OLD = "keep-old"
    """Add what is missing, keep metaleg rules that are no longer wanted (make-before-break).

    Kept rules stay where they are among the wanted ones (a rule replaced by
    another follows its replacement), so that a chain ending in a catch-all
    (the transit guard's REJECT) keeps its old exceptions in front of it."""
    EXACT = "exact"
    """Make metaleg's part of the table exactly as described."""


class SyncRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Bring ``tables`` to their specs; with ``collect_garbage`` (EXACT only) also delete
    ``METALEG-*`` chains the specs do not name, and clean every other existing table."""

    tables: tuple[TableSpec, ...]
    mode: Mode = Mode.EXACT
    collect_garbage: bool = False
    set_generation: int = -1
    """Changes whenever ipsets may have been destroyed since the previous request (the
    backend's count of such events; -1: unknown). While it stays the same, the helper
    trusts the set indexes it checked before (see :mod:`metaleg.firewall.iptables.codec`)."""


class ReceivedTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A :class:`TableSpec` as the helper decodes it: the chains' rules stay encoded.

    A chain is sent whole with every change of it (one rule per SNAT Service)
    although few rules change, and decoding every rule into structs was the helper's
    largest cost per rule. The helper keeps what it made of each rule's bytes
    (:meth:`~metaleg.firewall.iptables.helper.XtablesServer._build_entries`)."""

    name: str
    chains: dict[str, tuple[msgspec.Raw, ...]] = {}
    heads: dict[str, tuple[Rule, ...]] = {}


class ReceivedRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A :class:`SyncRequest` as the helper decodes it (tables as :class:`ReceivedTable`)."""

    tables: tuple[ReceivedTable, ...]
    mode: Mode = Mode.EXACT
    collect_garbage: bool = False
    set_generation: int = -1


class TableResult(msgspec.Struct, frozen=True):
    """What happened to one table: committed at all, and whether it now equals its spec."""

    name: str
    committed: bool
    exact: bool


class SyncReply(msgspec.Struct, frozen=True):
    """The helper's answer; ``error`` is empty on success and names the failing object."""

    results: tuple[TableResult, ...] = ()
    error: str = ""
