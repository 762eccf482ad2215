"""Drift repair: a real data-plane worker in a namespace, its kernel objects tampered with.

Each test starts the real worker loop (``DataplaneWorker`` around the real
backend) in a fresh network namespace, drives it from a fake supervisor over
the real bus, tampers with the kernel objects from outside (``nft``,
``iptables-legacy``, ``ipset``, ``ip rule``, ``ip route`` in the namespace), then
polls until the state is repaired and checks that the repair was reported
(``Applied.drift``) and counted (``metaleg_drift_repairs_total{kind}``). The
periodic re-sync is an hour away, so only drift detection can repair in time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from metaleg.config import Config
from metaleg.ipc import Applied, EgressCounts, Hello, Snapshot, bind_supervisor, decode, encode
from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    GatewayRoute,
    NodeDesiredState,
    Role,
    ServiceEgress,
)
from tests.netns import namespace, sh
from tests.packet_harness import onlink_test_prefixes
from tests.waiting import wait_until

MASK = 0x00F00000
SLOT1 = 0x00100000
TABLE1 = 100001
REPAIR_TIMEOUT = 10.0
"""Generous: drift is repaired within a second; the periodic re-sync is an hour away."""


def firewall_state() -> NodeDesiredState:
    """A gateway Service SNATed here and a Service forwarded to node-b's slot 1 (both families)."""
    snat = ServiceEgress(
        "mail",
        "relay",
        Role.GATEWAY,
        "node-a",
        ("198.51.100.200", "2001:db8:100::200"),
        (
            FamilyEgress(Family.IPV4, Action.SNAT, ("10.244.1.10",), snat_ip="198.51.100.200"),
            FamilyEgress(Family.IPV6, Action.SNAT, ("fd00:1::10",), snat_ip="2001:db8:100::200"),
        ),
    )
    mark = ServiceEgress(
        "mail",
        "web",
        Role.FORWARDER,
        "node-b",
        ("198.51.100.201",),
        (FamilyEgress(Family.IPV4, Action.MARK, ("10.244.1.11",), fwmark=SLOT1),),
    )
    return NodeDesiredState(
        "node-a",
        MASK,
        ("10.0.0.0/8",),
        ("fc00::/7",),
        (snat, mark),
        routes=(routing_route(),),
    )


def routing_route() -> GatewayRoute:
    return GatewayRoute("node-b", 1, SLOT1, TABLE1, "192.0.2.12", "2001:db8::12")


def routing_state() -> NodeDesiredState:
    return NodeDesiredState("node-a", MASK, (), (), (), routes=(routing_route(),))


def serve(process: str, backend: str, run_dir: str) -> None:
    """The worker process of a test (run inside the namespace by :class:`RunningWorker`)."""
    from metaleg.worker import DataplaneWorker

    config = Config(node_name="node-a", run_dir=run_dir, reconciliation_interval=3600.0)
    if process == "routing":
        from metaleg.routing.backend import NetlinkRoutingBackend

        routing = NetlinkRoutingBackend(config.route_table_id_offset, MASK)
        raise SystemExit(DataplaneWorker("routing", routing, config, routes_only=True).run())
    if backend == "nftables":
        from metaleg.firewall.nftables.backend import NftablesBackend

        raise SystemExit(DataplaneWorker("firewall", NftablesBackend(), config).run())
    from metaleg.firewall.iptables.backend import IptablesBackend

    raise SystemExit(DataplaneWorker("firewall", IptablesBackend(), config).run())


