"""Batched conntrack deletions over netlink, encoded with ``struct``.

pyroute2's ``Conntrack.delete`` sends one request per entry and waits for its
answer, encoding it through its generic NLA machinery (~0.5 ms per entry: a
flush of 1300 entries took ~850 ms). A delete request is small and fixed (the
kernel's ``include/uapi/linux/netfilter/nfnetlink_conntrack.h``): an
``IPCTNL_MSG_CT_DELETE`` message of subsystem ``NFNL_SUBSYS_CTNETLINK`` whose
``nfgenmsg`` holds the address family, with one attribute ``CTA_TUPLE_ORIG``
(``CTA_TUPLE_IP`` {source, destination}, ``CTA_TUPLE_PROTO`` {protocol, ports
or ICMP id/type/code}). So this module writes them itself and sends them in
batches (:mod:`metaleg.firewall.wire.nfnetlink`: framing, the socket, and how the
answers of a batch are matched to its messages). ``ENOENT`` (the entry is gone
already: expired, deleted by someone else) counts as "not deleted"; any other
error raises ``OSError`` naming the entry.

No zone attribute is sent: the kernel looks the tuple up in the default zone,
as pyroute2's ``delete`` did (the caller skips entries of other zones).

Dumps (:meth:`ConntrackSocket.dump`) are decoded here too, and only as far as a
deletion needs: the ORIGINAL tuple and the zone. pyroute2 builds a message
object with every attribute of every entry (~0.1 ms per entry: ~150 ms for a
namespace holding 1500 entries, on every change that flushes).

Events (the multicast group ``NFNLGRP_CONNTRACK_NEW`` of a ``NETLINK_NETFILTER``
socket, :func:`parse_event`) carry the same attributes as a dump answer, in a
message of type ``IPCTNL_MSG_CT_NEW``; they are decoded with the REPLY tuple
too, whose destination is the address the ORIGINAL source was translated to
(SNAT). :func:`event_message` encodes one as the kernel's ``ctnetlink_conntrack_event``
does (tests, benchmarks).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from metaleg.firewall.wire.nfnetlink import (
    HEADER,
    NFGEN,
    NFNETLINK_V0,
    NLA_F_NESTED,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NetfilterSocket,
    attr,
    message,
    nested,
)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

# enum nfnetlink_groups
NFNLGRP_CONNTRACK_NEW = 1
"""The multicast group of new conntrack entries (sent when an entry is confirmed)."""

# enum ctattr_type
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_TIMEOUT = 7
CTA_ID = 12
CTA_ZONE = 18
# enum ip_conntrack_status (bits of CTA_STATUS)
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
# enum ctattr_tuple
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
# enum ctattr_ip
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
# enum ctattr_l4proto
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9

MAX_MESSAGES_PER_DATAGRAM = 256
"""Messages of one send. Every error answer is a socket buffer of its own (~1 KiB of
receive buffer each, see ``RECEIVE_BUFFER``), and all of them queue during the send."""
RECEIVE_BUFFER = 1 << 20

PROTOCOL_NAMES = {
    1: "icmp",
    6: "tcp",
    17: "udp",
    33: "dccp",
    47: "gre",
    58: "icmpv6",
    132: "sctp",
    136: "udplite",
}

_U8 = struct.Struct("=HHB3x")  # an attribute of one byte, padded to 4
_IPV4 = struct.Struct("=HHHH4sHH4s")  # CTA_TUPLE_IP { V4_SRC, V4_DST }
_IPV6 = struct.Struct("=HHHH16sHH16s")  # CTA_TUPLE_IP { V6_SRC, V6_DST }
_PORTS = struct.Struct("=HHHHB3xHH2s2xHH2s2x")  # CTA_TUPLE_PROTO { NUM, SRC_PORT, DST_PORT }
_BE16_RAW = struct.Struct("!H")
_BE32_RAW = struct.Struct("!I")
_ATTR_HEADER = struct.Struct("=HH")
_ICMP_ATTRS: dict[int, tuple[int, int, int]] = {
    socket.AF_INET: (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE),
    socket.AF_INET6: (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE),
}


class Entry(NamedTuple):
    """The ORIGINAL tuple of a conntrack entry, as the kernel dumps it.

    Ports and ICMP fields are ``None`` when the dump had none (the protocol
    decides which it has: ports for TCP, UDP, SCTP, UDP-Lite, DCCP, GRE keys;
    id, type and code for ICMP and ICMPv6); exactly the fields present are sent
    back, as the kernel's ``nlattr_to_tuple`` of the protocol expects them.
    """

    family: int  # socket.AF_INET or socket.AF_INET6
    source: str
    destination: str
    protocol: int
    source_port: int | None = None
    destination_port: int | None = None
    icmp_id: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    def __str__(self) -> str:
        name = PROTOCOL_NAMES.get(self.protocol, f"protocol {self.protocol}")
        source, destination = self.source, self.destination
        if self.family == socket.AF_INET6:
            source, destination = f"[{source}]", f"[{destination}]"
        if self.source_port is not None or self.destination_port is not None:
            source = f"{source}:{self.source_port}"
            destination = f"{destination}:{self.destination_port}"
        text = f"{name} {source} -> {destination}"
        if self.icmp_type is not None or self.icmp_id is not None:
            text += f" (id {self.icmp_id} type {self.icmp_type} code {self.icmp_code})"
        return text


def _be16(kind: int, value: int) -> bytes:
    """An attribute of one big-endian u16, padded to 4."""
    return attr(kind, _BE16_RAW.pack(value))


def tuple_attribute(entry: Entry, kind: int = CTA_TUPLE_ORIG) -> bytes:
    """The ``CTA_TUPLE_ORIG`` attribute of ``entry`` (or another tuple attribute: ``kind``
    ``CTA_TUPLE_REPLY``); raises ``OSError``/``ValueError``/``struct.error`` for fields
    out of range."""
    family = entry.family
    source = socket.inet_pton(family, entry.source)
    destination = socket.inet_pton(family, entry.destination)
    if family == socket.AF_INET:
        ip = _IPV4.pack(
            20, CTA_TUPLE_IP | NLA_F_NESTED, 8, CTA_IP_V4_SRC, source, 8, CTA_IP_V4_DST, destination
        )
    elif family == socket.AF_INET6:
        ip = _IPV6.pack(
            44, CTA_TUPLE_IP | NLA_F_NESTED, 20, CTA_IP_V6_SRC, source, 20, CTA_IP_V6_DST,
            destination,
        )  # fmt: skip
    else:
        raise ValueError(f"address family {family} is neither AF_INET nor AF_INET6")
    sport, dport = entry.source_port, entry.destination_port
    if sport is not None and dport is not None and entry.icmp_type is None:
        # The common case (TCP, UDP, ...) in one pack.
        proto = _PORTS.pack(
            28, CTA_TUPLE_PROTO | NLA_F_NESTED, 5, CTA_PROTO_NUM, entry.protocol,
            6, CTA_PROTO_SRC_PORT, _BE16_RAW.pack(sport),
            6, CTA_PROTO_DST_PORT, _BE16_RAW.pack(dport),
        )  # fmt: skip
    else:
        body = _U8.pack(5, CTA_PROTO_NUM, entry.protocol)
        if sport is not None:
            body += _be16(CTA_PROTO_SRC_PORT, sport)
        if dport is not None:
            body += _be16(CTA_PROTO_DST_PORT, dport)
        id_attr, type_attr, code_attr = _ICMP_ATTRS[family]
        if entry.icmp_id is not None:
            body += _be16(id_attr, entry.icmp_id)
        if entry.icmp_type is not None:
            body += _U8.pack(5, type_attr, entry.icmp_type)
        if entry.icmp_code is not None:
            body += _U8.pack(5, code_attr, entry.icmp_code)
        proto = nested(CTA_TUPLE_PROTO, body)
    return nested(kind, ip + proto)


_ADDRESS_ATTRS = {CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST}
# Where each protocol attribute goes among Entry's last five fields (source_port,
# destination_port, icmp_id, icmp_type, icmp_code): big-endian u16s, then u8s.
_PORT_ATTRS = {
    CTA_PROTO_SRC_PORT: 0,
    CTA_PROTO_DST_PORT: 1,
    CTA_PROTO_ICMP_ID: 2,
    CTA_PROTO_ICMPV6_ID: 2,
}
_BYTE_ATTRS = {
    CTA_PROTO_ICMP_TYPE: 3,
    CTA_PROTO_ICMP_CODE: 4,
    CTA_PROTO_ICMPV6_TYPE: 3,
    CTA_PROTO_ICMPV6_CODE: 4,
}


class DumpedEntry(NamedTuple):
    """One entry of a dump: its ORIGINAL tuple and whether it is in a zone other than the
    default one (``CTA_ZONE``; the kernel sends it only for a non-zero zone)."""

    entry: Entry
    zoned: bool


def parse_entry(payload: bytes) -> DumpedEntry | None:
    """Decode one dump answer (nfgenmsg and attributes); None when it has no ORIGINAL
    tuple of IPv4 or IPv6 with a protocol (not an entry metaleg could delete).

    Only the ORIGINAL tuple and the zone are decoded (a dump is decoded entry by entry
    on every flush); :func:`parse_event` decodes the REPLY tuple and the status too."""
    family = payload[0] if payload else 0
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    original = None
    zoned = False
    for kind, start, end in _attributes_at(payload, NFGEN.size, len(payload)):
        if kind == CTA_TUPLE_ORIG:
            original = (start, end)
        elif kind == CTA_ZONE:
            zoned = end - start >= 2 and _BE16_RAW.unpack_from(payload, start)[0] != 0
    if original is None:
        return None
    entry = _tuple_at(payload, original[0], original[1], family)
    return None if entry is None else DumpedEntry(entry, zoned)


class ConntrackEvent(NamedTuple):
    """A conntrack entry as an event (or a dump answer) carries it, both directions.

    ``reply`` is the REPLY tuple: the answers' direction after NAT. For a connection
    SNATed on this host, ``reply.destination`` (and ``reply.destination_port``) is
    the address (and port) the ORIGINAL source was translated to. ``status`` is the
    entry's ``IPS_*`` bits (0 when the message had none).
    """

    original: Entry
    reply: Entry | None
    status: int
    zoned: bool


def parse_event(payload: bytes) -> ConntrackEvent | None:
    """Decode an event's (or a dump answer's) nfgenmsg and attributes: both tuples, the
    status and the zone. None when it has no ORIGINAL tuple of IPv4 or IPv6 with a
    protocol."""
    family = payload[0] if payload else 0
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    original = reply = None
    status = 0
    zoned = False
    for kind, start, end in _attributes_at(payload, NFGEN.size, len(payload)):
        if kind == CTA_TUPLE_ORIG:
            original = (start, end)
        elif kind == CTA_TUPLE_REPLY:
            reply = (start, end)
        elif kind == CTA_STATUS:
            status = _BE32_RAW.unpack_from(payload, start)[0] if end - start >= 4 else 0
        elif kind == CTA_ZONE:
            zoned = end - start >= 2 and _BE16_RAW.unpack_from(payload, start)[0] != 0
    if original is None:
        return None
    entry = _tuple_at(payload, original[0], original[1], family)
    if entry is None:
        return None
    decoded_reply = _tuple_at(payload, reply[0], reply[1], family) if reply is not None else None
    return ConntrackEvent(entry, decoded_reply, status, zoned)


def parse_tuple(family: int, data: bytes) -> Entry | None:
    """Decode the nested attributes of a tuple (``CTA_TUPLE_ORIG`` or ``CTA_TUPLE_REPLY``)
    of ``family``; None without both addresses of that family and a protocol."""
    return _tuple_at(data, 0, len(data), family)


def _attributes_at(data: bytes, offset: int, end: int) -> list[tuple[int, int, int]]:
    """``(type, payload start, payload end)`` of each attribute in ``data[offset:end]``:
    offsets instead of slices (a conntrack message is decoded 3 levels deep per event)."""
    found = []
    unpack = _ATTR_HEADER.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        stop = offset + length
        found.append((kind & NLA_TYPE_MASK, offset + 4, stop if stop <= end else end))
        offset += (length + 3) & ~3
    return found


# The layout the kernel writes for a tuple with ports (ctnetlink_dump_tuples: the addresses,
# then the protocol number and both ports), as tuple_attribute writes it too: decoded with
# two unpacks when a tuple has exactly it, attribute by attribute otherwise.
_PORTS_DECODE = struct.Struct("=HHHHB3xHHBB2xHHBB2x")
_FAST_IP: dict[int, tuple[struct.Struct, int, int]] = {
    socket.AF_INET: (_IPV4, 20, CTA_IP_V4_SRC),
    socket.AF_INET6: (_IPV6, 44, CTA_IP_V6_SRC),
}


def _fast_tuple(data: bytes, start: int, end: int, family: int) -> Entry | None:
    """The tuple at ``data[start:end]`` if it has exactly the kernel's layout of a tuple with
    ports; None for anything else (ICMP, another order, extra attributes)."""
    layout, ip_size, source_kind = _FAST_IP[family]
    if end - start != ip_size + _PORTS_DECODE.size:
        return None
    ip_length, ip_kind, _, src_kind, source, _, dst_kind, destination = layout.unpack_from(
        data, start
    )
    (
        proto_length, proto_kind, _, num_kind, protocol,
        _, sport_kind, sport_high, sport_low,
        _, dport_kind, dport_high, dport_low,
    ) = _PORTS_DECODE.unpack_from(data, start + ip_size)  # fmt: skip
    if (
        ip_length != ip_size
        or ip_kind & NLA_TYPE_MASK != CTA_TUPLE_IP
        or src_kind != source_kind
        or dst_kind != source_kind + 1
        or proto_length != _PORTS_DECODE.size
        or proto_kind & NLA_TYPE_MASK != CTA_TUPLE_PROTO
        or (num_kind, sport_kind, dport_kind)
        != (CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT)
    ):
        return None
    return Entry(
        family,
        socket.inet_ntop(family, source),
        socket.inet_ntop(family, destination),
        protocol,
        sport_high << 8 | sport_low,
        dport_high << 8 | dport_low,
    )


def _tuple_at(data: bytes, start: int, end: int, family: int) -> Entry | None:
    """The tuple whose nested attributes are ``data[start:end]`` (see :func:`parse_tuple`)."""
    fast = _fast_tuple(data, start, end, family)
    if fast is not None:
        return fast
    addresses: dict[int, str] = {}
    protocol: int | None = None
    fields: list[int | None] = [None, None, None, None, None]
    for kind, inner, stop in _attributes_at(data, start, end):
        if kind == CTA_TUPLE_IP:
            for ip_kind, first, last in _attributes_at(data, inner, stop):
                size = last - first
                if ip_kind in _ADDRESS_ATTRS and size in (4, 16):
                    addresses[ip_kind] = socket.inet_ntop(
                        socket.AF_INET if size == 4 else socket.AF_INET6, data[first:last]
                    )
        elif kind == CTA_TUPLE_PROTO:
            for proto_kind, first, last in _attributes_at(data, inner, stop):
                if first >= last:
                    continue
                if proto_kind == CTA_PROTO_NUM:
                    protocol = data[first]
                elif proto_kind in _PORT_ATTRS and last - first >= 2:
                    fields[_PORT_ATTRS[proto_kind]] = _BE16_RAW.unpack_from(data, first)[0]
                elif proto_kind in _BYTE_ATTRS:
                    fields[_BYTE_ATTRS[proto_kind]] = data[first]
    if family == socket.AF_INET:
        source, destination = addresses.get(CTA_IP_V4_SRC), addresses.get(CTA_IP_V4_DST)
    else:
        source, destination = addresses.get(CTA_IP_V6_SRC), addresses.get(CTA_IP_V6_DST)
    if source is None or destination is None or protocol is None:
        return None
    return Entry(family, source, destination, protocol, *fields)


def event_message(
    original: Entry,
    reply: Entry,
    *,
    status: int = IPS_CONFIRMED | IPS_SRC_NAT,
    entry_id: int = 1,
    timeout: int = 120,
    sequence: int = 0,
) -> bytes:
    """An ``IPCTNL_MSG_CT_NEW`` event as ``ctnetlink_conntrack_event`` sends it for a new
    entry (``NLM_F_CREATE | NLM_F_EXCL``, port 0): both tuples, status, timeout, id."""
    attributes = (
        tuple_attribute(original, CTA_TUPLE_ORIG)
        + tuple_attribute(reply, CTA_TUPLE_REPLY)
        + attr(CTA_STATUS, _BE32_RAW.pack(status))
        + attr(CTA_TIMEOUT, _BE32_RAW.pack(timeout))
        + attr(CTA_ID, _BE32_RAW.pack(entry_id))
    )
    payload = NFGEN.pack(original.family, NFNETLINK_V0, 0) + attributes
    return (
        HEADER.pack(HEADER.size + len(payload), CT_NEW, NLM_F_CREATE | NLM_F_EXCL, sequence, 0)
        + payload
    )


def dump_message(family: int, sequence: int) -> bytes:
    """An ``IPCTNL_MSG_CT_GET`` dump request of every entry of ``family`` (``AF_UNSPEC``:
    both families in one walk of the kernel's table)."""
    return message(CT_GET, NLM_F_DUMP, sequence, family, b"")


def delete_message(entry: Entry, sequence: int, flags: int = 0) -> bytes:
    """One ``IPCTNL_MSG_CT_DELETE`` message for ``entry``."""
    return message(CT_DELETE, flags, sequence, entry.family, tuple_attribute(entry))


class ConntrackSocket:
    """Dumps conntrack entries and deletes them in batches, in the network namespace the
    process is in when it first does. After an error in the exchange itself (not one
    the kernel reports for an entry) the socket closes, so the next call starts clean.
    """

    def __init__(self) -> None:
        self._netlink = NetfilterSocket(receive_buffer=RECEIVE_BUFFER)

    def close(self) -> None:
        """Close the socket (it opens again on the next call)."""
        self._netlink.close()

    def dump(self, family: int = socket.AF_UNSPEC) -> Iterator[DumpedEntry]:
        """Every entry of ``family`` (``AF_UNSPEC``: both), as the kernel dumps them.

        Read it to the end before deleting anything: the dump and the deletions
        share the socket.
        """
        sequence = self._netlink.next_sequence()

        def failed(code: int) -> OSError:
            return OSError(code, f"cannot dump conntrack entries: {os.strerror(code)}")

        try:
            for payload in self._netlink.dump(dump_message(family, sequence), sequence, failed):
                dumped = parse_entry(payload)
                if dumped is not None:
                    yield dumped
        except BaseException:
            self.close()
            raise

    def delete(self, entries: Sequence[Entry]) -> int:
        """Delete ``entries``; return how many were deleted (ENOENT: gone already).

        Raises ``OSError`` naming the entry when the kernel refuses one for
        another reason (the entries of its datagram are processed first; later
        datagrams are not sent).
        """
        deleted = 0
        try:
            for start in range(0, len(entries), MAX_MESSAGES_PER_DATAGRAM):
                deleted += self._exchange(entries[start : start + MAX_MESSAGES_PER_DATAGRAM])
        except _EntryError as error:
            raise error.error from None
        except BaseException:
            self.close()
            raise
        return deleted

    def _exchange(self, batch: Sequence[Entry]) -> int:
        messages: list[tuple[int, bytes]] = []
        by_sequence: dict[int, Entry] = {}
        last = len(batch) - 1
        for index, entry in enumerate(batch):
            sequence = self._netlink.next_sequence()
            try:
                encoded = delete_message(entry, sequence, NLM_F_ACK if index == last else 0)
            except (OSError, ValueError, struct.error) as error:
                raise _EntryError(
                    OSError(errno.EINVAL, f"cannot encode conntrack entry {entry}: {error}")
                ) from error
            messages.append((sequence, encoded))
            by_sequence[sequence] = entry
        failed = self._netlink.exchange(messages)
        failure: OSError | None = None
        for sequence, (code, _) in sorted(failed.items()):
            if code != errno.ENOENT and failure is None:
                entry = by_sequence[sequence]
                failure = OSError(
                    code, f"cannot delete conntrack entry {entry}: {os.strerror(code)}"
                )
        if failure is not None:
            raise _EntryError(failure)
        return len(batch) - len(failed)


class _EntryError(Exception):
    """An entry the kernel refused (the exchange itself is fine: the socket stays open)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error
