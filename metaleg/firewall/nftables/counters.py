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
here a run of records at a time (not through libnftables, whose listing of 20,000
elements takes ~170 ms); at N = 1000 Services of 10 dual-stack pods, ~12 ms in the
kernel, ~5 ms decoding, ~9 ms summing. :class:`CountLedger` sums the sources per
key and keeps each key's total from going back while this process lives: the
backend tells it which sources' elements went or were added again (a source
removed or moved to another key, a table recreated in a repair), and what they
had counted at the previous reading stays in their old key's total; only what
they counted since is lost.
"""

from __future__ import annotations

import errno
import functools
import operator
import socket
import struct
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

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
_COUNTER_HEADER = (
    ATTR.pack(44, NFTA_SET_ELEM_EXPR)
    + ATTR.pack(12, NFTA_EXPR_NAME)
    + b"counter\0"
    + ATTR.pack(28, NFTA_EXPR_DATA)
    + ATTR.pack(12, NFTA_COUNTER_BYTES)
)
"""How the kernel lays out an element's counter after its key, up to the bytes."""
_PACKETS_HEADER = ATTR.pack(12, NFTA_COUNTER_PACKETS)
NFTA_LIST_ELEM = 1
_RECORD_PREFIX = {
    family: ATTR.pack(12 + length + 44, NFTA_LIST_ELEM)
    + ATTR.pack(8 + length, NFTA_SET_ELEM_KEY)
    + ATTR.pack(4 + length, NFTA_DATA_VALUE)
    for family, length in _KEY_LENGTH.items()
}
"""An element's attribute headers up to its key (the key's length: the family's)."""
_RAW = operator.itemgetter(0)
_COUNTS = operator.itemgetter(2, 1)
"""(packets, bytes) of an unpacked record (key, bytes, packets)."""
_RECORD = {family: struct.Struct(f"!12x{length}s24xQ4xQ") for family, length in _KEY_LENGTH.items()}
"""One element as the kernel lays it out: headers, key, the counter's headers, bytes, the
packets attribute's header, packets (big-endian); the headers are skipped here, and
checked by counting them in the run of records."""


class CountReadError(OSError):
    """The kernel refused the dump of a count set (the errno, as an OSError)."""


Readings = dict[bytes, tuple[int, int]]
"""source (its address, packed) -> (packets, bytes) as its element's counter holds them."""


def packed(source: str, family: Family) -> bytes:
    """A source's address as a reading's key (``inet_pton``)."""
    return socket.inet_pton(_ADDRESS_FAMILY[family], source)