class RunningWorker:
    """A real worker process in namespace ``ns`` and the supervisor's end of its bus."""

    def __init__(self, ns: str, process: str, backend: str, run_dir: str) -> None:
        self.ns = ns
        self.process = process
        self.run_dir = run_dir
        self.metrics_dir = os.path.join(run_dir, "metrics")
        os.makedirs(self.metrics_dir, exist_ok=True)
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket = bind_supervisor(self.context, run_dir)
        self.reports: list[Applied] = []
        self.counts: EgressCounts | None = None
        """The last egress counts the worker sent (it reads them every few seconds)."""
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        code = f"from tests.test_drift import serve; serve({process!r}, {backend!r}, {run_dir!r})"
        self.child = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )

    def receive(self, timeout: float) -> Any:
        """The worker's next message within ``timeout`` seconds (None: none), but for its
        periodic egress counts, which are kept in :attr:`counts`."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.socket.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                return None
            identity, frame = self.socket.recv_multipart()
            assert identity == self.process.encode()
            message = decode(frame)
            if isinstance(message, EgressCounts):
                self.counts = message
                continue
            if isinstance(message, Applied):
                self.reports.append(message)
            return message

    def start(self, state: NodeDesiredState, timeout: float = 30.0) -> None:
        """Answer the worker's Hello with ``state`` and wait until it has applied it."""
        deadline = time.monotonic() + timeout
        wait_until(
            lambda: self.receive(0.2),
            timeout,
            interval=0,
            message=f"a Hello from the {self.process} worker",
            accept=lambda message: isinstance(message, Hello),
        )
        self.socket.send_multipart([self.process.encode(), encode(Snapshot(1, state))])
        applied = wait_until(
            lambda: self.receive(0.2),
            max(0.0, deadline - time.monotonic()),
            interval=0,
            message=f"the {self.process} worker to apply its first state",
            accept=lambda message: isinstance(message, Applied) and message.generation == 1,
        )
        assert not applied.error, applied.error

    def wait_for_drift_report(self, timeout: float = REPAIR_TIMEOUT) -> Applied:
        """The next Applied that reports a drift repair."""

        def drift_report() -> Applied | None:
            report = next((report for report in self.reports if report.drift), None)
            if report is None:
                self.receive(0.2)
            else:
                self.reports.remove(report)
            return report

        return wait_until(
            drift_report,
            timeout,
            interval=0,
            message=lambda: f"a drift repair reported by {self.process}; reports: {self.reports}",
        )

    def drift_repairs(self, kind: str) -> float:
        """``metaleg_drift_repairs_total{kind}`` as the supervisor's /metrics would show it."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("metaleg_drift_repairs_total{") and f'kind="{kind}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(5)
        self.socket.close(0)
        self.context.term()


@contextlib.contextmanager
def running_worker(
    process: str, backend: str, state: NodeDesiredState, *, links: bool = False
) -> Iterator[RunningWorker]:
    """A namespace with a worker that has applied ``state``; both gone afterwards."""
    with namespace("mldrift") as ns, tempfile.TemporaryDirectory(prefix="mld") as run_dir:
        if links:
            onlink_test_prefixes(ns)
        worker = RunningWorker(ns, process, backend, run_dir)
        try:
            worker.start(state)
            yield worker
        finally:
            worker.close()


def run(ns: str, *command: str) -> str:
    """A command's stdout in the namespace; '' when it fails (the object is missing)."""
    result = subprocess.run(
        ["ip", "netns", "exec", ns, *command], capture_output=True, text=True, timeout=30
    )
    return result.stdout if result.returncode == 0 else ""


# --- nftables ---------------------------------------------------------------------------------

NFT_CASES = {
    # kind: (tampering, what must hold again after the repair)
    "nft_table": ("delete table inet metaleg", ("list chain inet metaleg egress", "drop")),
    "nft_chain": (
        "flush chain inet metaleg egress; delete chain inet metaleg egress",
        ("list chain inet metaleg egress", "drop"),
    ),
    "nft_rule": (
        "flush chain inet metaleg postrouting",
        ("list chain inet metaleg postrouting", "snat"),
    ),
    "nft_set": (
        "add set inet metaleg intruder { type ipv4_addr; }",
        ("list table inet metaleg", "!intruder"),
    ),
    "nft_element": (
        "delete element inet metaleg snat4 { 10.244.1.10 }",
        ("list map inet metaleg snat4", "10.244.1.10"),
    ),
}


def _holds(ns: str, check: tuple[str, str]) -> bool:
    listing = run(ns, "nft", *check[0].split())
    if check[1].startswith("!"):
        return bool(listing) and check[1][1:] not in listing
    return check[1] in listing


