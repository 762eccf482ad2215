"""Per-Service egress counts: the kernel's per-source counters, read and summed up.

Every treated source is an element of the set ``count<f>``, which has a counter
per element; the forward chain looks every treated packet up there once (see
:mod:`.layout`), so the rules stay the same whatever the number of Services. A
source whose Service, family or action (its :class:`~.content.CountKey`) changes
is deleted and added again, so that its counter starts from 0 for the new key.

Why not one named counter object per Service, family and action (an objref map
``source -> counter``, one dump of the objects to read)? libnftables (1.0.6)
fetches every object of every table into its cache for each transaction that
adds or deletes elements: ~1.3 us per object, so an incremental change at
N = 5000 dual-stack Services took 15 ms instead of 0.7 ms, and so would every
other program's nft transaction on the node. Per-element counters add nothing to
a transaction; their cost is here, in a read every few seconds, which grows with
the number of sources rather than Services (``bench/counters.py``).

Reading: one netlink dump of each family's set (``NFT_MSG_GETSETELEM``), decoded
here (not through libnftables, whose listing of 20,000 elements takes ~170 ms).
:class:`CountLedger` sums the sources per key and keeps each key's total from
going back while this process lives: what a source had counted when it left its
key (or when its counter was reset, by a table recreated in a repair) stays in
the key's total; only what it counted since the previous reading is lost.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Mapping

from metaleg.backend import EgressCount
from metaleg.firewall.nftables.content import CountKey
from metaleg.firewall.nftables.layout import SUFFIX, TABLE
from metaleg.firewall.wire.nfnetlink import (
    ATTR,
    NLA_TYPE_MASK,
    NLM_F_DUMP,
    NetfilterSocket,
    attr,
    message,
)
from metaleg.model import Family

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETSETELEM = 13
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_EXPR = 7
NFTA_SET_ELEM_EXPRESSIONS = 11
NFTA_DATA_VALUE = 1
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2

_ADDRESS_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_KEY_LENGTH = {Family.IPV4: 4, Family.IPV6: 16}
_U64 = struct.Struct("!Q")
_COUNTS = struct.Struct("!Q4xQ")
"""Bytes, the packets attribute's header, packets: the end of an element's counter."""
_COUNTER_HEADER = (
    ATTR.pack(44, NFTA_SET_ELEM_EXPR)
    + ATTR.pack(12, NFTA_EXPR_NAME)
    + b"counter\0"
    + ATTR.pack(28, NFTA_EXPR_DATA)
    + ATTR.pack(12, NFTA_COUNTER_BYTES)
)
"""How the kernel lays out an element's counter after its key (checked, then read at
fixed offsets; anything else is parsed attribute by attribute)."""


class CountReadError(OSError):
    """The kernel refused the dump of a count set (the errno, as an OSError)."""


Readings = dict[str, tuple[int, int]]
"""source -> (packets, bytes) as its element's counter holds them."""


def read_counted_sources(sock: NetfilterSocket, family: Family) -> Readings:
    """The counters of the elements of ``count<f>`` in ``table inet metaleg``; empty when
    the table or the set does not exist. Raises :class:`CountReadError` (or the
    socket's ``OSError``) when the kernel cannot be asked."""
    sequence = sock.next_sequence()
    request = message(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
        NLM_F_DUMP,
        sequence,
        NFPROTO_INET,
        attr(NFTA_SET_ELEM_LIST_TABLE, TABLE.encode() + b"\0")
        + attr(NFTA_SET_ELEM_LIST_SET, f"count{SUFFIX[family]}".encode() + b"\0"),
    )
    readings: Readings = {}
    try:
        for payload in sock.dump(request, sequence, lambda code: CountReadError(code, "dump")):
            _decode_elements(payload, family, readings)
    except CountReadError as error:
        if error.errno != errno.ENOENT:
            raise
    return readings


def _decode_elements(payload: bytes, family: Family, readings: Readings) -> None:
    """Add the elements of one ``NEWSETELEM`` message (after its nfgenmsg) to ``readings``."""
    unpack = ATTR.unpack_from
    key_length = _KEY_LENGTH[family]
    address_family = _ADDRESS_FAMILY[family]
    expected_length = 12 + key_length + 44
    header_at = 12 + key_length
    header_end = header_at + len(_COUNTER_HEADER)
    intern, ntop = sys.intern, socket.inet_ntop
    offset, end = 4, len(payload)
    while offset + 4 <= end:
        length, kind = unpack(payload, offset)
        if length < 4:
            return
        if kind & NLA_TYPE_MASK == NFTA_SET_ELEM_LIST_ELEMENTS:
            element, elements_end = offset + 4, min(offset + length, end)
            while element + 4 <= elements_end:
                element_length = unpack(payload, element)[0]
                if element_length < 4:
                    break
                if (
                    element_length == expected_length
                    and payload[element + header_at : element + header_end] == _COUNTER_HEADER
                ):
                    raw = payload[element + 12 : element + header_at]
                    bytes_, packets = _COUNTS.unpack_from(payload, element + header_end)
                else:
                    decoded = _element_counts(payload, element + 4, element + element_length)
                    if decoded is None:
                        element += (element_length + 3) & ~3
                        continue
                    raw, packets, bytes_ = decoded
                if len(raw) == key_length:
                    readings[intern(ntop(address_family, raw))] = (packets, bytes_)
                element += (element_length + 3) & ~3
        offset += (length + 3) & ~3


