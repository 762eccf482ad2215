"""Decoding the members of an ipset listing fast: one ``struct`` pass per message.

The kernel lists a set's members as ``IPSET_ATTR_ADT { DATA { IP { IPADDR }, ... },
DATA { ... }, ... }``, every member of a set with the same attributes in the same
order (``hash:ip counters``: ``IP, BYTES, PACKETS``; ``hash:ip,port``: ``IP, PORT,
PROTO``). Walking the attributes of each member costs ~5 us of Python; the members
that metaleg reads by the tens of thousands (counters at every scrape) or millions
(a ``tcp/8000-8100`` policy's ports at a re-sync) are decoded instead by
:class:`MemberDecoder`: the first member's layout is learnt by a walk, every
member's attribute headers are compared with the first one's byte by byte over the
whole message (one strided slice per header byte, in C), and the wanted values are
unpacked in one ``struct.iter_unpack`` that skips the rest. A message that does not
fit (members of different layouts, padding) is walked member by member.

The attribute numbers inside ``DATA`` are the kernel's
(``include/uapi/linux/netfilter/ipset/ip_set.h``); :mod:`metaleg.firewall.wire.ipset`
uses them from here.
"""

from __future__ import annotations

import struct
from typing import Any

from metaleg.firewall.wire.nfnetlink import ATTR, parse_attributes

ATTR_DATA = 7
"""A member (inside ``IPSET_ATTR_ADT``) or a set's header data."""
# inside IPSET_ATTR_DATA
ATTR_IP = 1
ATTR_PORT = 4
ATTR_PROTO = 7
ATTR_BYTES = 24
ATTR_PACKETS = 25
ATTR_IPADDR_IPV4 = 1
ATTR_IPADDR_IPV6 = 2

_TYPE_MASK = 0x3FFF
_VALUES = {
    ATTR_BYTES: ("bytes", 8, "Q"),
    ATTR_PACKETS: ("packets", 8, "Q"),
    ATTR_PORT: ("port", 2, "H"),
    ATTR_PROTO: ("proto", 1, "B"),
}
"""Attribute -> (field, width, struct code) of the fixed-size values a decoder can take."""
FIELDS = ("address", "bytes", "packets", "port", "proto")

Span = tuple[int, int, str]
"""(start, end, what) within a member: ``header``, ``skip`` or a field of :data:`FIELDS`."""
_Layout = tuple[struct.Struct, tuple[tuple[int, int], ...], tuple[int, ...] | None]
"""A member layout: its struct (the fields it holds, in the member's order), its header bytes
as (offset, value), and how to reorder the unpacked values into the wanted order (None: as
they are)."""


class MemberDecoder:
    """Decodes members into tuples of the ``fields`` wanted (in that order): the packed
    ``address``, ``bytes``, ``packets``, ``port``, ``proto`` (an integer each)."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown member fields: {sorted(unknown)}")
        self.fields = fields
        self._layouts: dict[bytes, _Layout | None] = {}

    def decode(self, adt: bytes) -> list[tuple[Any, ...]]:
        """The members of one message's ``IPSET_ATTR_ADT`` payload; a member without one of
        the wanted fields is left out."""
        if len(adt) < ATTR.size:
            return []
        size = ATTR.unpack_from(adt)[0]
        layout = self._layout(adt[:size]) if size else None
        if layout is not None and len(adt) % size == 0:
            packer, headers, order = layout
            count = len(adt) // size
            if all(adt[offset::size] == bytes((value,)) * count for offset, value in headers):
                if order is None:
                    return list(packer.iter_unpack(adt))
                return [tuple(values[i] for i in order) for values in packer.iter_unpack(adt)]
        walked = (
            self._walk(element) for kind, element in parse_attributes(adt) if kind == ATTR_DATA
        )
        return [member for member in walked if member is not None]

    def fast_layouts(self) -> int:
        """How many member layouts this decoder unpacks in one pass (for tests)."""
        return sum(layout is not None for layout in self._layouts.values())

    def _layout(self, element: bytes) -> _Layout | None:
        spans = _spans(element)
        if spans is None:
            return None
        signature = b"".join(element[start:end] for start, end, what in spans if what == "header")
        if signature not in self._layouts:
            layout = self._compile(element, spans)
            if len(self._layouts) >= 64:
                return layout
            self._layouts[signature] = layout
        return self._layouts[signature]

    def _compile(self, element: bytes, spans: list[Span]) -> _Layout | None:
        codes: list[str] = []
        headers: list[tuple[int, int]] = []
        held: list[str] = []
        for start, end, what in spans:
            if what == "address":
                codes.append(f"{end - start}s")
            elif what in self.fields:
                codes.append(_VALUES_BY_FIELD[what])
            else:
                codes.append(f"{end - start}x")
                if what == "header":
                    headers.extend((offset, element[offset]) for offset in range(start, end))
                continue
            held.append(what)
        if sorted(held) != sorted(self.fields) or len(held) != len(set(held)):
            return None  # a wanted field is missing (or repeated): walk such members
        order = tuple(held.index(field) for field in self.fields)
        packer = struct.Struct(">" + "".join(codes))
        return packer, tuple(headers), None if order == tuple(range(len(order))) else order

    def _walk(self, element: bytes) -> tuple[Any, ...] | None:
        """One member decoded attribute by attribute (the slow path)."""
        found: dict[str, Any] = {}
        for attribute, value in parse_attributes(element):
            if attribute == ATTR_IP:
                for inner, packed in parse_attributes(value):
                    if inner in (ATTR_IPADDR_IPV4, ATTR_IPADDR_IPV6):
                        found["address"] = packed
            elif attribute in _VALUES:
                field, width, code = _VALUES[attribute]
                if len(value) >= width:
                    found[field] = struct.unpack_from(">" + code, value)[0]
        if any(field not in found for field in self.fields):
            return None
        return tuple(found[field] for field in self.fields)


_VALUES_BY_FIELD = {field: code for field, _, code in _VALUES.values()}


def _spans(element: bytes) -> list[Span] | None:
    """The spans of one ``DATA`` member (the whole attribute, its header included); None for
    a member that is not a ``DATA`` attribute of well-formed attributes."""
    if len(element) < ATTR.size:
        return None
    end, kind = ATTR.unpack_from(element)
    if kind & _TYPE_MASK != ATTR_DATA or end > len(element):
        return None
    spans: list[Span] = [(0, ATTR.size, "header")]
    offset = ATTR.size
    while offset + ATTR.size <= end:
        length, kind = ATTR.unpack_from(element, offset)
        kind &= _TYPE_MASK
        padded = (length + 3) & ~3
        if length < ATTR.size or offset + padded > end:
            return None
        value_start = offset + ATTR.size
        if kind == ATTR_IP:
            inner_length, inner_kind = ATTR.unpack_from(element, value_start)
            if inner_kind & _TYPE_MASK not in (ATTR_IPADDR_IPV4, ATTR_IPADDR_IPV6):
                return None
            spans.append((offset, value_start + ATTR.size, "header"))
            spans.append((value_start + ATTR.size, value_start + inner_length, "address"))
            value_end = value_start + inner_length
        elif kind in _VALUES and length == ATTR.size + _VALUES[kind][1]:
            spans.append((offset, value_start, "header"))
            spans.append((value_start, offset + length, _VALUES[kind][0]))
            value_end = offset + length
        else:
            spans.append((offset, value_start, "header"))
            value_end = value_start
        if offset + padded > value_end:
            spans.append((value_end, offset + padded, "skip"))
        offset += padded
    return spans if offset == end else None
