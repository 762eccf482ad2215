"""The start-up gate: ``GET /egress?ip=<pod IP>`` on HEALTH_PROBE_BIND_ADDRESS.

A pod (its init container, ``metaleg-supervisor wait-egress``) asks its node's
agent whether its egress is in place before the application starts:

- ``200``: the IP is a source of a labelled Service, and the firewall and routing
  workers have applied a generation that treats it as the current state does; on
  a forwarder (the IP's action is MARK) the gateway node answers 200 too (asked
  over its own health port, the same port as ours, with ``scope=gateway``);
- ``503`` with the reason while it is not (not applied here yet; the gateway node
  has not programmed it or cannot be reached; no usable gateway: rejecting);
- ``404``: the IP belongs to no labelled Service in this node's state;
- ``400``: a bad query.

Every answer is one line of JSON (:class:`GateBody`). The decision is the pure
function :func:`decide`. Lookups go through a :class:`SourceIndex`: which Service
and treatment each source IP has, and since which generation that treatment is
unchanged. The supervisor updates it with each new generation (from the change
it forwards: the cost follows the change, not the number of Services); a request
reads it under a lock held only for a dictionary lookup, and never blocks the
supervisor's loop for longer.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import msgspec

from metaleg.config import Config
from metaleg.ipc import StateDelta
from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    GatewayRoute,
    NodeDesiredState,
    ServiceEgress,
)

EGRESS_PATH = "/egress"
GATEWAY_TIMEOUT = 1.0
"""How long a forwarder waits for the gateway node's answer (connect, then read)."""
GATEWAY_SCOPE = "gateway"
"""``scope=gateway``: the question a forwarder asks the gateway node: 200 only when *this*
node SNATs the IP (never asks further, so two nodes that forward to each other during a
move cannot ask each other in a loop)."""
APPLYING_WORKERS = ("firewall", "routing")
"""The workers whose applied generation must contain an IP's treatment."""
ROLES = {Action.SNAT: "gateway", Action.MARK: "forwarder", Action.REJECT: "reject"}
"""The role shown for an IP: what this node does with its traffic."""


class GateBody(msgspec.Struct, frozen=True):
    """The JSON body of every answer (one line)."""

    ip: str
    service: str | None
    """``namespace/name`` of the labelled Service the IP is a source of (None: none)."""
    role: str | None
    """``gateway``, ``forwarder`` or ``reject``: this node's treatment of the IP's traffic."""
    gateway_node: str | None
    generation: int
    """The desired-state generation the answer is based on (0: none yet)."""
    reason: str


class GatewayAnswer(NamedTuple):
    """What the gateway node answered (``status`` None: no answer, ``reason`` says why)."""

    status: int | None
    reason: str


class Verdict(NamedTuple):
    """An answer of the gate."""

    status: int
    body: GateBody
    ask: str | None = None
    """Set when the answer waits for the gateway node: its address, to ask and then decide
    again with its :class:`GatewayAnswer` (``status`` is then 503 for the case it does not
    answer)."""


class Source(NamedTuple):
    """What the index knows of one source IP."""

    service: ServiceEgress
    entry: FamilyEgress
    since: int
    """The oldest generation from which this IP's treatment (and, for MARK, the route to its
    gateway) is what it is now: applied once both workers have applied this one."""
    gateway_address: str | None = None
    """For MARK: the gateway node's address in the IP's family (the route's next hop)."""


class _Indexed(NamedTuple):
    service: ServiceEgress
    entry: FamilyEgress
    since: int


def _same_treatment(before: _Indexed, service: ServiceEgress, entry: FamilyEgress) -> bool:
    return (
        before.service.key == service.key
        and before.entry.family == entry.family
        and before.entry.action == entry.action
        and before.entry.snat_ip == entry.snat_ip
        and before.entry.fwmark == entry.fwmark
    )


