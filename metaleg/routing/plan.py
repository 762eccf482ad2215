"""Policy routing towards gateway nodes, rendered over netlink with pyroute2.

For every gateway node that some Service on this node forwards to, and for each
address family in which that node has a next hop, the kernel gets::

    31000: fwmark <mark>/<FIREWALL_MASK> lookup <table>      (ip rule / ip -6 rule)
    table <table>: default via <gateway node IP>               (ip route / ip -6 route)

and, per family, as soon as the backend has applied anything (even an empty
state), the fail-closed catch-all::

    31001: not fwmark 0/<FIREWALL_MASK> unreachable

A packet the firewall marked for a gateway whose table is missing, empty or
refused by the kernel falls through its ``fwmark`` rule; without the catch-all
it would reach ``main`` and leave with the pod's own address. The catch-all
stays when the agent stops (traffic stays blocked rather than leaking); only
:meth:`NetlinkRoutingBackend.cleanup` removes it.

Why 31000/31001: both rules must be evaluated before ``main`` (32766), with
nothing in between them, so they sit on consecutive priorities well below it.
The values keep clear of the ``local`` rule (0), VRF's l3mdev rule (1000), the
low priorities CNIs and VPN tools pick, and the 32765-downwards range that
``ip rule add`` without ``pref`` hands out (and that the Go original's rules,
added without a priority, ended up at). Fixed priorities let metaleg find its
rules again after a restart without any other bookkeeping.

The module is split into a pure part (what the kernel should hold, what it
holds, and the plan between the two; unit-tested without a kernel) and the
backend that reads the kernel and executes plans.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from metaleg.backend import BackendError
from metaleg.model import Family, NodeDesiredState, fwmask_capacity

if TYPE_CHECKING:
    from metaleg.routing.drift import RoutingDriftWatch

log = logging.getLogger(__name__)

RULE_PRIORITY = 31000
"""Priority of the per-gateway ``fwmark ... lookup <table>`` rules (before ``main`` at 32766)."""
CATCHALL_PRIORITY = RULE_PRIORITY + 1
"""Priority of the fail-closed ``not fwmark 0/<mask> unreachable`` rules: right after the above."""
PRIORITIES = frozenset({RULE_PRIORITY, CATCHALL_PRIORITY})

# Kernel constants (linux/fib_rules.h, linux/rtnetlink.h), spelled out because
# pyroute2 does not export all of them under these names.
FR_ACT_TO_TBL = 1
FR_ACT_UNREACHABLE = 7
FIB_RULE_INVERT = 0x2
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RESERVED_TABLES = frozenset({0, 253, 254, 255})
"""unspec, default, main, local: never read, written or flushed by metaleg."""
IPV6_DEFAULT_METRIC = 1024
"""The metric the kernel gives an IPv6 route added without one (IP6_RT_PRIO_USER)."""

# Deletion may remove a different (equivalent-looking) object than intended
# when a foreign rule or route differs from ours only in attributes the kernel
# ignores on deletion; re-reading and re-planning repairs that. Bounded, so a
# kernel that keeps refusing cannot loop us forever.
_MAX_PASSES = 3
_DUMP_RETRIES = 3

_ADDRESS_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_FAMILY_OF = {int(socket.AF_INET): Family.IPV4, int(socket.AF_INET6): Family.IPV6}
_ANY_ADDRESS = {Family.IPV4: "0.0.0.0", Family.IPV6: "::"}


def _family_name(family: Family) -> str:
    return "ipv4" if family == Family.IPV4 else "ipv6"


# --------------------------------------------------------------------------
# Pure part: desired objects, kernel objects, plans.
# --------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class RuleSpec:
    """One policy rule in metaleg's shape (no selectors besides the firewall mark)."""

    family: Family
    priority: int
    fwmark: int
    fwmask: int
    table: int
    """The table looked up (``FR_ACT_TO_TBL``); 0 for the unreachable catch-all."""
    action: int
    invert: bool

    @property
    def is_catchall(self) -> bool:
        return self.action == FR_ACT_UNREACHABLE

    def describe(self) -> str:
        """The rule as ``ip rule`` would show it, with the family in front."""
        prefix = "not " if self.invert else ""
        if self.action == FR_ACT_TO_TBL:
            target = f"lookup {self.table}"
        elif self.action == FR_ACT_UNREACHABLE:
            target = "unreachable"
        else:
            target = f"action {self.action} table {self.table}"
        return (
            f"{_family_name(self.family)} rule {self.priority}: "
            f"{prefix}fwmark {self.fwmark:#x}/{self.fwmask:#x} {target}"
        )


