"""Reading the packet and byte counters of an ipset's members, fast.

A set created with the ``counters`` extension keeps, per member, the packets and
bytes of every lookup that found the member (unless the rule's set match says
``! --update-counters``). The iptables backend reads them for its per-Service
counters (:meth:`metaleg.firewall.iptables.backend.IptablesBackend.read_counts`):
a few sets of tens of thousands of members, every few seconds, so the listing
is decoded without a generic attribute walk per member. The kernel lists each
member as ``DATA { IP { IPADDR }, BYTES, PACKETS[, SKBMARK] }``, all members of a
set alike; the first member's layout is learnt by a generic walk, every member's
attribute headers are checked against the first one's byte by byte over the whole
message (one strided slice per header byte), and the members are then unpacked in
one ``struct.iter_unpack`` that skips the headers. A message that does not fit
(another layout, padding) is decoded member by member.
"""

from __future__ import annotations

import errno
import struct

from metaleg.firewall.wire.ipset import (
    ATTR_ADT,
    ATTR_BYTES,
    ATTR_DATA,
    ATTR_IP,
    ATTR_IPADDR_IPV4,
    ATTR_IPADDR_IPV6,
    ATTR_PACKETS,
    ATTR_PROTOCOL,
    ATTR_SETNAME,
    IpsetError,
    IpsetSocket,
    _string,
    _u8,
)
from metaleg.firewall.wire.nfnetlink import ATTR, NFGEN, parse_attributes

MemberCount = tuple[bytes, int, int]
"""(packed address, bytes, packets) of one member: the kernel's order of the attributes,
so that the members of a message are unpacked as they are."""

_Layout = tuple[struct.Struct, tuple[tuple[int, int], ...], int, int, int]
"""How to unpack one member: its struct (address, bytes and packets; headers skipped), its
header bytes as (offset, value), and the indexes of address, bytes and packets in the
unpacked tuple."""


class IpsetCounterReader(IpsetSocket):
    """Lists one set at a time with its members' counters (one dump request per set)."""

    def __init__(self) -> None:
        super().__init__()
        self._layouts: dict[bytes, _Layout | None] = {}

    def counters(self, name: str) -> list[MemberCount] | None:
        """Every member of set ``name`` with its counters; None when there is no such set.

        Members of a set without the counters extension are not listed."""
        self._open()
        attributes = _u8(ATTR_PROTOCOL, self._protocol) + _string(ATTR_SETNAME, name)
        counts: list[MemberCount] = []
        try:
            for payload in self._list(attributes):
                for attribute, value in parse_attributes(payload, NFGEN.size):
                    if attribute == ATTR_ADT:
                        counts.extend(self._members(value))
        except IpsetError as error:
            if error.code == errno.ENOENT:
                return None
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        return counts

    def _members(self, adt: bytes) -> list[MemberCount]:
        """The members of one message's ``ADT`` attribute."""
        if len(adt) < ATTR.size:
            return []
        size = ATTR.unpack_from(adt)[0]
        first = adt[:size]
        layout = self._layout(first)
        if layout is not None and size and len(adt) % size == 0:
            packer, headers, address, bytes_, packets = layout
            count = len(adt) // size
            if all(adt[offset::size] == bytes((value,)) * count for offset, value in headers):
                if (address, bytes_, packets) == (0, 1, 2):
                    return list(packer.iter_unpack(adt))
                return [(v[address], v[bytes_], v[packets]) for v in packer.iter_unpack(adt)]
        members = (_member(element) for kind, element in parse_attributes(adt) if kind == ATTR_DATA)
        return [member for member in members if member is not None]

    def _layout(self, element: bytes) -> _Layout | None:
        """The layout of a member like ``element`` (cached by its attribute headers)."""
        fields = _fields(element)
        if fields is None:
            return None
        signature = b"".join(element[start:end] for start, end, kind in fields if kind == "h")
        if signature in self._layouts:
            return self._layouts[signature]
        layout = _compile(element, fields)
        if len(self._layouts) < 64:
            self._layouts[signature] = layout
        return layout


Field = tuple[int, int, str]
"""(start, end, kind) of a span of a member: ``h`` header bytes, ``a`` address,
``p`` packets, ``b`` bytes, ``x`` another attribute's value (skipped)."""


def _fields(element: bytes) -> list[Field] | None:
    """The spans of one ``DATA`` member (its whole attribute, header included)."""
    if len(element) < ATTR.size:
        return None
    spans: list[Field] = [(0, ATTR.size, "h")]
    offset = ATTR.size
    end = ATTR.unpack_from(element)[0]
    while offset + ATTR.size <= end:
        length, kind = ATTR.unpack_from(element, offset)
        kind &= 0x3FFF
        padded = (length + 3) & ~3
        if length < ATTR.size or offset + padded > end:
            return None
        if kind == ATTR_IP:
            inner_length, inner_kind = ATTR.unpack_from(element, offset + ATTR.size)
            if (inner_kind & 0x3FFF) not in (ATTR_IPADDR_IPV4, ATTR_IPADDR_IPV6):
                return None
            value_start = offset + 2 * ATTR.size
            spans.append((offset, value_start, "h"))
            spans.append((value_start, offset + ATTR.size + inner_length, "a"))
        elif kind in (ATTR_PACKETS, ATTR_BYTES) and length == ATTR.size + 8:
            spans.append((offset, offset + ATTR.size, "h"))
            spans.append(
                (offset + ATTR.size, offset + length, "p" if kind == ATTR_PACKETS else "b")
            )
        else:
            spans.append((offset, offset + ATTR.size, "h"))
            if padded > ATTR.size:
                spans.append((offset + ATTR.size, offset + padded, "x"))
            offset += padded
            continue
        if offset + padded > spans[-1][1]:
            spans.append((spans[-1][1], offset + padded, "x"))
        offset += padded
    kinds = [kind for _, _, kind in spans]
    if offset != end or kinds.count("a") != 1 or kinds.count("p") != 1 or kinds.count("b") != 1:
        return None
    return spans


def _compile(element: bytes, fields: list[Field]) -> _Layout:
    parts: list[str] = []
    headers: list[tuple[int, int]] = []
    places: dict[str, int] = {}
    for start, end, kind in fields:
        if kind in ("p", "b"):
            parts.append("Q")
        elif kind == "a":
            parts.append(f"{end - start}s")
        else:
            parts.append(f"{end - start}x")
            if kind == "h":
                headers.extend((offset, element[offset]) for offset in range(start, end))
            continue
        places[kind] = len(places)
    packer = struct.Struct(">" + "".join(parts))
    return packer, tuple(headers), places["a"], places["b"], places["p"]


def _member(element: bytes) -> MemberCount | None:
    """One member decoded attribute by attribute (the slow path)."""
    address = b""
    packets = octets = 0
    for attribute, value in parse_attributes(element):
        if attribute == ATTR_IP:
            for inner, packed in parse_attributes(value):
                if inner in (ATTR_IPADDR_IPV4, ATTR_IPADDR_IPV6):
                    address = packed
        elif attribute == ATTR_PACKETS and len(value) >= 8:
            packets = struct.unpack_from(">Q", value)[0]
        elif attribute == ATTR_BYTES and len(value) >= 8:
            octets = struct.unpack_from(">Q", value)[0]
    return (address, octets, packets) if address else None