class SourceIndex:
    """Source IP -> (Service, family treatment, since which generation), for one node.

    :meth:`update` takes each new generation in order, with the change from the one
    before (the supervisor's :class:`~metaleg.ipc.StateDelta`): only the IPs of the
    Services it names are touched. A generation that does not follow, or comes
    without a change, rebuilds the index with every IP new at that generation
    (conservative: the answer waits for the workers to apply it).
    """

    def __init__(self) -> None:
        self.generation = 0
        self._services: dict[str, ServiceEgress] = {}
        self._sources: dict[str, _Indexed] = {}
        self._routes: dict[int, tuple[GatewayRoute, int]] = {}
        self._routes_gone: dict[int, int] = {}
        """Firewall mark -> the generation its route went away in (a source marked with it
        is treated differently since: no route to its gateway)."""

    def __len__(self) -> int:
        return len(self._sources)

    def update(self, generation: int, state: NodeDesiredState, delta: StateDelta | None) -> None:
        """Take generation ``generation`` (``state``; ``delta``: the change from the one before)."""
        if delta is None or not self.generation or generation != self.generation + 1:
            self._rebuild(generation, state)
            return
        dropped: dict[str, _Indexed] = {}
        for key in [*delta.removed, *(service.key for service in delta.upserted)]:
            service = self._services.pop(key, None)
            if service is None:
                continue
            for entry in service.families:
                for ip in entry.source_ips:
                    indexed = self._sources.get(ip)
                    if indexed is not None and indexed.service is service:
                        dropped[ip] = self._sources.pop(ip)
        for service in delta.upserted:
            self._add(service, generation, dropped)
        if delta.routes is not None:
            self._take_routes(delta.routes, generation)
        self.generation = generation

    def _rebuild(self, generation: int, state: NodeDesiredState) -> None:
        self._services.clear()
        self._sources.clear()
        self._routes.clear()
        self._routes_gone.clear()
        for service in state.services:
            self._add(service, generation, {})
        self._take_routes(state.routes, generation)
        self.generation = generation

    def _add(self, service: ServiceEgress, generation: int, before: Mapping[str, _Indexed]) -> None:
        self._services[service.key] = service
        for entry in service.families:
            for ip in entry.source_ips:
                old = before.get(ip)
                since = (
                    old.since
                    if old is not None and _same_treatment(old, service, entry)
                    else generation
                )
                # A state has each IP in one Service (the first by namespace/name).
                self._sources.setdefault(ip, _Indexed(service, entry, since))

    def _take_routes(self, routes: Iterable[GatewayRoute], generation: int) -> None:
        taken: dict[int, tuple[GatewayRoute, int]] = {}
        for route in routes:
            old = self._routes.get(route.fwmark)
            taken[route.fwmark] = (
                route,
                old[1] if old is not None and old[0] == route else generation,
            )
            self._routes_gone.pop(route.fwmark, None)
        for fwmark in self._routes.keys() - taken.keys():
            self._routes_gone[fwmark] = generation
        self._routes = taken

    def find(self, ip: str) -> Source | None:
        """What the index holds for ``ip`` (canonical text), or None."""
        indexed = self._sources.get(ip)
        if indexed is None:
            return None
        if indexed.entry.action != Action.MARK or indexed.entry.fwmark is None:
            return Source(indexed.service, indexed.entry, indexed.since)
        found = self._routes.get(indexed.entry.fwmark)
        if found is None:
            gone = self._routes_gone.get(indexed.entry.fwmark, 0)
            return Source(indexed.service, indexed.entry, max(indexed.since, gone))
        route, route_since = found
        address = (
            route.next_hop_ipv4 if indexed.entry.family == Family.IPV4 else route.next_hop_ipv6
        )
        return Source(indexed.service, indexed.entry, max(indexed.since, route_since), address)


def _lb_ip(service: ServiceEgress, family: Family) -> str | None:
    return next(
        (ip for ip in service.lb_ips if ipaddress.ip_address(ip).version == int(family)), None
    )


def decide(
    ip: str,
    source: Source | None,
    generation: int,
    applied: Mapping[str, int],
    gateway: GatewayAnswer | None = None,
    *,
    node: str = "",
    gateway_scope: bool = False,
) -> Verdict:
    """The gate's answer for ``ip``.

    ``source``: what the index of generation ``generation`` holds for it; ``applied``:
    the generation each worker has applied (:data:`APPLYING_WORKERS` count);
    ``gateway``: the gateway node's answer, None when not asked yet (a forwarder's
    answer then has ``ask`` set); ``gateway_scope``: the question comes from a
    forwarder, 200 only when this node SNATs the IP.
    """

    def verdict(status: int, reason: str, ask: str | None = None) -> Verdict:
        body = GateBody(
            ip=ip,
            service=source.service.key if source else None,
            role=ROLES[source.entry.action] if source else None,
            gateway_node=source.service.gateway_node if source else None,
            generation=generation,
            reason=reason,
        )
        return Verdict(status, body, ask)

    here = f"node {node}" if node else "this node"
    if not generation:
        return verdict(503, f"no desired state yet on {here} (the watcher has not published one)")
    if source is None:
        return verdict(404, f"{ip} is not a source of a labelled Service on {here}")
    entry, gateway_node = source.entry, source.service.gateway_node
    if entry.action == Action.REJECT:
        return verdict(503, f"no usable gateway: rejecting: {entry.reason or 'unknown reason'}")
    if gateway_scope and entry.action != Action.SNAT:
        return verdict(503, f"{here} is not the gateway: it forwards to {gateway_node}")
    lagging = [name for name in APPLYING_WORKERS if applied.get(name, 0) < source.since]
    if lagging:
        held = ", ".join(f"{name} has {applied.get(name, 0)}" for name in APPLYING_WORKERS)
        return verdict(503, f"not yet applied on {here}: needs generation {source.since}, {held}")
    if entry.action == Action.SNAT:
        return verdict(200, f"egress via {here} (the gateway) as {entry.snat_ip}")
    if source.gateway_address is None:
        return verdict(503, f"no route to gateway node {gateway_node} in this family yet")
    if gateway is None:
        return verdict(
            503, f"gateway node {gateway_node} not asked yet", ask=source.gateway_address
        )
    if gateway.status == 200:
        lb_ip = _lb_ip(source.service, entry.family)
        return verdict(200, f"egress via gateway node {gateway_node} as {lb_ip}")
    if gateway.status is None:
        return verdict(
            503,
            f"gateway node {gateway_node} ({source.gateway_address}) unreachable: {gateway.reason}",
        )
    return verdict(503, f"gateway node {gateway_node} not programmed yet: {gateway.reason}")


