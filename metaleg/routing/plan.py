"""Policy routing towards gateway nodes: the rules and routes wanted, and the plan to get there.

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

This module is the pure part, unit-tested without a kernel: what the kernel
should hold for a desired state (:func:`desired_routing`), the kernel's objects
in metaleg's terms (:class:`KernelRule`, :class:`KernelRoute`), and the plan
between the two (:func:`plan_apply`, :func:`plan_resync`). Decoding and
encoding rtnetlink messages is :mod:`metaleg.routing.kernel`; reading and
writing the kernel is the backend, :mod:`metaleg.routing.backend`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from metaleg.model import Family, NodeDesiredState, fwmask_capacity

RULE_PRIORITY = 31000
"""Priority of the per-gateway ``fwmark ... lookup <table>`` rules (before ``main`` at 32766)."""
CATCHALL_PRIORITY = RULE_PRIORITY + 1
"""Priority of the fail-closed ``not fwmark 0/<mask> unreachable`` rules: right after the above."""
PRIORITIES = frozenset({RULE_PRIORITY, CATCHALL_PRIORITY})

# Kernel constants (linux/fib_rules.h, linux/rtnetlink.h), spelled out because
# pyroute2 does not export all of them under these names.
FR_ACT_TO_TBL = 1
FR_ACT_UNREACHABLE = 7
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RESERVED_TABLES = frozenset({0, 253, 254, 255})
"""unspec, default, main, local: never read, written or flushed by metaleg."""
IPV6_DEFAULT_METRIC = 1024
"""The metric the kernel gives an IPv6 route added without one (IP6_RT_PRIO_USER)."""


def family_name(family: Family) -> str:
    """``ipv4`` or ``ipv6``, as messages about rules and routes name the family."""
    return "ipv4" if family == Family.IPV4 else "ipv6"


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
            f"{family_name(self.family)} rule {self.priority}: "
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
        return f"{family_name(self.family)} route table {self.table}: default via {self.gateway}"


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
        return f"{family_name(self.family)} route table {self.table}: {kind}{dst}{via}{metric}"


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