def _element_counts(payload: bytes, start: int, end: int) -> tuple[bytes, int, int] | None:
    """(key, packets, bytes) of one element's attributes, parsed one by one (None: no key)."""
    key: bytes | None = None
    packets = bytes_ = 0
    for kind, value_start, value_end in _attributes(payload, start, end):
        if kind == NFTA_SET_ELEM_KEY:
            for inner, inner_start, inner_end in _attributes(payload, value_start, value_end):
                if inner == NFTA_DATA_VALUE:
                    key = payload[inner_start:inner_end]
        elif kind in (NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_EXPRESSIONS):
            expressions = (
                [(value_start, value_end)]
                if kind == NFTA_SET_ELEM_EXPR
                else [(s, e) for _, s, e in _attributes(payload, value_start, value_end)]
            )
            for expression_start, expression_end in expressions:
                parts = {
                    k: (s, e) for k, s, e in _attributes(payload, expression_start, expression_end)
                }
                name = parts.get(NFTA_EXPR_NAME)
                data = parts.get(NFTA_EXPR_DATA)
                if name is None or data is None or payload[name[0] : name[1]] != b"counter\0":
                    continue
                for inner, inner_start, _ in _attributes(payload, *data):
                    if inner == NFTA_COUNTER_BYTES:
                        bytes_ = _U64.unpack_from(payload, inner_start)[0]
                    elif inner == NFTA_COUNTER_PACKETS:
                        packets = _U64.unpack_from(payload, inner_start)[0]
    return (key, packets, bytes_) if key is not None else None


def _attributes(payload: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of the attributes between ``start`` and ``end``."""
    found: list[tuple[int, int, int]] = []
    while start + 4 <= end:
        length, kind = ATTR.unpack_from(payload, start)
        if length < 4 or start + length > end:
            break
        found.append((kind & NLA_TYPE_MASK, start + 4, start + length))
        start += (length + 3) & ~3
    return found


class CountLedger:
    """Per-key totals from successive readings of the per-source counters, never going
    back while this process lives (the caller reports them as Prometheus counters).

    Keeps, per source that counted anything, its key and counts at the last reading;
    a source that left its key, or whose counter went back (its element was added
    again), has what it had counted then added to its old key's retired counts. A
    key no source counts as any more ends: its retired counts are dropped (a
    Service gone ends its series; should the key come back, it starts from 0).
    """

    def __init__(self) -> None:
        self._last: dict[Family, dict[str, tuple[CountKey, int, int]]] = {f: {} for f in Family}
        self._retired: dict[CountKey, tuple[int, int]] = {}

    def update(
        self,
        readings: Mapping[Family, Readings],
        counted: Mapping[Family, Mapping[str, CountKey]],
    ) -> list[EgressCount]:
        """The totals per key of the sources ``counted`` (source -> key, per family) after
        ``readings`` (what their elements hold now), sorted; every key counted is
        listed, with 0 when nothing was counted yet."""
        totals: dict[CountKey, list[int]] = {}
        retired = self._retired
        for family in Family:
            keys = counted.get(family, {})
            for counted_key in set(keys.values()):
                totals[counted_key] = list(retired.get(counted_key, (0, 0)))
            last, kept = self._last[family], {}
            for source, (packets, bytes_) in readings.get(family, {}).items():
                key = keys.get(source)
                if key is None:
                    continue  # not (or no longer) ours: if it had counted, it is retired below
                previous = last.pop(source, None)
                if previous is not None and (
                    previous[0] != key or packets < previous[1] or bytes_ < previous[2]
                ):
                    self._retire(previous, totals)
                total = totals[key]
                total[0] += packets
                total[1] += bytes_
                if packets or bytes_:
                    kept[source] = (key, packets, bytes_)
            for previous in last.values():
                self._retire(previous, totals)
            self._last[family] = kept
        for key in [key for key in retired if key not in totals]:
            del retired[key]
        return sorted(
            EgressCount(key.namespace, key.name, key.family, key.action, total[0], total[1])
            for key, total in totals.items()
        )

    def _retire(
        self, previous: tuple[CountKey, int, int], totals: dict[CountKey, list[int]]
    ) -> None:
        """Keep what a source had counted (at the last reading) in its old key's total."""
        key, packets, bytes_ = previous
        old = self._retired.get(key, (0, 0))
        self._retired[key] = (old[0] + packets, old[1] + bytes_)
        total = totals.get(key)
        if total is not None:
            total[0] += packets
            total[1] += bytes_
