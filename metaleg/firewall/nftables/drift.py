"""Drift detection for ``table inet metaleg``: the kernel's nftables notifications.

Every committed nf_tables transaction is multicast to the netlink group
``NFNLGRP_NFTABLES``: one message per object it added or deleted (table, chain,
rule, set, element), then ``NFT_MSG_NEWGEN`` with the new generation id and the
pid and name of the process that committed it. Nothing is polled: the socket
is readable only when some transaction committed, on any table.

A transaction is *ours* when its ``NEWGEN`` names the firewall worker's pid. In
a container with its own pid namespace the kernel names the pid as seen from
the node, so the backend also tells :meth:`NftDriftWatch.after_own_write` when
it committed: the last transaction on our table committed by then is its own,
and that pid is learnt. Any other transaction that touches our table is drift.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct

from metaleg.backend import Drift
from metaleg.firewall.wire.nfnetlink import (
    HEADER,
    NETLINK_NETFILTER,
    SO_RCVBUFFORCE,
    SOL_NETLINK,
    parse_attributes,
)

log = logging.getLogger(__name__)

NFNLGRP_NFTABLES = 7
NETLINK_ADD_MEMBERSHIP = 1
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
RECEIVE_BUFFER = 4 << 20
"""Room for a foreign transaction of ~100,000 objects before notifications are lost."""

NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
NFTA_TABLE = 1
"""The table's name: attribute 1 of every table, chain, rule, set and element message."""

# message type -> (drift kind, verb, attribute naming the object, what it is)
_OBJECT_MESSAGES: dict[int, tuple[str, str, int | None, str]] = {
    0: ("nft_table", "added", None, "table"),
    2: ("nft_table", "deleted", None, "table"),
    3: ("nft_chain", "added or changed", 3, "chain"),
    5: ("nft_chain", "deleted", 3, "chain"),
    6: ("nft_rule", "added", 2, "a rule in chain"),
    8: ("nft_rule", "deleted", 2, "a rule in chain"),
    9: ("nft_set", "added", 2, "set"),
    11: ("nft_set", "deleted", 2, "set"),
    12: ("nft_element", "added", 2, "elements of set"),
    14: ("nft_element", "deleted", 2, "elements of set"),
}
_KINDS_BY_SEVERITY = ("nft_table", "nft_chain", "nft_set", "nft_rule", "nft_element")
"""The kind a transaction's drift is reported as: the first of these it touched."""


def _c_string(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


class NftDriftWatch:
    """Watches nftables notifications for transactions by others on ``table inet <table>``."""

    check_interval: float | None = None

    def __init__(self, table: str = "metaleg") -> None:
        self.table = table.encode()
        self.own_pids = {os.getpid()}
        """Pids the kernel names for this process's transactions."""
        self._socket: socket.socket | None = None
        self._batch: list[tuple[str, str]] = []
        """(kind, description) of the transaction being received, until its NEWGEN."""
        self._pending: list[Drift] = []
        """Drift found while consuming our own notifications, reported by the next check."""
        self._lost = False
        self.foreign_seen = False
        """A foreign transaction on our table was reported since the backend last took this
        (:meth:`take_foreign`): its re-sync need not first ask whether the table differs."""

    def take_foreign(self) -> bool:
        """Whether drift was reported since the last call (and forget it)."""
        seen, self.foreign_seen = self.foreign_seen, False
        return seen

    def fds(self) -> list[int]:
        """The notification socket (opened in the caller's network namespace)."""
        if self._socket is None:
            sock = socket.socket(
                socket.AF_NETLINK,
                socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
            try:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
                sock.bind((0, 0))
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return [self._socket.fileno()]

    def check(self) -> list[Drift]:
        """The foreign transactions on our table since the last call (never blocks)."""
        found = self._pending
        self._pending = []
        for pid, name, batch in self._receive():
            if pid not in self.own_pids:
                found.append(self._drift(pid, name, batch))
        if self._lost:
            self._lost = False
            found.append(Drift("nft_table", "nftables notifications lost (receive buffer overrun)"))
        if found:
            self.foreign_seen = True
        return found

    def after_own_write(self) -> None:
        """Consume the notifications up to our own transaction, which has just committed.

        Its NEWGEN arrived before the commit returned; the last transaction on our
        table received is therefore ours (unless the write changed nothing), and
        the pid it names is learnt. Earlier foreign ones are kept for :meth:`check`.
        """
        if self._socket is None:
            return
        transactions = self._receive()
        if transactions:
            pid = transactions[-1][0]
            if pid not in self.own_pids:
                log.info("nftables names this process pid %d", pid)
                self.own_pids.add(pid)
        self._pending += [
            self._drift(pid, name, batch)
            for pid, name, batch in transactions[:-1]
            if pid not in self.own_pids
        ]

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # --- internals ---

    def _drift(self, pid: int, name: str, batch: list[tuple[str, str]]) -> Drift:
        kinds = {kind for kind, _ in batch}
        kind = next(k for k in _KINDS_BY_SEVERITY if k in kinds)
        descriptions = list(dict.fromkeys(text for k, text in batch if k == kind))
        shown = ", ".join(descriptions[:3])
        if len(descriptions) > 3:
            shown += f" and {len(descriptions) - 3} more"
        return Drift(kind, f"{shown} by {name or '?'} (pid {pid})")

    def _receive(self) -> list[tuple[int, str, list[tuple[str, str]]]]:
        """Complete transactions that touched our table: (pid, process name, changes)."""
        sock = self._socket
        if sock is None:
            return []
        transactions: list[tuple[int, str, list[tuple[str, str]]]] = []
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return transactions
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    self._lost = True  # the kernel dropped some: assume the worst
                    self._batch = []
                    continue
                raise
            offset = 0
            while offset + HEADER.size <= len(data):
                length, kind, _, _, _ = HEADER.unpack_from(data, offset)
                if length < HEADER.size:
                    break
                payload = data[offset + HEADER.size : offset + length]
                offset += (length + 3) & ~3
                if kind >> 8 != NFNL_SUBSYS_NFTABLES or len(payload) < 4:
                    continue
                message = kind & 0xFF
                if message == NFT_MSG_NEWGEN:
                    pid, name = self._committer(payload)
                    if self._batch:
                        transactions.append((pid, name, self._batch))
                        self._batch = []
                    continue
                meaning = _OBJECT_MESSAGES.get(message)
                if meaning is None or payload[0] != NFPROTO_INET:
                    continue
                names = dict(parse_attributes(payload, 4))
                if names.get(NFTA_TABLE, b"").split(b"\0", 1)[0] != self.table:
                    continue
                drift_kind, verb, name_attr, what = meaning
                target = _c_string(names.get(name_attr, b"")) if name_attr else "inet metaleg"
                self._batch.append((drift_kind, f"{what} {target} {verb}"))

    @staticmethod
    def _committer(payload: bytes) -> tuple[int, str]:
        pid, name = 0, ""
        for attribute, value in parse_attributes(payload, 4):
            if attribute == NFTA_GEN_PROC_PID and len(value) >= 4:
                pid = struct.unpack("!I", value[:4])[0]
            elif attribute == NFTA_GEN_PROC_NAME:
                name = _c_string(value)
        return pid, name