@dataclass(frozen=True, order=True)
class RouteSpec:
    """One route in metaleg's shape: ``default via <gateway>`` in a table."""

    family: Family
    table: int
    gateway: str
    """Canonical (``ipaddress``-formatted) next-hop address."""

    def describe(self) -> str:
        return f"{_family_name(self.family)} route table {self.table}: default via {self.gateway}"


@dataclass(frozen=True)
class KernelRule:
    """A policy rule as read from the kernel (or one of ours, to be deleted).

    ``selectors`` holds every match condition beyond :class:`RuleSpec` (source,
    interface, port range, ...), as pyroute2 keyword names; a rule with any is
    never one of ours.
    """

    spec: RuleSpec
    selectors: tuple[tuple[str, str | int], ...] = ()

    def describe(self) -> str:
        extra = "".join(f" {name} {value}" for name, value in self.selectors)
        return self.spec.describe() + extra


@dataclass(frozen=True)
class KernelRoute:
    """A route as read from the kernel (or one of ours, to be deleted)."""

    family: Family
    table: int
    dst: str | None
    dst_len: int
    gateway: str | None
    priority: int | None = None
    type: int = RTN_UNICAST
    scope: int = RT_SCOPE_UNIVERSE
    tos: int = 0
    oif: int | None = None
    src: str | None = None
    src_len: int = 0
    multipath: bool = False

    @classmethod
    def from_spec(cls, spec: RouteSpec) -> KernelRoute:
        return cls(spec.family, spec.table, None, 0, spec.gateway)

    def spec(self) -> RouteSpec | None:
        """The :class:`RouteSpec` this route implements, or None if it is not in metaleg's shape."""
        default_metrics = (None, 0) if self.family == Family.IPV4 else (None, IPV6_DEFAULT_METRIC)
        if (
            self.dst_len != 0
            or self.src_len != 0
            or self.type != RTN_UNICAST
            or self.gateway is None
            or self.multipath
            or self.tos != 0
            or self.priority not in default_metrics
        ):
            return None
        return RouteSpec(self.family, self.table, self.gateway)

    def describe(self) -> str:
        dst = "default" if self.dst_len == 0 else f"{self.dst}/{self.dst_len}"
        via = f" via {self.gateway}" if self.gateway else ""
        metric = f" metric {self.priority}" if self.priority else ""
        kind = "" if self.type == RTN_UNICAST else f"type {self.type} "
        return f"{_family_name(self.family)} route table {self.table}: {kind}{dst}{via}{metric}"


@dataclass(frozen=True)
class DesiredRouting:
    """What the kernel should hold for one :class:`NodeDesiredState`."""

    rules: frozenset[RuleSpec]
    routes: frozenset[RouteSpec]
    nodes: Mapping[int, str] = field(default_factory=dict)
    """Table -> gateway node, to name the node in error messages."""
    problems: tuple[str, ...] = ()
    """Gateway routes that were skipped as invalid (reported, never rendered)."""


@dataclass(frozen=True)
class Plan:
    """Changes in the order they must run: every addition before any deletion."""

    add_rules: tuple[RuleSpec, ...] = ()
    add_routes: tuple[RouteSpec, ...] = ()
    delete_rules: tuple[KernelRule, ...] = ()
    delete_routes: tuple[KernelRoute, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add_rules or self.add_routes or self.delete_rules or self.delete_routes)


