"""Drift detection for metaleg's policy rules and routing tables: rtnetlink notifications.

The kernel multicasts every rule and route added or deleted to the groups
``RTNLGRP_IPV4_RULE``, ``RTNLGRP_IPV6_RULE``, ``RTNLGRP_IPV4_ROUTE`` and
``RTNLGRP_IPV6_ROUTE``; the socket is readable only when one changed. A
notification is drift when it contradicts what the backend holds applied: a
rule or route of ours deleted, or one added in metaleg's space (its priorities,
its tables) that it does not want. Our own writes never contradict it: the
worker consumes their notifications right after applying them, while the
applied sets are the ones they were made for.

Not notified (the periodic re-sync remains for them): IPv4 routes the kernel
removes itself when their interface goes down or loses its address.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from metaleg.backend import Drift
from metaleg.routing.kernel import parse_route, parse_rule
from metaleg.routing.plan import RouteSpec, RuleSpec, owns_rule

log = logging.getLogger(__name__)

RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWRULE, RTM_DELRULE = 32, 33
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_IPV6_RULE = 19
GROUPS = sum(
    1 << (group - 1)
    for group in (RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE)
)
SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 4 << 20
"""Room for the notifications of a full routing table (e.g. BGP routes) arriving at once."""
_HEADER_SIZE = 16


class RoutingDriftWatch:
    """Watches rtnetlink notifications for rules and routes that contradict what is applied.

    ``applied`` returns the rules and routes the backend holds applied; ``tables``
    is metaleg's space of tables (the original's included).
    """

    check_interval: float | None = None

    def __init__(
        self,
        applied: Callable[[], tuple[set[RuleSpec], set[RouteSpec]]],
        tables: range,
    ) -> None:
        self._applied = applied
        self._tables = tables
        self._socket: socket.socket | None = None
        self._lost = False

    def fds(self) -> list[int]:
        """The notification socket (opened in the caller's network namespace)."""
        if self._socket is None:
            sock = socket.socket(
                socket.AF_NETLINK,
                socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                socket.NETLINK_ROUTE,
            )
            try:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
                sock.bind((0, GROUPS))
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return [self._socket.fileno()]

    def check(self) -> list[Drift]:
        """The contradicting notifications since the last call (never blocks)."""
        sock = self._socket
        if sock is None:
            return []
        found: list[Drift] = []
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    self._lost = True
                    continue
                raise
            found += self._parse(data)
        if self._lost:
            self._lost = False
            found.append(Drift("route", "routing notifications lost (receive buffer overrun)"))
        return found

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # --- internals ---

    def _parse(self, data: bytes) -> list[Drift]:
        found: list[Drift] = []
        offset = 0
        while offset + _HEADER_SIZE <= len(data):
            length = int.from_bytes(data[offset : offset + 4], "little")
            kind = int.from_bytes(data[offset + 4 : offset + 6], "little")
            if length < _HEADER_SIZE:
                break
            chunk = data[offset : offset + length]
            offset += (length + 3) & ~3
            if kind in (RTM_NEWRULE, RTM_DELRULE):
                drift = self._rule(kind, self._decode(fibmsg, chunk))
            elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
                drift = self._route(kind, self._decode(rtmsg, chunk))
            else:
                continue
            if drift is not None:
                found.append(drift)
        return found

    @staticmethod
    def _decode(message_class: Any, chunk: bytes) -> Any:
        message = message_class(chunk)
        message.decode()
        return message

    def _rule(self, kind: int, message: Any) -> Drift | None:
        rule = parse_rule(message)
        if rule is None or not owns_rule(rule, self._tables):
            return None
        rules, _ = self._applied()
        ours = not rule.selectors and rule.spec in rules
        if kind == RTM_NEWRULE and not ours:
            return Drift("policy_rule", f"{rule.describe()} added")
        if kind == RTM_DELRULE and ours:
            return Drift("policy_rule", f"{rule.describe()} deleted")
        return None

    def _route(self, kind: int, message: Any) -> Drift | None:
        route = parse_route(message)
        if route is None or route.table not in self._tables:
            return None
        _, routes = self._applied()
        spec = route.spec()
        ours = spec is not None and spec in routes
        if kind == RTM_NEWROUTE and not ours:
            return Drift("route", f"{route.describe()} added or changed")
        if kind == RTM_DELROUTE and ours:
            return Drift("route", f"{route.describe()} deleted")
        return None