@pytest.mark.parametrize("kind", list(NFT_CASES))
def test_nftables_drift_is_repaired_reported_and_counted(kind: str) -> None:
    tampering, check = NFT_CASES[kind]
    with running_worker("firewall", "nftables", firewall_state()) as worker:
        assert _holds(worker.ns, check)
        sh("nft", tampering, netns=worker.ns)
        wait_until(
            lambda: _holds(worker.ns, check), REPAIR_TIMEOUT, message=f"the repair of {tampering!r}"
        )
        report = worker.wait_for_drift_report()
        assert report.drift.startswith(kind + ":"), report.drift
        assert not report.error
        assert worker.drift_repairs(kind) >= 1
        # The repair's own transaction is not drift: nothing follows it.
        assert worker.receive(1.0) is None


def test_nftables_writes_of_other_tables_are_not_drift() -> None:
    with running_worker("firewall", "nftables", firewall_state()) as worker:
        sh(
            "nft",
            "add table inet other; add chain inet other c; delete table inet other",
            netns=worker.ns,
        )
        sh("nft", "add table ip other", netns=worker.ns)
        assert worker.receive(1.5) is None
        assert worker.drift_repairs("nft_table") == 0


# --- routing ----------------------------------------------------------------------------------

V4_RULE = f"priority 31000 fwmark {SLOT1:#x}/{MASK:#x} lookup {TABLE1}"

ROUTING_CASES = {
    "policy_rule": (
        ("ip", "rule", "del", *V4_RULE.split()),
        (("ip", "-4", "rule", "show", "priority", "31000"), f"lookup {TABLE1}"),
    ),
    "policy_rule-catchall-v6": (
        ("ip", "-6", "rule", "del", "priority", "31001"),
        (("ip", "-6", "rule", "show", "priority", "31001"), "unreachable"),
    ),
    "route": (
        ("ip", "route", "flush", "table", str(TABLE1)),
        (("ip", "-4", "route", "show", "table", str(TABLE1)), "via 192.0.2.12"),
    ),
    "route-changed-v6": (
        ("ip", "-6", "route", "replace", "default", "via", "2001:db8::99", "table", str(TABLE1)),
        (("ip", "-6", "route", "show", "table", str(TABLE1)), "via 2001:db8::12"),
    ),
}


@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_routing_drift_is_repaired_reported_and_counted(case: str) -> None:
    tampering, (command, expected) = ROUTING_CASES[case]
    kind = case.split("-")[0]
    with running_worker("routing", "netlink", routing_state(), links=True) as worker:
        assert expected in run(worker.ns, *command)
        sh(*tampering, netns=worker.ns)
        wait_until(
            lambda: run(worker.ns, *command),
            REPAIR_TIMEOUT,
            message=f"{expected!r} again after {' '.join(tampering)}",
            accept=lambda listing: expected in listing,
        )
        report = worker.wait_for_drift_report()
        assert report.drift.startswith(kind + ":"), report.drift
        assert worker.drift_repairs(kind) >= 1


def test_routing_changes_outside_metaleg_tables_are_not_drift() -> None:
    with running_worker("routing", "netlink", routing_state(), links=True) as worker:
        sh("ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.77", netns=worker.ns)
        sh(
            "ip",
            "rule",
            "add",
            "priority",
            "500",
            "fwmark",
            "0x1",
            "lookup",
            "main",
            netns=worker.ns,
        )
        assert worker.receive(1.5) is None
        assert worker.drift_repairs("route") == worker.drift_repairs("policy_rule") == 0


# --- iptables (legacy) and ipsets ---------------------------------------------------------------

