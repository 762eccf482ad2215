"""The routing backend: executes the plans of :mod:`metaleg.routing.plan` over netlink.

:class:`NetlinkRoutingBackend` implements :class:`metaleg.backend.Backend` for
the routing worker. It reads metaleg's rules and tables with pyroute2 (decoded
by :mod:`metaleg.routing.kernel`), asks :mod:`metaleg.routing.plan` what to
change, and writes the changes, additions before deletions, so a marked packet
always meets its new route, its old route or the fail-closed catch-all, never
``main``. Its drift detector is :class:`metaleg.routing.drift.RoutingDriftWatch`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from metaleg.backend import BackendError
from metaleg.model import Family, NodeDesiredState, fwmask_capacity
from metaleg.routing.drift import RoutingDriftWatch
from metaleg.routing.kernel import (
    ADDRESS_FAMILY,
    parse_route,
    parse_rule,
    route_arguments,
    rule_arguments,
)
from metaleg.routing.plan import (
    RESERVED_TABLES,
    DesiredRouting,
    KernelRoute,
    KernelRule,
    Plan,
    RouteSpec,
    RuleSpec,
    desired_routing,
    family_name,
    owned_tables,
    owns_rule,
    plan_apply,
    plan_resync,
    table_range,
)

log = logging.getLogger(__name__)

# Deletion may remove a different (equivalent-looking) object than intended
# when a foreign rule or route differs from ours only in attributes the kernel
# ignores on deletion; re-reading and re-planning repairs that. Bounded, so a
# kernel that keeps refusing cannot loop us forever.
_MAX_PASSES = 3
_DUMP_RETRIES = 3


@dataclass
class _Outcome:
    """What executing a :class:`Plan` achieved."""

    added_rules: set[RuleSpec] = field(default_factory=set)
    added_routes: set[RouteSpec] = field(default_factory=set)
    deleted_rules: set[RuleSpec] = field(default_factory=set)
    deleted_routes: set[RouteSpec] = field(default_factory=set)
    failed_rules: set[RuleSpec] = field(default_factory=set)
    failed_routes: set[RouteSpec] = field(default_factory=set)
    deleted_anything: bool = False
    errors: list[str] = field(default_factory=list)


def _netlink_error(error: Exception) -> str:
    code = getattr(error, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {code})"
    return f"{type(error).__name__}: {error}"


def _errno(error: Exception) -> int | None:
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return code
    return error.errno if isinstance(error, OSError) else None


class NetlinkRoutingBackend:
    """Routing backend: per-gateway tables and ``fwmark`` rules, plus the fail-closed catch-all.

    Acts on the network namespace of the calling process. Keeps what it last
    applied (the kernel objects it knows to be present) and changes only the
    difference; :meth:`resync` reads the kernel instead, repairs it and removes
    stale objects. Every change adds before it deletes, so a marked packet
    always meets either its new route, its old route or the catch-all, never
    ``main``.
    """

    name = "netlink"

    def __init__(self, table_id_offset: int, fwmask: int) -> None:
        if fwmask_capacity(fwmask) < 1:
            raise ValueError(f"FIREWALL_MASK {fwmask:#x} leaves no mark for a gateway node")
        tables = table_range(table_id_offset, fwmask)
        clashes = sorted(RESERVED_TABLES.intersection(tables))
        if clashes or tables.stop - 1 > 0xFFFFFFFF:
            raise ValueError(
                f"routing tables {tables.start}..{tables.stop - 1} (ROUTE_TABLE_ID_OFFSET "
                f"{table_id_offset}) must avoid reserved ids {clashes} and stay below 2^32"
            )
        self.table_id_offset = table_id_offset
        self.fwmask = fwmask
        self.tables = tables
        self.owned_tables = owned_tables(table_id_offset, fwmask)
        self._ipr: Any = None
        self._families: tuple[Family, ...] = tuple(Family)
        self._rules: set[RuleSpec] = set()
        self._routes: set[RouteSpec] = set()
        self._drift: RoutingDriftWatch | None = None

    # -- the Backend protocol ------------------------------------------------

    def apply(self, state: NodeDesiredState) -> None:
        """Bring rules and tables to ``state``, changing only what differs from the last apply.

        Objects that failed earlier are not in the applied set, so they are
        retried. Raises :class:`BackendError` naming every object that could
        not be rendered, after everything else has been applied.
        """
        desired = self._desired(state)
        outcome = self._execute(plan_apply(self._rules, self._routes, desired), desired)
        self._rules = (self._rules | outcome.added_rules) - outcome.deleted_rules
        self._routes = (self._routes | outcome.added_routes) - outcome.deleted_routes
        self._raise(desired.problems, outcome.errors)

    def resync(self, state: NodeDesiredState) -> None:
        """Read metaleg's rules and tables from the kernel, repair them and delete stale objects."""
        desired = self._desired(state)
        outcome = _Outcome()
        for _ in range(_MAX_PASSES):
            rules, routes = self._read()
            plan = plan_resync(rules, routes, desired)
            if not plan:
                outcome = _Outcome()  # converged: earlier failures have been repaired
                break
            outcome = self._execute(plan, desired)
            if not outcome.deleted_anything:
                break
        self._rules = set(desired.rules - outcome.failed_rules)
        self._routes = set(desired.routes - outcome.failed_routes)
        self._raise(desired.problems, outcome.errors)

    def cleanup(self) -> None:
        """Delete every rule at metaleg's priorities or towards its tables, and flush its tables.

        Both families, catch-all included. Needs no earlier apply; idempotent.
        """
        errors: list[str] = []
        for _ in range(_MAX_PASSES):
            rules, routes = self._read()
            if not rules and not routes:
                errors = []
                break
            outcome = self._execute(
                Plan(delete_rules=tuple(rules), delete_routes=tuple(routes)),
                DesiredRouting(frozenset(), frozenset()),
            )
            errors = outcome.errors
        self._rules = set()
        self._routes = set()
        self._raise((), errors)

    def close(self) -> None:
        """Close the netlink socket (reopened on next use)."""
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def drift_detector(self) -> RoutingDriftWatch:
        """Watches rtnetlink notifications for changes that contradict what is applied."""
        if self._drift is None:
            self._drift = RoutingDriftWatch(lambda: (self._rules, self._routes), self.owned_tables)
        return self._drift

    # -- internals -----------------------------------------------------------

    def _socket(self) -> Any:
        """The netlink socket, opened on first use (the worker may fork after construction)."""
        if self._ipr is None:
            try:
                self._ipr = IPRoute()
                self._families = self._probe_families()
            except Exception as error:
                self.close()
                raise BackendError(
                    f"cannot open a netlink socket: {_netlink_error(error)}"
                ) from error
        return self._ipr

    def _probe_families(self) -> tuple[Family, ...]:
        """The families the kernel supports; a node booted with ipv6.disable=1 has no IPv6 rules."""
        try:
            self._ipr.rule("dump", family=socket.AF_INET6)
        except Exception as error:
            if _errno(error) == errno.EAFNOSUPPORT:
                log.warning("IPv6 is disabled in this kernel: managing IPv4 policy routing only")
                return (Family.IPV4,)
            raise
        return tuple(Family)

    def _desired(self, state: NodeDesiredState) -> DesiredRouting:
        if state.fwmask != self.fwmask:
            raise BackendError(
                f"state of node {state.node} uses FIREWALL_MASK {state.fwmask:#x}, "
                f"the routing backend was started with {self.fwmask:#x}"
            )
        self._socket()  # learns which families the kernel supports
        return desired_routing(state, self.table_id_offset, self.fwmask, self._families)

    def _dump(self, kind: str, family: Family) -> list[Any]:
        """All rules or routes of one family, retrying a dump the kernel interrupted."""
        ipr = self._socket()
        method = ipr.rule if kind == "rule" else ipr.route
        for attempt in range(_DUMP_RETRIES):
            try:
                return list(method("dump", family=ADDRESS_FAMILY[family]))
            except Exception as error:
                if isinstance(error, NetlinkDumpInterrupted) and attempt + 1 < _DUMP_RETRIES:
                    continue  # the rules or routes changed during the dump: read again
                raise BackendError(
                    f"cannot read {family_name(family)} {kind}s: {_netlink_error(error)}"
                ) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self) -> tuple[list[KernelRule], list[KernelRoute]]:
        """The kernel's rules and routes in metaleg's space, both families."""
        rules: list[KernelRule] = []
        routes: list[KernelRoute] = []
        self._socket()  # learns which families the kernel supports
        for family in self._families:
            for message in self._dump("rule", family):
                rule = parse_rule(message)
                if (
                    rule is not None
                    and rule.spec.family == family
                    and owns_rule(rule, self.owned_tables)
                ):
                    rules.append(rule)
            for message in self._dump("route", family):
                route = parse_route(message)
                if (
                    route is not None
                    and route.family == family
                    and route.table in self.owned_tables
                ):
                    routes.append(route)
        return rules, routes

    def _execute(self, plan: Plan, desired: DesiredRouting) -> _Outcome:
        """Run a plan, additions first; one failing object does not stop the others."""
        ipr = self._socket()
        outcome = _Outcome()

        def owner(table: int) -> str:
            # Errors about a gateway's table name its node, for the operator.
            node = desired.nodes.get(table)
            return f"node {node}: " if node else ""

        for rule_spec in plan.add_rules:
            rule = KernelRule(rule_spec)
            what = owner(rule_spec.table) + rule.describe()
            if self._call(ipr.rule, "add", what, rule_arguments(rule), outcome):
                outcome.added_rules.add(rule_spec)
            else:
                outcome.failed_rules.add(rule_spec)
        for route_spec in plan.add_routes:
            # "replace", not "add": a table whose gateway changed is switched
            # atomically, so the old next hop stays until the new one is in.
            what = owner(route_spec.table) + route_spec.describe()
            arguments = route_arguments(KernelRoute.from_spec(route_spec))
            if self._call(ipr.route, "replace", what, arguments, outcome):
                outcome.added_routes.add(route_spec)
            else:
                outcome.failed_routes.add(route_spec)
        for rule in plan.delete_rules:
            if self._call(ipr.rule, "del", rule.describe(), rule_arguments(rule), outcome):
                outcome.deleted_anything = True
                if not rule.selectors:
                    outcome.deleted_rules.add(rule.spec)
        for route in plan.delete_routes:
            if self._call(ipr.route, "del", route.describe(), route_arguments(route), outcome):
                outcome.deleted_anything = True
                spec = route.spec()
                if spec is not None:
                    outcome.deleted_routes.add(spec)
        return outcome

    @staticmethod
    def _call(
        method: Any, command: str, what: str, arguments: dict[str, Any], outcome: _Outcome
    ) -> bool:
        """One netlink request; True when the kernel now holds (or no longer holds) the object.

        ``what`` may start with ``node <name>: ``; the error message keeps that
        prefix in front, so it reads "node X: cannot add <object>: <reason>".
        """
        adding = command != "del"
        try:
            method(command, **arguments)
        except Exception as error:
            code = _errno(error)
            if adding and code == errno.EEXIST:
                return True  # already there (e.g. left by an earlier run)
            if not adding and code in (errno.ENOENT, errno.ESRCH):
                return True  # already gone (e.g. replaced earlier in the same plan)
            head, _, tail = what.partition(": ") if what.startswith("node ") else ("", "", what)
            verb = "add" if adding else "delete"
            message = f"cannot {verb} {tail}: {_netlink_error(error)}"
            outcome.errors.append(f"{head}: {message}" if head else message)
            log.warning("netlink %s failed", verb, extra={"object": what, "error": str(error)})
            return False
        log.info("%s %s", "added" if adding else "deleted", what)
        return True

    @staticmethod
    def _raise(problems: Sequence[str], errors: Sequence[str]) -> None:
        messages = [*problems, *errors]
        if messages:
            raise BackendError("; ".join(messages))
