"""nfnetlink on the wire: message framing, attributes and a socket for batches.

:mod:`metaleg.firewall.wire.ipset` and :mod:`metaleg.firewall.wire.conntrack`
encode their requests with ``struct`` instead of pyroute2's generic message
classes (~250 us of Python per message there), and send many in one datagram.
What they share lives here: the netlink and nfgenmsg headers, attribute
encoding and parsing, and :class:`NetfilterSocket`, a plain ``NETLINK_NETFILTER``
socket (the standard library's) for raw ``send`` and ``recv``.

Batches: every message of a datagram has its own sequence number and only the
last asks for an acknowledgement. The kernel processes the messages in order
during the ``send`` and answers a failed one anyway, so the answer to the last
one ends the datagram, and every other answer is an error matched back to its
message by sequence number (:meth:`NetfilterSocket.exchange`).

Notifications: :meth:`NetfilterSocket.join` subscribes the socket to a multicast
group (conntrack events, for instance); a socket made with ``timeout=0`` never
blocks, so that its :meth:`~NetfilterSocket.fileno` can be polled with others.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
NFNETLINK_V0 = 0

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id (big-endian, 0)
ATTR = struct.Struct("=HH")
ERROR = struct.Struct("=i")

RECEIVE_BUFFER = 1 << 20
"""Bytes of the one buffer every datagram is received into, reused: a new 1 MiB
buffer per ``recv`` is an mmap and a munmap each time (blocks this large are
mapped, see :func:`metaleg.lifecycle.map_large_blocks`), and a dump is one
``recv`` per message for some subsystems (ipset lists one set per message)."""

RECEIVE_TIMEOUT = 30.0
"""Seconds to wait for the kernel's answer before giving up (the socket is then closed)."""


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    return ATTR.pack(length, kind) + payload + b"\0" * (-length & 3)


def nested(kind: int, payload: bytes) -> bytes:
    """A nested attribute holding ``payload`` (attributes, already padded)."""
    return ATTR.pack(4 + len(payload), kind | NLA_F_NESTED) + payload


def message(kind: int, flags: int, sequence: int, family: int, attributes: bytes) -> bytes:
    """One request: netlink header (``NLM_F_REQUEST`` added), nfgenmsg, attributes."""
    return (
        HEADER.pack(
            HEADER.size + NFGEN.size + len(attributes),
            kind,
            NLM_F_REQUEST | flags,
            sequence,
            0,
        )
        + NFGEN.pack(family, NFNETLINK_V0, 0)
        + attributes
    )


def error_code(payload: bytes) -> int:
    """The (positive) error of an ``NLMSG_ERROR`` answer; 0 for an acknowledgement."""
    return -int(ERROR.unpack_from(payload)[0])


def parse_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """``(type, flags, sequence, payload)`` of each netlink message in a datagram."""
    offset = 0
    end = len(data)
    while offset + HEADER.size <= end:
        length, kind, flags, sequence, _ = HEADER.unpack_from(data, offset)
        if length < HEADER.size:
            break
        yield kind, flags, sequence, data[offset + HEADER.size : offset + length]
        offset += (length + 3) & ~3


def parse_attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(type, payload)`` of each attribute from ``offset`` on (flags stripped)."""
    end = len(data)
    unpack = ATTR.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        yield kind & NLA_TYPE_MASK, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


class NetfilterSocket:
    """A ``NETLINK_NETFILTER`` socket of the current network namespace, opened on
    first use; raw ``send`` and ``recv`` only.

    ``receive_buffer``: socket receive buffer to ask for (every error answer of a
    batch is a datagram of its own, and they all queue during the send).
    ``timeout``: seconds :meth:`receive` waits (0: it never blocks and raises
    ``BlockingIOError`` when nothing is queued).
    ``opener`` replaces the socket (tests).
    """

    def __init__(
        self,
        *,
        receive_buffer: int | None = None,
        timeout: float = RECEIVE_TIMEOUT,
        opener: Callable[[], Any] | None = None,
    ) -> None:
        self._receive_buffer = receive_buffer
        self._timeout = timeout
        self._opener = opener
        self._socket: Any = None
        self._sequence = 0
        self._buffer = bytearray(RECEIVE_BUFFER)
        self._view = memoryview(self._buffer)

    @property
    def is_open(self) -> bool:
        return self._socket is not None

    def open(self) -> None:
        if self._socket is not None:
            return
        if self._opener is not None:
            self._socket = self._opener()
            return
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            # The kernel answers during send (and continues a dump during recv), so
            # data is normally waiting; wait for it, but not forever.
            sock.settimeout(self._timeout)
            if self._receive_buffer is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self._receive_buffer)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
                # Error answers without the echoed request (matched by sequence number).
                with contextlib.suppress(OSError):
                    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except BaseException:
            sock.close()
            raise
        self._socket = sock

    def close(self) -> None:
        """Close the socket (it opens again on the next call)."""
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None

    def fileno(self) -> int:
        """The socket's descriptor (opened first), to poll it."""
        self.open()
        return int(self._socket.fileno())

    def join(self, group: int) -> None:
        """Subscribe to the multicast ``group`` (``NETLINK_ADD_MEMBERSHIP``); its
        notifications then arrive with :meth:`receive`. Raises ``OSError``
        (``EPERM`` without ``CAP_NET_ADMIN``)."""
        self.open()
        self._socket.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def next_sequence(self) -> int:
        self._sequence = (self._sequence + 1) & 0x7FFFFFFF or 1
        return self._sequence

    def send(self, data: bytes) -> None:
        self.open()
        self._socket.send(data)

    def receive(self) -> bytes:
        """The next datagram (``TimeoutError`` after the timeout without one;
        ``BlockingIOError`` at once with ``timeout=0``)."""
        try:
            received = self._socket.recv_into(self._buffer)
        except TimeoutError:
            raise TimeoutError(f"no answer from the kernel within {self._timeout:.0f}s") from None
        return bytes(self._view[:received])

    def exchange(self, messages: Sequence[tuple[int, bytes]]) -> dict[int, tuple[int, bytes]]:
        """Send ``(sequence, message)`` pairs in one datagram (only the last one asking
        for an acknowledgement); return ``sequence -> (error, payload)`` of the failed."""
        self.send(b"".join(encoded for _, encoded in messages))
        pending = {sequence for sequence, _ in messages}
        final = messages[-1][0]
        failed: dict[int, tuple[int, bytes]] = {}
        while final in pending:
            for kind, _, sequence, payload in parse_messages(self.receive()):
                if kind != NLMSG_ERROR or sequence not in pending:
                    continue
                pending.discard(sequence)
                code = error_code(payload)
                if code:
                    failed[sequence] = (code, payload)
        return failed

    def dump(
        self, request: bytes, sequence: int, failed: Callable[[int], Exception]
    ) -> Iterator[bytes]:
        """Send a dump ``request`` and yield the payload of each answer until the end;
        raises ``failed(error)`` when the kernel answers with an error."""
        self.send(request)
        while True:
            for kind, _, seq, payload in parse_messages(self.receive()):
                if seq != sequence:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = error_code(payload)
                    if code:
                        raise failed(code)
                    continue
                yield payload
