"""Translation between pyroute2's rtnetlink messages and the routing plan's types.

The kernel reports a policy rule as a ``fibmsg`` and a route as an ``rtmsg``,
with attributes metaleg never sets (source selectors, interfaces, metrics,
...); :func:`parse_rule` and :func:`parse_route` keep every one of them, so that
a rule or route in metaleg's space that is not exactly in metaleg's shape is
recognised as foreign and replaced. :func:`rule_arguments` and
:func:`route_arguments` go the other way: the ``IPRoute.rule()`` and
``IPRoute.route()`` keywords that add an object, or delete exactly the one that
was read (not the first one that looks alike).

No I/O here: the backend (:mod:`metaleg.routing.backend`) and the drift watch
(:mod:`metaleg.routing.drift`) read the messages; this module only decodes and
encodes them.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from metaleg.model import Family
from metaleg.routing.plan import KernelRoute, KernelRule, RuleSpec

FIB_RULE_INVERT = 0x2
"""The ``not`` of ``ip rule`` (linux/fib_rules.h)."""

ADDRESS_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_FAMILY_OF = {int(socket.AF_INET): Family.IPV4, int(socket.AF_INET6): Family.IPV6}
_ANY_ADDRESS = {Family.IPV4: "0.0.0.0", Family.IPV6: "::"}

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
        "family": ADDRESS_FAMILY[spec.family],
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
        "family": ADDRESS_FAMILY[route.family],
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