def table_range(table_id_offset: int, fwmask: int) -> range:
    """metaleg's tables: ``offset + slot`` for the slots ``1..capacity`` of the mask."""
    return range(table_id_offset + 1, table_id_offset + fwmask_capacity(fwmask) + 1)


def owned_tables(table_id_offset: int, fwmask: int) -> range:
    """The tables that resync and cleanup treat as metaleg's.

    metaleg's own range plus table ``offset`` itself: the Go original numbered
    its tables ``offset + slot - 1``, so its leftovers live in
    ``offset .. offset + capacity - 1``. A reserved id is never included.
    """
    tables = table_range(table_id_offset, fwmask)
    if table_id_offset in RESERVED_TABLES:
        return tables
    return range(table_id_offset, tables.stop)


def catchall_rules(fwmask: int, families: Iterable[Family] = tuple(Family)) -> frozenset[RuleSpec]:
    """The fail-closed ``not fwmark 0/<mask> unreachable`` rule of each family."""
    return frozenset(
        RuleSpec(family, CATCHALL_PRIORITY, 0, fwmask, 0, FR_ACT_UNREACHABLE, True)
        for family in families
    )


def desired_routing(
    state: NodeDesiredState,
    table_id_offset: int,
    fwmask: int,
    families: Iterable[Family] = tuple(Family),
) -> DesiredRouting:
    """The rules and routes for ``state``: a pure function.

    Each gateway route with a next hop in a family yields that family's table
    route and ``fwmark`` rule; the catch-alls are always included. A gateway
    route that could not be rendered safely (table outside metaleg's range,
    mark outside the mask, a table or mark used twice, a next hop of the wrong
    family) is left out and reported in ``problems``: its marked packets then
    hit the catch-all.
    """
    enabled = set(families)
    tables = table_range(table_id_offset, fwmask)
    rules: set[RuleSpec] = set(catchall_rules(fwmask, enabled))
    routes: set[RouteSpec] = set()
    nodes: dict[int, str] = {}
    marks: dict[int, str] = {}
    problems: list[str] = []
    for route in state.routes:
        where = f"node {route.node}: table {route.table}, fwmark {route.fwmark:#x}"
        if route.table not in tables:
            problems.append(
                f"{where}: table outside metaleg's range {tables.start}..{tables.stop - 1}"
            )
            continue
        if route.fwmark == 0 or route.fwmark & ~fwmask:
            problems.append(f"{where}: mark is zero or outside FIREWALL_MASK {fwmask:#x}")
            continue
        if route.table in nodes or route.fwmark in marks:
            other = nodes.get(route.table) or marks[route.fwmark]
            problems.append(f"{where}: table or mark already used by node {other}")
            continue
        hops: list[tuple[Family, str]] = []
        for family, address in (
            (Family.IPV4, route.next_hop_ipv4),
            (Family.IPV6, route.next_hop_ipv6),
        ):
            if address is None or family not in enabled:
                continue
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:
                parsed = None
            if parsed is None or parsed.version != family:
                problems.append(f"{where}: next hop {address!r} is not an IPv{int(family)} address")
                continue
            hops.append((family, parsed.compressed))
        nodes[route.table] = route.node
        marks[route.fwmark] = route.node
        for family, gateway in hops:
            routes.add(RouteSpec(family, route.table, gateway))
            rules.add(
                RuleSpec(
                    family, RULE_PRIORITY, route.fwmark, fwmask, route.table, FR_ACT_TO_TBL, False
                )
            )
    return DesiredRouting(frozenset(rules), frozenset(routes), nodes, tuple(problems))


def _ordered_rules(rules: Iterable[RuleSpec]) -> tuple[RuleSpec, ...]:
    # Catch-alls first: the safety net goes in before anything it protects.
    return tuple(sorted(rules, key=lambda rule: (not rule.is_catchall, rule)))


