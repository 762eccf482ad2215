"""The start-up gate: the decision, the source index, ``/egress`` on the real probe server and
``metaleg-supervisor wait-egress`` against it (no kernel: see tests/test_gate_lab.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaleg.config import BindAddress
from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    GatewayRoute,
    NodeDesiredState,
    Role,
    ServiceEgress,
)
from metaleg.state_changes import diff_states
from metaleg.supervisor import http, wait
from metaleg.supervisor.gate import (
    EgressGate,
    GatewayAnswer,
    Source,
    SourceIndex,
    decide,
    parse_query,
)

MARK_B = 0x100000
MARK_C = 0x200000
ROUTE_B = GatewayRoute("node-b", 1, MARK_B, 100001, "127.0.0.1", "::1")
ROUTE_C = GatewayRoute("node-c", 2, MARK_C, 100002, "127.0.0.2", None)
LB4, LB6 = "198.51.100.200", "2001:db8:1::200"


def _service(
    name: str, action: Action, ips: tuple[str, ...], family: Family = Family.IPV4, **extra: Any
) -> ServiceEgress:
    gateway = {Action.SNAT: "node-a", Action.MARK: "node-b", Action.REJECT: None}[action]
    if action == Action.SNAT:
        extra.setdefault("snat_ip", LB4 if family == Family.IPV4 else LB6)
    if action == Action.MARK:
        extra.setdefault("fwmark", MARK_B)
    if action == Action.REJECT:
        extra.setdefault("reason", "no ServiceL2Status names a known gateway node")
    role = {Action.SNAT: Role.GATEWAY, Action.MARK: Role.FORWARDER, Action.REJECT: Role.REJECT}
    return ServiceEgress(
        "mail",
        name,
        role[action],
        gateway,
        (LB4, LB6),
        (FamilyEgress(family, action, ips, **extra),),
    )


def _state(*services: ServiceEgress, routes: tuple[GatewayRoute, ...] = ()) -> NodeDesiredState:
    ordered = tuple(sorted(services, key=lambda s: (s.namespace, s.name)))
    return NodeDesiredState("node-a", 0xF00000, (), (), ordered, routes)


def _source(action: Action, since: int = 3, address: str | None = "127.0.0.1") -> Source:
    service = _service("relay", action, ("10.244.1.10",))
    return Source(service, service.families[0], since, address if action == Action.MARK else None)


APPLIED = {"firewall": 5, "routing": 5}


# --- the decision ----------------------------------------------------------------------------


def test_decisions() -> None:
    ip = "10.244.1.10"
    snat = decide(ip, _source(Action.SNAT), 5, APPLIED, node="node-a")
    assert snat.status == 200 and snat.ask is None
    assert snat.body == msgspec.json.decode(msgspec.json.encode(snat.body), type=type(snat.body))
    assert (snat.body.service, snat.body.role, snat.body.gateway_node) == (
        "mail/relay",
        "gateway",
        "node-a",
    )
    assert LB4 in snat.body.reason and snat.body.generation == 5

    lagging = decide(ip, _source(Action.SNAT, since=6), 6, APPLIED, node="node-a")
    assert lagging.status == 503 and "not yet applied" in lagging.body.reason
    assert "firewall has 5" in lagging.body.reason
    assert decide(ip, _source(Action.SNAT), 5, {"firewall": 5}).status == 503  # routing: 0

    unknown = decide(ip, None, 5, APPLIED, node="node-a")
    assert (
        unknown.status == 404 and unknown.body.service is None and "node-a" in unknown.body.reason
    )
    assert decide(ip, None, 0, {}).status == 503  # no state yet: not "unknown"

    reject = decide(ip, _source(Action.REJECT), 5, APPLIED)
    assert reject.status == 503 and reject.body.role == "reject"
    assert reject.body.reason.startswith("no usable gateway: rejecting: no ServiceL2Status")

    mark = decide(ip, _source(Action.MARK), 5, APPLIED)
    assert mark.status == 503 and mark.ask == "127.0.0.1" and mark.body.role == "forwarder"
    ok = decide(ip, _source(Action.MARK), 5, APPLIED, GatewayAnswer(200, "egress via"))
    assert ok.status == 200 and ok.ask is None and "node-b" in ok.body.reason
    assert LB4 in ok.body.reason
    not_yet = decide(ip, _source(Action.MARK), 5, APPLIED, GatewayAnswer(404, "not a source"))
    assert not_yet.status == 503 and "not programmed yet: not a source" in not_yet.body.reason
    down = decide(ip, _source(Action.MARK), 5, APPLIED, GatewayAnswer(None, "timed out"))
    assert down.status == 503 and "unreachable: timed out" in down.body.reason
    no_route = decide(ip, _source(Action.MARK, address=None), 5, APPLIED)
    assert no_route.status == 503 and no_route.ask is None
    # A forwarder asked as if it were the gateway never asks further.
    scoped = decide(ip, _source(Action.MARK), 5, APPLIED, gateway_scope=True)
    assert scoped.status == 503 and scoped.ask is None and "not the gateway" in scoped.body.reason
    assert decide(ip, _source(Action.SNAT), 5, APPLIED, gateway_scope=True).status == 200


@given(
    action=st.sampled_from([*Action, None]),
    since=st.integers(1, 8),
    generation=st.integers(0, 8),
    firewall=st.integers(0, 8),
    routing=st.integers(0, 8),
    gateway=st.sampled_from([None, (200, "ok"), (503, "x"), (404, "y"), (None, "down")]),
    gateway_scope=st.booleans(),
)
def test_200_only_when_programmed_here_and_at_the_gateway(
    action: Action | None,
    since: int,
    generation: int,
    firewall: int,
    routing: int,
    gateway: tuple[int | None, str] | None,
    gateway_scope: bool,
) -> None:
    source = _source(action, since) if action is not None else None
    applied = {"firewall": firewall, "routing": routing}
    answer = GatewayAnswer(*gateway) if gateway is not None else None
    verdict = decide(
        "10.244.1.10", source, generation, applied, answer, gateway_scope=gateway_scope
    )
    assert verdict.status in (200, 404, 503)
    assert verdict.body.generation == generation and verdict.body.reason
    assert "\n" not in msgspec.json.encode(verdict.body).decode()
    if verdict.status == 200:
        assert source is not None and generation
        assert min(firewall, routing) >= since
        assert action == Action.SNAT or (
            action == Action.MARK
            and not gateway_scope
            and gateway is not None
            and gateway[0] == 200
        )
    if verdict.status == 404:
        assert source is None and generation
    if verdict.ask is not None:
        assert action == Action.MARK and answer is None and verdict.status == 503


def test_queries() -> None:
    assert parse_query("ip=10.0.0.1") == ("10.0.0.1", False)
    assert parse_query("ip=2001:DB8::0001&scope=gateway") == ("2001:db8::1", True)
    assert parse_query("ip=fd00%3A%3A1") == ("fd00::1", False)
    for bad in ("", "ip=", "ip=10.0.0.256", "ip=a&ip=b", "ip=10.0.0.1&scope=x", "ip=fe80::1%eth0"):
        with pytest.raises(ValueError):
            parse_query(bad)


# --- the index -------------------------------------------------------------------------------

IPS = [f"10.244.1.{n}" for n in range(10, 16)] + [f"fd00:10:244:1::{n}" for n in range(10, 13)]

_service_strategy = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from([Action.SNAT, Action.MARK, Action.REJECT]),
    st.sampled_from([MARK_B, MARK_C]),
    st.sets(st.sampled_from(IPS), max_size=4),
)


def _build(spec: list[tuple[str, Action, int, set[str]]], routes: int) -> NodeDesiredState:
    """A state from drawn Services (an IP goes to the first Service by name, as the watcher
    does) and a drawn route variant."""
    claimed: set[str] = set()
    services = {}
    for name, action, fwmark, ips in sorted(spec, key=lambda s: s[0]):
        if name in services:
            continue
        families = []
        for family in (Family.IPV4, Family.IPV6):
            mine = sorted(ip for ip in ips - claimed if (":" in ip) == (family == Family.IPV6))
            if not mine:
                continue
            extra: dict[str, Any] = {
                Action.SNAT: {"snat_ip": LB4 if family == Family.IPV4 else LB6},
                Action.MARK: {"fwmark": fwmark},
                Action.REJECT: {"reason": "no gateway"},
            }[action]
            families.append(FamilyEgress(family, action, tuple(mine), **extra))
        claimed |= ips
        services[name] = ServiceEgress(
            "mail", name, Role.NONE, "node-b", (LB4, LB6), tuple(families)
        )
    route_b = (
        ROUTE_B if routes != 2 else msgspec.structs.replace(ROUTE_B, next_hop_ipv4="127.0.0.9")
    )
    chosen = {0: (route_b,), 1: (route_b, ROUTE_C), 2: (route_b,)}[routes]
    return _state(*services.values(), routes=chosen)


def _treatment(state: NodeDesiredState, ip: str) -> tuple[Any, ...] | None:
    """Everything the kernel does for ``ip`` in ``state`` (by a scan, the reference)."""
    for service in state.services:
        for entry in service.families:
            if ip in entry.source_ips:
                route = next((r for r in state.routes if r.fwmark == entry.fwmark), None)
                return (service.key, entry.family, entry.action, entry.snat_ip, entry.fwmark, route)
    return None


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(_service_strategy, max_size=3), st.integers(0, 2)),
        min_size=1,
        max_size=8,
    )
)
def test_index_matches_a_scan_and_knows_since_when(
    history: list[tuple[list[tuple[str, Action, int, set[str]]], int]],
) -> None:
    index = SourceIndex()
    states: list[NodeDesiredState] = []
    for spec, routes in history:
        state = _build(spec, routes)
        delta = diff_states(states[-1], state) if states else None
        if states and states[-1] == state:
            continue  # the supervisor numbers distinct states only
        states.append(state)
        generation = len(states)
        index.update(generation, state, delta)
        assert index.generation == generation
        for ip in IPS:
            found = index.find(ip)
            now = _treatment(state, ip)
            if now is None:
                assert found is None
                continue
            assert found is not None
            assert (found.service.key, found.entry.family, found.entry.action) == now[:3]
            # since: the first generation of the run of states that treat ip as now.
            since = generation
            while since > 1 and _treatment(states[since - 2], ip) == now:
                since -= 1
            assert found.since == since, (ip, [_treatment(s, ip) for s in states])
            if found.entry.action == Action.MARK:
                route = now[5]
                hop = (
                    None
                    if route is None
                    else (route.next_hop_ipv6 if ":" in ip else route.next_hop_ipv4)
                )
                assert found.gateway_address == hop


def test_a_generation_that_does_not_follow_rebuilds_conservatively() -> None:
    index = SourceIndex()
    first = _state(_service("relay", Action.SNAT, ("10.244.1.10",)))
    index.update(1, first, None)
    second = _state(_service("relay", Action.SNAT, ("10.244.1.10", "10.244.1.11")))
    index.update(2, second, diff_states(first, second))
    found = index.find("10.244.1.10")
    assert found is not None and found.since == 1
    index.update(4, second, None)  # generation 3 missed: nothing is known to be older
    found = index.find("10.244.1.10")
    assert found is not None and found.since == 4


class _NoServices:
    """A state whose Services must not be read (a change says everything needed)."""

    routes = ()

    @property
    def services(self) -> Any:
        raise AssertionError("the index scanned the whole state")


def test_a_change_costs_its_services_not_the_state() -> None:
    count = 5000
    services = [
        _service(f"svc-{n:05d}", Action.SNAT, (f"10.{n // 250}.{n % 250}.10",))
        for n in range(count)
    ]
    state = _state(*services)
    index = SourceIndex()
    index.update(1, state, None)
    assert len(index) == count
    changed = _service("svc-02500", Action.SNAT, ("10.10.0.10", "10.99.0.1"))
    new = _state(*services[:2500], changed, *services[2501:])
    delta = diff_states(state, new)
    assert delta is not None and len(delta.upserted) == 1
    index.update(2, _NoServices(), delta)  # type: ignore[arg-type]
    found = index.find("10.99.0.1")
    assert found is not None and found.since == 2 and found.service.name == "svc-02500"
    assert index.find("10.10.0.10").since == 1  # type: ignore[union-attr]
    # Answers come from the index alone (its state is gone): every source is found.
    gate = EgressGate("node-a", 1, lambda: {"firewall": 2, "routing": 2})
    gate._index = index
    statuses = Counter(gate.answer(f"ip=10.{n % 20}.{n % 250}.10")[0] for n in range(5000))
    assert statuses == Counter({200: 5000})
    assert gate.answer("ip=10.250.0.10")[0] == 404


# --- /egress on the real probe server --------------------------------------------------------


class Node:
    """A gate behind the real probe server on 127.0.0.1, with workers' applied generations."""

    def __init__(self, name: str, gateway_port: int = 0) -> None:
        self.applied = {"firewall": 0, "routing": 0}
        self.gate = EgressGate(name, gateway_port, lambda: self.applied)
        self.server = http.serve_probes(
            BindAddress("127.0.0.1", 0), lambda: (True, ()), lambda: (True, ()), self.gate.answer
        )
        self.port = self.server.server_address[1]

    def get(self, query: str) -> tuple[int, dict[str, Any], str]:
        url = f"http://127.0.0.1:{self.port}/egress?{query}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status, data, kind = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, data, kind = error.code, error.read(), error.headers
        assert data.endswith(b"\n") and data.count(b"\n") == 1, data
        return status, json.loads(data), kind["Content-Type"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nodes() -> Iterator[tuple[Node, Node]]:
    """A gateway node and a forwarder that asks it (its gateway route's next hop 127.0.0.1)."""
    gateway = Node("node-b")
    forwarder = Node("node-a", gateway_port=gateway.port)
    try:
        yield gateway, forwarder
    finally:
        forwarder.close()
        gateway.close()


POD = "10.244.1.10"
SUPERVISOR = os.path.join(os.path.dirname(sys.executable), "metaleg-supervisor")
FIELDS = ["ip", "service", "role", "gateway_node", "generation", "reason"]


def test_egress_endpoint_answers(nodes: tuple[Node, Node]) -> None:
    gateway, forwarder = nodes
    status, body, kind = forwarder.get(f"ip={POD}")
    assert (status, kind) == (503, "application/json") and list(body) == FIELDS
    assert "no desired state" in body["reason"]

    gateway.gate.observe(1, _state(_service("relay", Action.SNAT, (POD,))), None)
    forwarder.gate.observe(
        1, _state(_service("relay", Action.MARK, (POD,)), routes=(ROUTE_B,)), None
    )
    assert gateway.get(f"ip={POD}")[0] == 503  # not applied yet
    gateway.applied.update(firewall=1, routing=1)
    status, body, _ = gateway.get(f"ip={POD}")
    assert status == 200 and body == {
        "ip": POD,
        "service": "mail/relay",
        "role": "gateway",
        "gateway_node": "node-a",
        "generation": 1,
        "reason": f"egress via node node-b (the gateway) as {LB4}",
    }
    status, body, _ = forwarder.get(f"ip={POD}")
    assert status == 503 and "not yet applied on node node-a" in body["reason"]
    forwarder.applied.update(firewall=1, routing=1)
    status, body, _ = forwarder.get(f"ip={POD}")
    assert status == 200 and body["role"] == "forwarder" and body["gateway_node"] == "node-b"

    # The gateway loses the pod: the forwarder says so with the gateway's reason.
    gateway.gate.observe(2, _state(_service("relay", Action.SNAT, ("10.244.1.99",))), None)
    gateway.applied.update(firewall=2, routing=2)
    status, body, _ = forwarder.get(f"ip={POD}")
    assert status == 503 and "gateway node node-b not programmed yet" in body["reason"]
    assert "is not a source of a labelled Service on node node-b" in body["reason"]
    # The forwarder asked as a gateway does not ask on.
    status, body, _ = forwarder.get(f"ip={POD}&scope=gateway")
    assert status == 503 and "not the gateway" in body["reason"]

    assert forwarder.get("ip=10.9.9.9")[0] == 404
    for query in ("", "ip=nonsense", "ip=1.2.3.4&scope=all"):
        status, body, _ = forwarder.get(query)
        assert status == 400 and list(body) == FIELDS and body["reason"]
    # The probes still answer as before.
    with urllib.request.urlopen(f"http://127.0.0.1:{forwarder.port}/readyz", timeout=5) as r:
        assert r.status == 200 and r.read() == b"ok\n"


def test_an_unreachable_gateway_is_a_503_within_about_a_second() -> None:
    forwarder = Node("node-a", gateway_port=1)  # nothing listens on 127.0.0.1:1
    try:
        forwarder.gate.observe(
            1, _state(_service("relay", Action.MARK, (POD,)), routes=(ROUTE_B,)), None
        )
        forwarder.applied.update(firewall=1, routing=1)
        start = time.monotonic()
        status, body, _ = forwarder.get(f"ip={POD}")
        assert status == 503 and "unreachable" in body["reason"]
        assert time.monotonic() - start < 8  # bounded by the 1 s gateway timeout, not hanging
    finally:
        forwarder.close()


def test_a_silent_gateway_costs_the_timeout_only() -> None:
    import socket

    with socket.socket() as silent:  # accepts (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        forwarder = Node("node-a", gateway_port=silent.getsockname()[1])
        try:
            forwarder.gate.observe(
                1, _state(_service("relay", Action.MARK, (POD,)), routes=(ROUTE_B,)), None
            )
            forwarder.applied.update(firewall=1, routing=1)
            start = time.monotonic()
            status, body, _ = forwarder.get(f"ip={POD}")
            assert status == 503 and "unreachable" in body["reason"], body
            assert time.monotonic() - start < 8  # the 1 s gateway timeout, not a hang
        finally:
            forwarder.close()


# --- wait-egress ------------------------------------------------------------------------------


def _wait_egress(*argv: str, env: dict[str, str] | None = None, timeout: float = 30) -> Any:
    return subprocess.run(
        [SUPERVISOR, "wait-egress", *argv],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=timeout,
    )


def test_wait_egress_waits_for_200(nodes: tuple[Node, Node]) -> None:
    gateway, _ = nodes
    state = _state(_service("relay", Action.SNAT, (POD,)))

    def program_later() -> None:
        time.sleep(1.0)
        gateway.gate.observe(1, state, None)
        gateway.applied.update(firewall=1, routing=1)

    thread = threading.Thread(target=program_later)
    thread.start()
    start = time.monotonic()
    result = _wait_egress(
        "--timeout",
        "20s",
        env={
            "POD_IP": POD,
            "HOST_IP": "127.0.0.1",
            "HEALTH_PROBE_BIND_ADDRESS": f":{gateway.port}",
        },
    )
    thread.join()
    assert result.returncode == 0, result.stderr
    assert 1.0 <= time.monotonic() - start < 15
    assert "egress ready" in result.stdout and LB4 in result.stdout
    assert "waiting: 503: no desired state yet" in result.stderr


def test_wait_egress_times_out_with_the_last_reason(nodes: tuple[Node, Node]) -> None:
    gateway, _ = nodes
    start = time.monotonic()
    result = _wait_egress(
        "--ip",
        "10.9.9.9",
        "--node-address",
        "127.0.0.1",
        "--port",
        str(gateway.port),
        "--timeout",
        "1500ms",
    )
    assert result.returncode == 1 and result.stderr.splitlines()[-1].endswith(
        "no desired state yet on node node-b (the watcher has not published one)"
    ), result.stderr
    assert 1.4 <= time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        ((), {"HOST_IP": "127.0.0.1"}, "no pod IP"),
        (("--ip", "10.0.0.1"), {}, "no node address"),
        (("--ip", "x", "--node-address", "h"), {}, "invalid pod IP"),
        (("--ip", "10.0.0.1", "--node-address", "h", "--timeout", "soon"), {}, "--timeout"),
        (("--ip", "10.0.0.1", "--node-address", "h", "--timeout", "0"), {}, "positive"),
        (("--ip", "10.0.0.1", "--node-address", "h", "--port", "70000"), {}, "--port"),
        (("--ip", "10.0.0.1", "--node-address", "h"), {"HEALTH_PROBE_BIND_ADDRESS": "0"}, "--port"),
        (("--ip", "10.0.0.1", "--node-address", "h", "--bogus"), {}, "unrecognized"),
    ],
)
def test_wait_egress_bad_arguments_exit_2_with_one_line(
    argv: tuple[str, ...], env: dict[str, str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert wait.main(list(argv), env) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and err.startswith(wait.PROG), err


def test_wait_egress_polls_every_half_second_until_the_deadline() -> None:
    clock = [0.0]
    asked: list[float] = []

    def ask(target: wait.WaitTarget, timeout: float) -> wait.Answer:
        asked.append(clock[0])
        assert 0 < timeout <= wait.REQUEST_TIMEOUT
        return (None, "refused") if len(asked) < 3 else (404, "unknown")

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    lines: list[str] = []
    target = wait.WaitTarget("10.0.0.1", "127.0.0.1", 1, 2.2)
    status, reason = wait.wait_for_egress(
        target, ask=ask, clock=lambda: clock[0], sleep=sleep, progress=lines.append
    )
    assert (status, reason) == (404, "unknown")
    assert asked == [0.0, 0.5, 1.0, 1.5, 2.0, 2.2]
    assert lines == ["no answer: refused", "404: unknown"]  # each new reason once