IPTABLES_CASES = {
    # case: (tampering, (command listing the object, what must hold again), drift kind)
    "jump-deleted": (
        ("iptables-legacy", "-t", "nat", "-D", "POSTROUTING", "-j", "METALEG-SNAT"),
        (("iptables-legacy", "-t", "nat", "-S", "POSTROUTING"), "-j METALEG-SNAT"),
        "iptables_jump",
    ),
    "jump-preceded": (
        ("iptables-legacy", "-t", "nat", "-I", "POSTROUTING", "1", "-j", "MASQUERADE"),
        (("iptables-legacy", "-t", "nat", "-S", "POSTROUTING"), "first:-m mark ! --mark"),
        "iptables_jump",
    ),
    "jump-deleted-v6": (
        ("ip6tables-legacy", "-D", "FORWARD", "-j", "METALEG-REJECT"),
        (("ip6tables-legacy", "-S", "FORWARD"), "-j METALEG-REJECT"),
        "iptables_jump",
    ),
    "mark-jump-deleted": (
        ("iptables-legacy", "-t", "mangle", "-D", "PREROUTING", "-j", "METALEG-RT-MARK"),
        (("iptables-legacy", "-t", "mangle", "-S", "PREROUTING"), "-j METALEG-RT-MARK"),
        "iptables_jump",
    ),
    "chain-flushed": (
        ("iptables-legacy", "-t", "nat", "-F", "METALEG-SNAT"),
        (("iptables-legacy", "-t", "nat", "-S", "METALEG-SNAT"), "--to-source 198.51.100.200"),
        "iptables_chain",
    ),
    "ipset-member-deleted": (
        ("ipset", "del", "METALEG-MARK-4", "10.244.1.11"),
        (("ipset", "list", "METALEG-MARK-4"), "10.244.1.11"),
        "ipset",
    ),
    "ipset-flushed-v6": (
        ("ipset", "flush", "METALEG-SNATTED-6"),
        (("ipset", "list", "METALEG-SNATTED-6"), "fd00:1::10"),
        "ipset",
    ),
}


def _iptables_holds(ns: str, command: tuple[str, ...], expected: str) -> bool:
    listing = run(ns, *command)
    if expected.startswith("first:"):
        rules = [line for line in listing.splitlines() if line.startswith("-A ")]
        return bool(rules) and expected[6:] in rules[0]
    return expected in listing


@pytest.mark.parametrize("case", list(IPTABLES_CASES))
def test_iptables_drift_is_repaired_reported_and_counted(case: str) -> None:
    tampering, (command, expected), kind = IPTABLES_CASES[case]
    with running_worker("firewall", "iptables", firewall_state()) as worker:
        assert _iptables_holds(worker.ns, command, expected)
        sh(*tampering, netns=worker.ns)
        wait_until(
            lambda: _iptables_holds(worker.ns, command, expected),
            REPAIR_TIMEOUT,
            message=f"the repair of {' '.join(tampering)}",
        )
        report = worker.wait_for_drift_report()
        assert report.drift.startswith(kind + ":"), report.drift
        assert not report.error
        assert worker.drift_repairs(kind) >= 1
        # The repair is the new baseline: no repair follows it.
        assert worker.receive(2.5) is None


def test_iptables_changes_outside_metaleg_objects_are_not_drift() -> None:
    with running_worker("firewall", "iptables", firewall_state()) as worker:
        sh("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE", netns=worker.ns)
        sh("iptables-legacy", "-N", "KUBE-FORWARD", netns=worker.ns)
        sh("iptables-legacy", "-A", "FORWARD", "-j", "KUBE-FORWARD", netns=worker.ns)
        sh("ipset", "create", "KUBE-OTHER", "hash:ip", netns=worker.ns)
        assert worker.receive(2.5) is None
        for kind in ("iptables_jump", "iptables_chain", "ipset"):
            assert worker.drift_repairs(kind) == 0


# --- the back-off against a component that fights metaleg ------------------------------------


def test_repairs_are_spaced_out_while_drift_keeps_coming_back_and_at_once_after_quiet() -> None:
    from metaleg.worker import FIGHT_DELAY_INITIAL, FIGHT_DELAY_MAX, DriftRepairLimiter

    limiter = DriftRepairLimiter()
    assert limiter.next_allowed(100.0) == 100.0  # first drift: at once
    limiter.repaired(100.0, 100.0)
    now, delays = 100.0, []
    for _ in range(14):  # undone right after each repair
        found = now + 0.05
        start = limiter.next_allowed(found)
        delays.append(start - now)
        limiter.repaired(max(start, found), found)
        now = max(start, found)
    # Undone once: repaired at once again; then the wait doubles up to the maximum.
    assert delays[0] == pytest.approx(0.05)
    assert delays[1] == pytest.approx(FIGHT_DELAY_INITIAL)
    assert all(later >= earlier - 1e-9 for earlier, later in itertools.pairwise(delays))
    assert delays[-1] == pytest.approx(FIGHT_DELAY_MAX)
    # Quiet for longer than the window plus the delay: the next drift is repaired at once.
    later = now + FIGHT_DELAY_MAX + 10
    assert limiter.next_allowed(later) == later