def plan_apply(
    applied_rules: Iterable[RuleSpec],
    applied_routes: Iterable[RouteSpec],
    desired: DesiredRouting,
) -> Plan:
    """The changes from what this backend last applied to ``desired`` (no kernel read)."""
    rules = set(applied_rules)
    routes = set(applied_routes)
    return Plan(
        add_rules=_ordered_rules(desired.rules - rules),
        add_routes=tuple(sorted(desired.routes - routes)),
        delete_rules=tuple(KernelRule(spec) for spec in sorted(rules - desired.rules)),
        delete_routes=tuple(
            KernelRoute.from_spec(spec) for spec in sorted(routes - desired.routes)
        ),
    )


def plan_resync(
    actual_rules: Sequence[KernelRule],
    actual_routes: Sequence[KernelRoute],
    desired: DesiredRouting,
) -> Plan:
    """The changes from what the kernel holds in metaleg's space to ``desired``.

    ``actual_*`` must already be limited to metaleg's priorities and tables.
    Anything there that is not desired (including duplicates, and rules with
    extra selectors) is deleted; anything desired and missing is added.
    """
    kept_rules: set[RuleSpec] = set()
    stale_rules: list[KernelRule] = []
    for rule in actual_rules:
        if not rule.selectors and rule.spec in desired.rules and rule.spec not in kept_rules:
            kept_rules.add(rule.spec)
        else:
            stale_rules.append(rule)
    kept_routes: set[RouteSpec] = set()
    stale_routes: list[KernelRoute] = []
    for route in actual_routes:
        spec = route.spec()
        if spec is not None and spec in desired.routes and spec not in kept_routes:
            kept_routes.add(spec)
        else:
            stale_routes.append(route)
    return Plan(
        add_rules=_ordered_rules(desired.rules - kept_rules),
        add_routes=tuple(sorted(desired.routes - kept_routes)),
        delete_rules=tuple(stale_rules),
        delete_routes=tuple(stale_routes),
    )


def owns_rule(rule: KernelRule, tables: range) -> bool:
    """Whether a kernel rule is in metaleg's space: at its priorities or pointing at its tables.

    The second part catches the Go original's rules, which were added without
    a priority (so the kernel chose one) but looked up tables in this range.
    """
    return rule.spec.priority in PRIORITIES or (
        rule.spec.action == FR_ACT_TO_TBL and rule.spec.table in tables
    )


# --------------------------------------------------------------------------
# Translation between pyroute2 messages and the types above.
# --------------------------------------------------------------------------

# Rule attributes that are match conditions (so a rule carrying one is not in
# our shape), with the value the kernel reports when the condition is unset.
_RULE_SELECTOR_ATTRS: dict[str, int | None] = {
    "FRA_SRC": None,
    "FRA_DST": None,
    "FRA_IIFNAME": None,
    "FRA_OIFNAME": None,
    "FRA_GOTO": None,
    "FRA_FLOW": None,
    "FRA_TUN_ID": 0,
    "FRA_SUPPRESS_IFGROUP": 0xFFFFFFFF,
    "FRA_SUPPRESS_PREFIXLEN": 0xFFFFFFFF,
    "FRA_L3MDEV": 0,
    "FRA_UID_RANGE": None,
    "FRA_IP_PROTO": 0,
    "FRA_SPORT_RANGE": None,
    "FRA_DPORT_RANGE": None,
}
# The selectors pyroute2 can send back in a deletion request, to delete
# exactly the rule we read rather than the first one that looks alike.
_DELETABLE_SELECTORS = frozenset(
    {"src", "src_len", "dst", "dst_len", "iifname", "oifname", "tos", "goto"}
)


def _attr(message: Any, name: str, default: Any = None) -> Any:
    value = message.get_attr(name)
    return default if value is None else value


