"""Conntrack NEW events from the kernel, over a ``NETLINK_NETFILTER`` socket.

The socket joins the multicast group ``NFNLGRP_CONNTRACK_NEW``: the kernel sends
one ``IPCTNL_MSG_CT_NEW`` message per connection when its conntrack entry is
confirmed (its first packet leaves the last netfilter hook), after NAT was
decided, so that the REPLY tuple already holds the SNAT address and port. No
polling: the socket never blocks and is read when the poller says so.

When the receive buffer is full the kernel drops the events it cannot queue and
the next ``recv`` fails once with ``ENOBUFS``. How many were lost is the
socket's drop counter, which ``/proc/net/netlink`` shows (column ``Drops``, the
line of the socket's inode); :meth:`EventListener.read` returns that number with
the events, so the caller can count and report it (a burst is not an error: the
socket keeps working).

Events exist only while ``net.netfilter.nf_conntrack_events`` is not 0 in the
network namespace (:func:`conntrack_events_setting`; 1 on, 2 on when someone
listens, the default of recent kernels).
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from metaleg.firewall.wire.conntrack import (
    CT_NEW,
    NFNLGRP_CONNTRACK_NEW,
    ConntrackEvent,
    parse_event,
)
from metaleg.firewall.wire.nfnetlink import NetfilterSocket, parse_messages

RECEIVE_BUFFER = 8 << 20
"""Bytes of socket receive buffer asked for (each event is a ~1 KiB socket buffer queued:
several thousand events absorb a burst while the process is busy)."""
READ_LIMIT = 512
"""Datagrams read per :meth:`EventListener.read`, so that the caller's other work (the bus)
is not starved by a flood of events."""
EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"
NETLINK_PROC = "/proc/net/netlink"


class Batch(NamedTuple):
    """What one :meth:`EventListener.read` got: the decoded events and how many events the
    kernel dropped since the last read (0 unless the buffer overflowed)."""

    events: list[ConntrackEvent]
    lost: int


class EventListener:
    """A non-blocking socket subscribed to conntrack NEW events of this network namespace.

    ``receive_buffer``: the socket's receive buffer (tests make it small to overflow it).
    """

    def __init__(self, receive_buffer: int = RECEIVE_BUFFER) -> None:
        self._socket = NetfilterSocket(receive_buffer=receive_buffer, timeout=0.0)
        self._inode = 0
        self._drops = 0

    def open(self) -> None:
        """Open the socket and join the group; raises ``OSError`` (``EPERM`` without
        ``CAP_NET_ADMIN``). The socket's drop counter starts from what it is now."""
        try:
            self._socket.join(NFNLGRP_CONNTRACK_NEW)
            self._inode = os.fstat(self._socket.fileno()).st_ino
        except BaseException:
            self._socket.close()
            raise
        self._drops = socket_drops(self._inode) or 0

    def fileno(self) -> int:
        """The descriptor to poll (readable: events are queued)."""
        return self._socket.fileno()

    def close(self) -> None:
        self._socket.close()

    def read(self, limit: int = READ_LIMIT) -> Batch:
        """The events queued now (at most ``limit`` datagrams), without waiting, and the
        number of events the kernel dropped since the last read."""
        events: list[ConntrackEvent] = []
        lost = 0
        for _ in range(limit):
            try:
                data = self._socket.receive()
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                lost += self._lost_since_last()
                continue
            for kind, _, _, payload in parse_messages(data):
                if kind == CT_NEW:
                    event = parse_event(payload)
                    if event is not None:
                        events.append(event)
        return Batch(events, lost)

    def _lost_since_last(self) -> int:
        """Events dropped since the last look at the counter (at least 1: ``ENOBUFS`` says
        some were, also when ``/proc/net/netlink`` cannot be read)."""
        drops = socket_drops(self._inode)
        if drops is None:
            return 1
        lost, self._drops = drops - self._drops, drops
        return max(1, lost)


def socket_drops(inode: int) -> int | None:
    """The drop counter of the netlink socket with ``inode`` (``/proc/net/netlink`` of this
    network namespace), None when it cannot be read."""
    try:
        with open(NETLINK_PROC) as file:
            header = file.readline().split()
            drops_column, inode_column = header.index("Drops"), header.index("Inode")
            for line in file:
                fields = line.split()
                if (
                    len(fields) > max(drops_column, inode_column)
                    and int(fields[inode_column]) == inode
                ):
                    return int(fields[drops_column])
    except (OSError, ValueError):
        return None
    return None


def conntrack_events_setting(path: str = EVENTS_SYSCTL) -> int | None:
    """``net.netfilter.nf_conntrack_events`` of this network namespace (0 off, 1 on, 2 on
    while someone listens), None when it cannot be read (conntrack not loaded)."""
    try:
        with open(path) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None
