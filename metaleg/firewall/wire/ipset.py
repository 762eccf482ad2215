"""Batched ipset requests over a netlink socket, encoded and decoded with ``struct``.

pyroute2's :class:`~pyroute2.IPSet` sends one request per set and per member and
decodes every reply through its generic NLA machinery (~250 us of Python per
member). metaleg's sets are plain ``hash:ip`` and ``hash:net`` sets, whose
messages are small and fixed (the kernel's
``include/uapi/linux/netfilter/ipset/ip_set.h``), so this module writes them
itself: many ``IPSET_CMD_*`` messages go into one buffer, each with its own
sequence number and ``NLM_F_ACK``, and one ``send`` carries them all (the kernel
processes the messages of one datagram in order). The acknowledgements are
matched back by sequence number. An ``ADD``/``DEL`` message carries many
members (``IPSET_ATTR_ADT``), each with a line number; on an error the kernel
stops at that member and returns its line number, so an error names the set
and the member. Reading is one dump of all sets (``IPSET_CMD_LIST``) parsed
by a decoder of just the attributes metaleg needs.

Framing, the socket and the matching of a batch's answers are
:mod:`metaleg.firewall.wire.nfnetlink`'s.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from metaleg.firewall.wire.ipset_members import (
    ATTR_DATA as ATTR_DATA,
)
from metaleg.firewall.wire.ipset_members import (
    ATTR_IP,
    ATTR_IPADDR_IPV4,
    ATTR_IPADDR_IPV6,
    ATTR_PORT,
    ATTR_PROTO,
    MemberDecoder,
)
from metaleg.firewall.wire.ipset_ports import (
    parse_port_member,
    port_runs_of,
    protocol_name,
    protocol_number,
)
from metaleg.firewall.wire.nfnetlink import (
    ATTR,
    HEADER,
    NFGEN,
    NLA_F_NESTED,
    NLA_F_NET_BYTEORDER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLMSG_ERROR,
    NetfilterSocket,
    error_code,
    message,
    parse_attributes,
    parse_messages,
)
from metaleg.firewall.wire.nfnetlink import attr as _attr
from metaleg.firewall.wire.nfnetlink import nested as _nested

NFNL_SUBSYS_IPSET = 6

CMD_PROTOCOL = 1
CMD_CREATE = 2
CMD_DESTROY = 3
CMD_FLUSH = 4
CMD_SWAP = 6
CMD_LIST = 7
CMD_ADD = 9
CMD_DEL = 10
CMD_TEST = 11
CMD_TYPE = 13

ATTR_PROTOCOL = 1
ATTR_SETNAME = 2
ATTR_TYPENAME = 3
ATTR_SETNAME2 = 3
ATTR_REVISION = 4
ATTR_FAMILY = 5
ATTR_FLAGS = 6
ATTR_ADT = 8
ATTR_LINENO = 9
ATTR_REVISION_MIN = 10
# inside IPSET_ATTR_DATA (ATTR_DATA, ATTR_IP, ATTR_PORT, ATTR_PROTO, ATTR_BYTES, ATTR_PACKETS and
# ATTR_IPADDR_IPV4/6 are ipset_members')
ATTR_CIDR = 3
ATTR_PORT_TO = 5
ATTR_CADT_FLAGS = 8
ATTR_CADT_LINENO = 9
ATTR_MAXELEM = 19
ATTR_SKBMARK = 27

FLAG_LIST_SETNAME = 1 << 1
FLAG_WITH_COUNTERS = 1 << 3  # IPSET_ATTR_CADT_FLAGS of a set created with "counters"
FLAG_WITH_SKBINFO = 1 << 6  # IPSET_ATTR_CADT_FLAGS of a set created with "skbinfo"
HASH_IP_PORT = "hash:ip,port"
"""Members ``<address>,<protocol>:<first>[-<last>]`` (see :mod:`metaleg.firewall.wire.ipset_ports`)."""
SKBINFO_SUFFIX = " skbinfo"
"""A set kind ending in this is created with the skbinfo extension (``hash:ip skbinfo``)."""
SKBMARK = " skbmark "
"""Members of skbinfo sets are written ``<address> skbmark <value>/<mask>`` (ipset's syntax)."""
PROTOCOL_DEFAULT = 6

ERRORS = {
    4097: "kernel error received: ipset protocol error",
    4098: "kernel error received: set type not supported",
    4099: "kernel error received: maximal number of sets reached",
    4100: "set is in use by a kernel component",
    4101: "the second set does not exist",
    4102: "the sets cannot be swapped: their type does not match",
    4103: "element already exists",
    4104: "invalid CIDR",
    4105: "invalid netmask",
    4106: "invalid family",
    4107: "timeout cannot be used: set was created without timeout support",
    4108: "set is referenced by another set and cannot be swapped or renamed",
    4109: "an IPv4 address is expected",
    4110: "an IPv6 address is expected",
    4111: "packet/byte counters cannot be used",
    4112: "comment extension cannot be used",
    4113: "invalid markmask",
    4114: "skbinfo extension cannot be used",
    4352: "set type specific error (e.g. the set is full)",
}
ERR_BUSY = 4100

MAX_MEMBERS_PER_MESSAGE = 1024
"""Members of one ADD/DEL message (their nested attribute must stay below 64 KiB)."""
MAX_DATAGRAM = 96 * 1024
MAX_MESSAGES_PER_DATAGRAM = 256
"""Limits of one send: the acknowledgements of a datagram must fit the receive buffer."""

_U32 = struct.Struct("=I")
_BE32 = struct.Struct(">I")


class IpsetError(Exception):
    """A request failed: ``code`` is the kernel's (positive) error, ``message`` readable."""

    def __init__(self, code: int, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.member = member


def describe_code(code: int) -> str:
    """The kernel's ipset error code as text (``(code N)`` appended)."""
    text = ERRORS.get(code) or (os.strerror(code) if code < 4096 else "unknown ipset error")
    return f"{text} (code {code})"


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u8(kind: int, value: int) -> bytes:
    return _attr(kind, bytes((value,)))


def address_payload(family: int, text: str) -> bytes:
    """The nested ``IPSET_ATTR_IP`` attribute of one address (raises ``ValueError``/``OSError``)."""
    if family == socket.AF_INET:
        return _nested(
            ATTR_IP,
            ATTR.pack(8, ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER) + socket.inet_pton(family, text),
        )
    return _nested(
        ATTR_IP,
        ATTR.pack(20, ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER) + socket.inet_pton(family, text),
    )


_SKBMARKS: dict[str, bytes] = {}
"""Encoded ``IPSET_ATTR_SKBMARK`` attributes by their text (a few marks, many members)."""
_LINENO = struct.Struct("=HHI")
_ELEMENT4 = struct.Struct("=HHHHHH4sHHI")
_ELEMENT6 = struct.Struct("=HHHHHH16sHHI")
_DATA_NESTED = ATTR_DATA | NLA_F_NESTED
_IP_NESTED = ATTR_IP | NLA_F_NESTED
_IPV4_NBO = ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER
_IPV6_NBO = ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER


def member_data(family: int, net: bool, member: str, lineno: int) -> bytes:
    """One ``IPSET_ATTR_DATA`` element: address (``hash:net``: with its prefix length;
    ``<address> skbmark <value>/<mask>``: with its skbmark; ``<address>,<protocol>:<first>[-<last>]``
    of a ``hash:ip,port`` set: with its protocol and ports, a range expanded by the kernel)."""
    if "," in member:
        address, protocol, first, last = parse_port_member(member)
        body = address_payload(family, address) + _attr(
            ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack(">H", first)
        )
        if last != first:
            body += _attr(ATTR_PORT_TO | NLA_F_NET_BYTEORDER, struct.pack(">H", last))
        body += _u8(ATTR_PROTO, protocol_number(protocol))
        body += _attr(ATTR_CADT_LINENO, _U32.pack(lineno))
        return _nested(ATTR_DATA, body)
    if SKBMARK in member:
        address, _, mark = member.partition(SKBMARK)
        packed_mark = _SKBMARKS.get(mark)
        if packed_mark is None:
            value, _, mask = mark.partition("/")
            packed_mark = _attr(
                ATTR_SKBMARK | NLA_F_NET_BYTEORDER,
                struct.pack(">II", int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF),
            )
            if len(_SKBMARKS) < 1024:
                _SKBMARKS[mark] = packed_mark
        ip = address_payload(family, address)
        return (
            ATTR.pack(4 + len(ip) + 12 + 8, _DATA_NESTED)
            + ip
            + packed_mark
            + _LINENO.pack(8, ATTR_CADT_LINENO, lineno)
        )
    if not net:
        # The common case in one pack: DATA { IP { IPADDR }, LINENO }.
        if family == socket.AF_INET:
            return _ELEMENT4.pack(
                24, _DATA_NESTED, 12, _IP_NESTED, 8, _IPV4_NBO,
                socket.inet_pton(family, member), 8, ATTR_CADT_LINENO, lineno,
            )  # fmt: skip
        return _ELEMENT6.pack(
            36, _DATA_NESTED, 24, _IP_NESTED, 20, _IPV6_NBO,
            socket.inet_pton(family, member), 8, ATTR_CADT_LINENO, lineno,
        )  # fmt: skip
    address, _, prefix = member.partition("/")
    body = address_payload(family, address)
    if prefix:
        body += _u8(ATTR_CIDR, int(prefix))
    body += _attr(ATTR_CADT_LINENO, _U32.pack(lineno))
    return _nested(ATTR_DATA, body)


@dataclass
class Request:
    """One message of a batch; ``members`` only for ADD/DEL (their line numbers are indexes)."""

    command: int
    attributes: bytes
    flags: int = 0
    name: str = ""
    members: Sequence[str] = ()
    ignore: frozenset[int] = frozenset()
    """Error codes that count as success (e.g. ENOENT for a destroy)."""
    error: IpsetError | None = field(default=None, init=False)


class IpsetSocket:
    """A ``NETLINK_NETFILTER`` socket sending batches of ipset requests.

    Opens on first use. After an error in the exchange itself (not an error the
    kernel reports for a request) it closes, so the next call starts clean.
    """

    def __init__(self, opener: Callable[[], Any] | None = None) -> None:
        self._netlink = NetfilterSocket(opener=opener)
        self._protocol = PROTOCOL_DEFAULT
        self._revisions: dict[tuple[str, int], int] = {}

    # -- the socket ------------------------------------------------------

    def _open(self) -> None:
        if not self._netlink.is_open:
            self._netlink.open()
            try:
                self._protocol = self._query_protocol()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Close the socket (it opens again on the next call)."""
        self._netlink.close()

    def _message(self, command: int, flags: int, attributes: bytes, sequence: int) -> bytes:
        return message(
            (NFNL_SUBSYS_IPSET << 8) | command, flags, sequence, socket.AF_INET, attributes
        )

    # -- simple queries --------------------------------------------------

    def _query(self, command: int, attributes: bytes) -> dict[int, bytes]:
        """One request answered by one message; its top-level attributes."""
        sequence = self._netlink.next_sequence()
        self._netlink.send(self._message(command, NLM_F_ACK, attributes, sequence))
        answer: dict[int, bytes] | None = None
        while True:
            for kind, _, seq, payload in parse_messages(self._netlink.receive()):
                if seq != sequence:
                    continue
                if kind == NLMSG_ERROR:
                    code = error_code(payload)
                    if code:
                        raise IpsetError(code, describe_code(code))
                    if answer is None:
                        raise IpsetError(errno.EPROTO, "no answer to an ipset query")
                    return answer
                answer = dict(parse_attributes(payload, NFGEN.size))

    def _query_protocol(self) -> int:
        attributes = self._query(CMD_PROTOCOL, _u8(ATTR_PROTOCOL, PROTOCOL_DEFAULT))
        value = attributes.get(ATTR_PROTOCOL, bytes((PROTOCOL_DEFAULT,)))[0]
        return min(value, 7)

    def revision(self, kind: str, family: int) -> int:
        """The newest revision of a set type the kernel has for ``family`` (cached)."""
        key = (kind, family)
        if key not in self._revisions:
            self._open()
            try:
                attributes = self._query(
                    CMD_TYPE,
                    _u8(ATTR_PROTOCOL, self._protocol)
                    + _string(ATTR_TYPENAME, kind)
                    + _u8(ATTR_FAMILY, family),
                )
            except IpsetError:
                raise
            except BaseException:
                self.close()
                raise
            self._revisions[key] = attributes[ATTR_REVISION][0]
        return self._revisions[key]

    # -- requests --------------------------------------------------------

    def create(
        self,
        name: str,
        kind: str,
        family: int,
        *,
        exclusive: bool = False,
        counters: bool = False,
        maxelem: int | None = None,
    ) -> Request:
        """A CREATE request (an existing identical set is fine unless ``exclusive``).

        ``kind`` is a type name, with ``" skbinfo"`` appended for the extension;
        ``counters``: with the counters extension (packets and bytes per member);
        ``maxelem``: the most members the set may hold (the kernel's default: 65536).
        """
        flags = 0
        if kind.endswith(SKBINFO_SUFFIX):
            kind = kind[: -len(SKBINFO_SUFFIX)]
            flags |= FLAG_WITH_SKBINFO
        if counters:
            flags |= FLAG_WITH_COUNTERS
        data = _attr(ATTR_CADT_FLAGS | NLA_F_NET_BYTEORDER, _BE32.pack(flags)) if flags else b""
        if maxelem is not None:
            data += _attr(ATTR_MAXELEM | NLA_F_NET_BYTEORDER, _BE32.pack(maxelem))
        attributes = (
            _u8(ATTR_PROTOCOL, self._protocol)
            + _string(ATTR_SETNAME, name)
            + _string(ATTR_TYPENAME, kind)
            + _u8(ATTR_REVISION, self.revision(kind, family))
            + _u8(ATTR_FAMILY, family)
            + _nested(ATTR_DATA, data)
        )
        return Request(CMD_CREATE, attributes, NLM_F_EXCL if exclusive else 0, name)

    def destroy(self, name: str) -> Request:
        """A DESTROY request (a missing set is fine)."""
        attributes = _u8(ATTR_PROTOCOL, self._protocol) + _string(ATTR_SETNAME, name)
        return Request(CMD_DESTROY, attributes, 0, name, ignore=frozenset({errno.ENOENT}))

    def swap(self, first: str, second: str) -> Request:
        """A SWAP request: the two sets exchange names (their contents swap atomically)."""
        attributes = (
            _u8(ATTR_PROTOCOL, self._protocol)
            + _string(ATTR_SETNAME, first)
            + _string(ATTR_SETNAME2, second)
        )
        return Request(CMD_SWAP, attributes, 0, first)

    def members(
        self, command: int, name: str, family: int, net: bool, members: Iterable[str]
    ) -> list[Request]:
        """ADD or DEL requests for ``members`` (present or absent ones are fine)."""
        ordered = list(members)
        requests = []
        head = _u8(ATTR_PROTOCOL, self._protocol) + _string(ATTR_SETNAME, name)
        for start in range(0, len(ordered), MAX_MEMBERS_PER_MESSAGE):
            chunk = ordered[start : start + MAX_MEMBERS_PER_MESSAGE]
            try:
                elements = b"".join(
                    member_data(family, net, member, lineno + 1)
                    for lineno, member in enumerate(chunk)
                )
            except (ValueError, OSError) as error:
                bad = next(m for m in chunk if not _encodable(family, net, m))
                raise IpsetError(errno.EINVAL, f"invalid member {bad!r}", bad) from error
            # A top-level line number makes the kernel answer an error with the
            # failing element's line number (ipset's restore mode).
            attributes = head + _nested(ATTR_ADT, elements) + _attr(ATTR_LINENO, _U32.pack(0))
            requests.append(Request(command, attributes, 0, name, chunk))
        return requests

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Send ``requests`` in order, in as few datagrams as the limits allow; the failed ones.

        The kernel goes on with the next message after one failed, so every
        request gets its own answer (``Request.error``).
        """
        if not requests:
            return []
        self._open()
        try:
            for batch in _batches(requests):
                self._exchange(batch)
        except IpsetError:
            raise
        except BaseException:
            self.close()
            raise
        return [request for request in requests if request.error is not None]

    def _exchange(self, batch: Sequence[Request]) -> None:
        messages: list[tuple[int, bytes]] = []
        by_sequence: dict[int, Request] = {}
        last = len(batch) - 1
        for index, request in enumerate(batch):
            sequence = self._netlink.next_sequence()
            flags = request.flags | (NLM_F_ACK if index == last else 0)
            messages.append(
                (sequence, self._message(request.command, flags, request.attributes, sequence))
            )
            by_sequence[sequence] = request
        for sequence, (code, payload) in self._netlink.exchange(messages).items():
            request = by_sequence[sequence]
            if code not in request.ignore:
                request.error = _error(request, code, payload)

    # -- reading ---------------------------------------------------------

    def dump(self, wanted: Callable[[str], bool]) -> dict[str, ListedSet]:
        """Every set whose name ``wanted`` accepts, with type, family and members."""
        self._open()
        try:
            return self._dump(wanted)
        except BaseException:
            self.close()
            raise

    def _dump(self, wanted: Callable[[str], bool]) -> dict[str, ListedSet]:
        sets: dict[str, ListedSet] = {}
        for payload in self._list(_u8(ATTR_PROTOCOL, self._protocol)):
            _decode_listing(payload, wanted, sets)
        for entry in sets.values():
            if entry.ports:
                # The kernel lists every port of a range: back to runs, as they are written.
                grouped: dict[tuple[bytes, int], list[int]] = {}
                for address, port, proto in entry.ports:
                    grouped.setdefault((address, proto), []).append(port)
                address_family = entry.family or socket.AF_INET
                entry.members |= port_runs_of(
                    {
                        (address_text(address_family, address), protocol_name(proto)): ports
                        for (address, proto), ports in grouped.items()
                    }
                )
                entry.ports = []
        return sets

    def names(self) -> list[str]:
        """The names of all sets (a dump of names only)."""
        self._open()
        try:
            attributes = _u8(ATTR_PROTOCOL, self._protocol) + _attr(
                ATTR_FLAGS, _BE32.pack(FLAG_LIST_SETNAME)
            )
            return [
                value.rstrip(b"\0").decode()
                for payload in self._list(attributes)
                for attribute, value in parse_attributes(payload, NFGEN.size)
                if attribute == ATTR_SETNAME
            ]
        except BaseException:
            self.close()
            raise

    def _list(self, attributes: bytes) -> Iterator[bytes]:
        """The answers of one LIST dump."""
        sequence = self._netlink.next_sequence()
        request = self._message(CMD_LIST, NLM_F_DUMP, attributes, sequence)
        return self._netlink.dump(
            request,
            sequence,
            lambda code: IpsetError(code, f"cannot list sets: {describe_code(code)}"),
        )


@dataclass
class ListedSet:
    """One set as the kernel lists it (``family`` is the address family, 0 if none)."""

    kind: str = ""
    family: int = 0
    skbinfo: bool = False
    counters: bool = False
    members: set[str] = field(default_factory=set)
    ports: list[tuple[bytes, int, int]] = field(default_factory=list)
    """A ``hash:ip,port`` set's elements while it is listed: (packed address, port, protocol)."""


def _encodable(family: int, net: bool, member: str) -> bool:
    try:
        member_data(family, net, member, 0)
    except (ValueError, OSError):
        return False
    return True


def _batches(requests: Sequence[Request]) -> Iterator[list[Request]]:
    batch: list[Request] = []
    size = 0
    for request in requests:
        length = len(request.attributes) + 20
        if batch and (size + length > MAX_DATAGRAM or len(batch) >= MAX_MESSAGES_PER_DATAGRAM):
            yield batch
            batch, size = [], 0
        batch.append(request)
        size += length
    if batch:
        yield batch


def _error(request: Request, code: int, payload: bytes) -> IpsetError:
    """The error of one request; for ADD/DEL, naming the member the kernel stopped at."""
    member = None
    if request.members and len(payload) >= 4 + HEADER.size + NFGEN.size:
        # The kernel echoes the request with its top-level line number set to the
        # failing element's.
        length = HEADER.unpack_from(payload, 4)[0]
        echoed = payload[4 : 4 + length]
        for attribute, value in parse_attributes(echoed, HEADER.size + NFGEN.size):
            if attribute == ATTR_LINENO and len(value) >= 4:
                lineno = _U32.unpack_from(value)[0]
                if 1 <= lineno <= len(request.members):
                    member = request.members[lineno - 1]
    return IpsetError(code, describe_code(code), member)


def address_text(family: int, packed: bytes) -> str:
    """An address as :mod:`ipaddress` writes it."""
    text = socket.inet_ntop(family, packed)
    if family == socket.AF_INET6 and "." in text:
        # glibc writes IPv4-mapped/compatible addresses dotted; ipaddress may not.
        import ipaddress

        return str(ipaddress.IPv6Address(packed))
    return text


def _decode_listing(
    payload: bytes, wanted: Callable[[str], bool], sets: dict[str, ListedSet]
) -> None:
    attributes = dict(parse_attributes(payload, NFGEN.size))
    raw_name = attributes.get(ATTR_SETNAME)
    if raw_name is None:
        return
    name = raw_name.rstrip(b"\0").decode()
    if not wanted(name):
        return
    entry = sets.get(name)
    if entry is None:
        entry = sets[name] = ListedSet()
    if ATTR_TYPENAME in attributes:
        entry.kind = attributes[ATTR_TYPENAME].rstrip(b"\0").decode()
    if ATTR_FAMILY in attributes:
        entry.family = attributes[ATTR_FAMILY][0]
    header = attributes.get(ATTR_DATA)
    if header:
        for attribute, value in parse_attributes(header):
            if attribute == ATTR_CADT_FLAGS and len(value) >= 4:
                flags = _BE32.unpack_from(value)[0]
                entry.skbinfo = bool(flags & FLAG_WITH_SKBINFO)
                entry.counters = bool(flags & FLAG_WITH_COUNTERS)
    adt = attributes.get(ATTR_ADT)
    if not adt:
        return
    if entry.kind == HASH_IP_PORT:
        # Possibly millions (a port range is an element per port): decoded in one pass.
        entry.ports.extend(_PORT_ELEMENTS.decode(adt))
        return
    members = entry.members
    net = entry.kind == "hash:net"
    ntop = socket.inet_ntop
    for kind, element in parse_attributes(adt):
        if kind != ATTR_DATA:
            continue
        address = b""
        family = 0
        cidr = -1
        skbmark: tuple[int, int] | None = None
        for attribute, value in parse_attributes(element):
            if attribute == ATTR_IP:
                for inner, packed in parse_attributes(value):
                    if inner == ATTR_IPADDR_IPV4 and len(packed) == 4:
                        address, family = packed, socket.AF_INET
                    elif inner == ATTR_IPADDR_IPV6 and len(packed) == 16:
                        address, family = packed, socket.AF_INET6
            elif attribute == ATTR_CIDR and value:
                cidr = value[0]
            elif attribute == ATTR_SKBMARK and len(value) >= 8:
                skbmark = struct.unpack_from(">II", value)
        if not family:
            continue
        text = ntop(family, address) if family == socket.AF_INET else address_text(family, address)
        if net:
            if cidr < 0:
                cidr = 32 if family == socket.AF_INET else 128
            text = f"{text}/{cidr}"
        if skbmark is not None:
            text = skbmark_member(text, *skbmark)
        members.add(text)


_PORT_ELEMENTS = MemberDecoder(("address", "port", "proto"))


def skbmark_member(address: str, value: int, mask: int) -> str:
    """The text of a member with an skbmark: ``<address> skbmark <value>/<mask>``."""
    return f"{address}{SKBMARK}{value:#x}/{mask:#x}"