def parse_rule(message: Any) -> KernelRule | None:
    """A pyroute2 ``fibmsg`` as a :class:`KernelRule` (None for a family we do not handle)."""
    family = _FAMILY_OF.get(int(message["family"]))
    if family is None:
        return None
    fwmark = int(_attr(message, "FRA_FWMARK", 0))
    fwmask = int(_attr(message, "FRA_FWMASK", 0xFFFFFFFF if fwmark else 0))
    spec = RuleSpec(
        family=family,
        priority=int(_attr(message, "FRA_PRIORITY", 0)),
        fwmark=fwmark,
        fwmask=fwmask,
        table=int(_attr(message, "FRA_TABLE", message["table"])),
        action=int(message["action"]),
        invert=bool(int(message["flags"]) & FIB_RULE_INVERT),
    )
    selectors: list[tuple[str, str | int]] = []
    for name, unset in _RULE_SELECTOR_ATTRS.items():
        value = message.get_attr(name)
        if value is None or value == unset:
            continue
        selectors.append((name[4:].lower(), value if isinstance(value, str | int) else str(value)))
    for header in ("src_len", "dst_len", "tos"):
        if message[header]:
            selectors.append((header, int(message[header])))
    return KernelRule(spec, tuple(sorted(selectors)))


def parse_route(message: Any) -> KernelRoute | None:
    """A pyroute2 ``rtmsg`` as a :class:`KernelRoute` (None for a family we do not handle)."""
    family = _FAMILY_OF.get(int(message["family"]))
    if family is None:
        return None
    gateway = message.get_attr("RTA_GATEWAY")
    return KernelRoute(
        family=family,
        table=int(_attr(message, "RTA_TABLE", message["table"])),
        dst=message.get_attr("RTA_DST"),
        dst_len=int(message["dst_len"]),
        gateway=None if gateway is None else ipaddress.ip_address(gateway).compressed,
        priority=message.get_attr("RTA_PRIORITY"),
        type=int(message["type"]),
        scope=int(message["scope"]),
        tos=int(message["tos"]),
        oif=message.get_attr("RTA_OIF"),
        src=message.get_attr("RTA_SRC"),
        src_len=int(message["src_len"]),
        multipath=message.get_attr("RTA_MULTIPATH") is not None,
    )


def rule_arguments(rule: KernelRule) -> dict[str, Any]:
    """pyroute2 ``rule()`` keywords that add (or delete exactly) ``rule``."""
    spec = rule.spec
    arguments: dict[str, Any] = {
        "family": _ADDRESS_FAMILY[spec.family],
        "priority": spec.priority,
        "action": spec.action,
        "flags": FIB_RULE_INVERT if spec.invert else 0,
        "fwmark": spec.fwmark,
        "fwmask": spec.fwmask,
    }
    if spec.table:
        arguments["table"] = spec.table
    for name, value in rule.selectors:
        if name in _DELETABLE_SELECTORS:
            arguments[name] = value
    return arguments


def route_arguments(route: KernelRoute) -> dict[str, Any]:
    """pyroute2 ``route()`` keywords that add (or delete exactly) ``route``.

    The scope is passed as read: IPv4 deletion compares it, and pyroute2 would
    otherwise send "universe", which misses link-scope routes.
    """
    arguments: dict[str, Any] = {
        "family": _ADDRESS_FAMILY[route.family],
        "table": route.table,
        "dst": route.dst if route.dst is not None else _ANY_ADDRESS[route.family],
        "dst_len": route.dst_len,
        "type": route.type,
        "scope": route.scope,
        "tos": route.tos,
    }
    for name in ("gateway", "priority", "oif", "src"):
        value = getattr(route, name)
        if value is not None:
            arguments[name] = value
    if route.src is not None:
        arguments["src_len"] = route.src_len
    return arguments


# --------------------------------------------------------------------------
# The backend.
# --------------------------------------------------------------------------


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
            from metaleg.routing.drift import RoutingDriftWatch  # it imports this module

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
                return list(method("dump", family=_ADDRESS_FAMILY[family]))
            except Exception as error:
                if isinstance(error, NetlinkDumpInterrupted) and attempt + 1 < _DUMP_RETRIES:
                    continue  # the rules or routes changed during the dump: read again
                raise BackendError(
                    f"cannot read {_family_name(family)} {kind}s: {_netlink_error(error)}"
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