def ask_gateway(
    address: str, port: int, ip: str, timeout: float = GATEWAY_TIMEOUT
) -> GatewayAnswer:
    """Ask the gateway node at ``address:port`` whether it SNATs ``ip`` (``scope=gateway``)."""
    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        query = urllib.parse.urlencode({"ip": ip, "scope": GATEWAY_SCOPE})
        connection.request("GET", f"{EGRESS_PATH}?{query}")
        response = connection.getresponse()
        data = response.read(65536)
    except (OSError, http.client.HTTPException) as error:
        return GatewayAnswer(None, str(error) or type(error).__name__)
    finally:
        connection.close()
    return GatewayAnswer(response.status, reason_of(data))


def reason_of(data: bytes) -> str:
    """The ``reason`` of a gate answer's body (the body's first line when it is no JSON)."""
    text = data.decode(errors="replace")
    try:
        reason = json.loads(text).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return reason if isinstance(reason, str) else (text.strip().splitlines() or [""])[0]


class BadQuery(ValueError):
    """The query string is not ``ip=<address>[&scope=gateway]``."""


def parse_query(query: str) -> tuple[str, bool]:
    """``(canonical IP, gateway scope)`` from a query string, or :class:`BadQuery`."""
    try:
        fields = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise BadQuery(f"malformed query {query[:100]!r}") from None
    ips = fields.get("ip", [])
    if not ips:
        raise BadQuery("missing query parameter ip (GET /egress?ip=<pod IP>)")
    if len(ips) > 1:
        raise BadQuery("give one ip")
    scopes = fields.get("scope", [])
    if scopes not in ([], [GATEWAY_SCOPE]):
        raise BadQuery(f"scope must be {GATEWAY_SCOPE!r}")
    try:
        address = ipaddress.ip_address(ips[0])
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise ValueError("scoped")
    except ValueError:
        raise BadQuery(f"invalid ip {ips[0][:100]!r}: not an IPv4 or IPv6 address") from None
    return str(address), bool(scopes)


def _encode(verdict: Verdict) -> bytes:
    return msgspec.json.encode(verdict.body) + b"\n"


class EgressGate:
    """The gate of one supervisor: the index (fed by :meth:`observe`) and the answers.

    :meth:`observe` runs in the supervisor's loop, :meth:`answer` in the probe
    server's threads; they share only the index, under a lock that a request holds
    for one lookup.
    """

    def __init__(
        self,
        node: str,
        port: int,
        applied: Callable[[], Mapping[str, int]],
        ask: Callable[[str, int, str], GatewayAnswer] = ask_gateway,
    ) -> None:
        """``port``: the health port of every node (the gateway's too); ``applied``: the
        generation each worker has applied; ``ask``: how the gateway node is asked."""
        self.node = node
        self.port = port
        self.applied = applied
        self.ask = ask
        self._index = SourceIndex()
        self._lock = threading.Lock()

    def observe(self, generation: int, state: NodeDesiredState, delta: StateDelta | None) -> None:
        """A new generation (every one, in order; ``delta``: the change from the one before,
        None when there is none)."""
        with self._lock:
            self._index.update(generation, state, delta)

    def lookup(self, ip: str) -> tuple[int, Source | None]:
        """(the index's generation, what it holds for ``ip``)."""
        with self._lock:
            return self._index.generation, self._index.find(ip)

    def answer(self, query: str) -> tuple[int, bytes]:
        """The HTTP status and JSON body for ``GET /egress?<query>``."""
        try:
            ip, gateway_scope = parse_query(query)
        except BadQuery as error:
            given = urllib.parse.parse_qs(query, keep_blank_values=True).get("ip", [""])[0]
            body = GateBody(
                ip=given[:100],
                service=None,
                role=None,
                gateway_node=None,
                generation=self._index.generation,
                reason=str(error),
            )
            return 400, msgspec.json.encode(body) + b"\n"
        generation, source = self.lookup(ip)
        applied = dict(self.applied())
        verdict = decide(
            ip, source, generation, applied, node=self.node, gateway_scope=gateway_scope
        )
        if verdict.ask is not None:
            gateway = self.ask(verdict.ask, self.port, ip)
            verdict = decide(
                ip,
                source,
                generation,
                applied,
                gateway,
                node=self.node,
                gateway_scope=gateway_scope,
            )
        return verdict.status, _encode(verdict)


def new_gate(config: Config, applied: Callable[[], Mapping[str, int]]) -> EgressGate | None:
    """The supervisor's gate, or None when HEALTH_PROBE_BIND_ADDRESS disables the probes."""
    bind = config.health_probe_bind_address
    return EgressGate(config.node_name, bind.port, applied) if bind is not None else None