def source_texts(readings: Readings, family: Family) -> set[str]:
    """The sources of a reading in canonical text (``inet_ntop``)."""
    ntop = functools.partial(socket.inet_ntop, _ADDRESS_FAMILY[family])
    return set(map(ntop, readings))


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
    """Add the elements of one ``NEWSETELEM`` message (after its nfgenmsg) to ``readings``.

    The kernel lays every element of a set with counters out alike; a run of such
    records is unpacked at once (``struct.iter_unpack``), checked, and anything else
    parsed attribute by attribute.
    """
    record, prefix = _RECORD[family], _RECORD_PREFIX[family]
    view = memoryview(payload)
    for kind, start, end in _attributes(payload, 4, len(payload)):
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
            continue
        elements, rest = divmod(end - start, record.size)
        # Records of the kernel's layout (each holds its headers once: counted in C),
        # unpacked at once: no attribute-by-attribute walk over thousands of elements.
        if (
            not rest
            and payload.count(prefix, start, end) == elements
            and payload.count(_COUNTER_HEADER, start, end) == elements
        ):
            records = list(record.iter_unpack(view[start:end]))
            readings.update(zip(map(_RAW, records), map(_COUNTS, records), strict=True))
            continue
        key_length = _KEY_LENGTH[family]
        for _, element_start, element_end in _attributes(payload, start, end):
            decoded = _element_counts(payload, element_start, element_end)
            if decoded is not None and len(decoded[0]) == key_length:
                readings[decoded[0]] = decoded[1:]


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

    Keeps the last reading (source -> counts) and the key each source counted as
    then. The backend tells it which sources' elements went or were added again
    (:meth:`restarted`: a source removed or moved to another key; :meth:`restarted_all`:
    the table recreated): what they had counted at the last reading is added to
    their old key's retired counts, and only what they counted since is lost. A
    total that would still go back (an element deleted by someone else) stays where
    it was. A key no source counts as any more ends: its retired counts are dropped
    (a Service gone ends its series; should the key come back, it starts from 0).

    The sums: the sources of each key, grouped again only when the counted sources
    change (``version``), are looked up in a reading with one ``itemgetter`` per key.
    """

    def __init__(self) -> None:
        self._readings: dict[Family, Readings] = {f: {} for f in Family}
        self._keys: dict[Family, dict[bytes, CountKey]] = {f: {} for f in Family}
        """Per family, each counted source (packed) -> its key, as of the last reading."""
        self._restarted: dict[Family, set[bytes]] = {f: set() for f in Family}
        self._retired: dict[CountKey, tuple[int, int]] = {}
        self._reported: dict[CountKey, tuple[int, int]] = {}
        self._version: object = None
        self._groups: dict[
            Family, list[tuple[CountKey, Callable[[Readings], Any], list[bytes]]]
        ] = {}

    def restarted(self, sources: Mapping[Family, AbstractSet[str]]) -> None:
        """The elements of ``sources`` went, or were added again from 0, since the last
        reading."""
        for family, restarted in sources.items():
            self._restarted[family].update(packed(source, family) for source in restarted)

    def restarted_all(self) -> None:
        """Every element was added again from 0 since the last reading."""
        for family in Family:
            self._restarted[family] = set(self._readings[family])

    def update(
        self,
        readings: Mapping[Family, Readings],
        counted: Mapping[Family, Mapping[str, CountKey]],
        version: object = None,
    ) -> list[EgressCount]:
        """The totals per key of the sources ``counted`` (source -> key, per family) after
        ``readings`` (what their elements hold now), sorted; every key counted is
        listed, with 0 when nothing was counted yet; IPv4 first, then IPv6, each
        sorted by key. ``version`` changes whenever ``counted`` does (None: assume it
        did)."""
        retired = self._retired
        for family in Family:
            last, last_keys = self._readings[family], self._keys[family]
            for source in self._restarted[family]:
                had, key = last.get(source), last_keys.get(source)
                if had is not None and key is not None:
                    old = retired.get(key, (0, 0))
                    retired[key] = (old[0] + had[0], old[1] + had[1])
            self._restarted[family] = set()
        if version is None or version != self._version:
            self._group(counted)
            self._version = version
        counts: list[EgressCount] = []
        reported_now: dict[CountKey, tuple[int, int]] = {}
        for family in Family:
            now = readings.get(family) or {}
            for key, lookup, sources in self._groups[family]:
                try:
                    found = lookup(now)
                except KeyError:  # an element the kernel lacks: the others' counts
                    found = tuple(counts for counts in map(now.get, sources) if counts)
                base = retired.get(key, _ZERO)
                packets, bytes_ = map(sum, zip(base, *found, strict=True))
                reported = self._reported.get(key)
                if reported is not None and (packets < reported[0] or bytes_ < reported[1]):
                    # Gone back without a restart we were told of: stay where we were.
                    lost = (max(0, reported[0] - packets), max(0, reported[1] - bytes_))
                    retired[key] = (base[0] + lost[0], base[1] + lost[1])
                    packets, bytes_ = packets + lost[0], bytes_ + lost[1]
                reported_now[key] = (packets, bytes_)
                counts.append(
                    EgressCount(key.namespace, key.name, key.family, key.action, packets, bytes_)
                )
            self._readings[family] = now  # the caller's reading: kept, not copied
        self._reported = reported_now
        for key in [key for key in retired if key not in reported_now]:
            del retired[key]
        return counts  # in order: IPv4 then IPv6, each sorted by key

    def _group(self, counted: Mapping[Family, Mapping[str, CountKey]]) -> None:
        """Group the counted sources by key again (and remember each source's key)."""
        for family in Family:
            pton = functools.partial(socket.inet_pton, _ADDRESS_FAMILY[family])
            family_counted = counted.get(family, {})
            keys = dict(zip(map(pton, family_counted), family_counted.values(), strict=True))
            by_key: dict[CountKey, list[bytes]] = {}
            for source, key in keys.items():
                by_key.setdefault(key, []).append(source)
            self._groups[family] = [
                (key, _tuple_getter(sources), sources) for key, sources in sorted(by_key.items())
            ]
            self._keys[family] = keys


_ZERO = (0, 0)


def _tuple_getter(sources: list[bytes]) -> Callable[[Readings], Any]:
    """A function of a reading giving the counts of ``sources``, as a tuple."""
    getter = operator.itemgetter(*sources)
    if len(sources) == 1:
        return lambda reading: (getter(reading),)
    return getter
