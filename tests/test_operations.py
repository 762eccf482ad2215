"""Operations against running supervisors in the lab: status, metrics, probes, Events."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.lab import LB_IP4, LB_IP6, Lab
from tests.lab.agents import SUPERVISOR, EgressLab, http_get
from tests.waiting import wait_until

pytestmark = pytest.mark.lab


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def egress() -> Iterator[EgressLab]:
    with Lab(masquerade="nft") as lab, EgressLab(lab) as egress:
        for node in lab.nodes:
            egress.add_pod(node, f"relay-{node[-1]}", {"app": "relay"})
        for node in ("node-a", "node-b"):
            egress.start_agent(node)
        for node in ("node-a", "node-b"):
            egress.wait_ready(node)
        cluster = egress.cluster
        cluster.service("mail", "relay", (LB_IP4, LB_IP6))
        pods = list(lab.pods.values())
        cluster.endpoints("mail", "relay", "IPv4", [(p.ipv4, p.node) for p in pods])
        cluster.endpoints("mail", "relay", "IPv6", [(p.ipv6, p.node) for p in pods])
        cluster.gateway("mail", "relay", "node-b")
        lab.announce(LB_IP4, "node-b")
        lab.announce(LB_IP6, "node-b")
        yield egress


def relay_status(egress: EgressLab, node: str) -> dict:  # type: ignore[type-arg]
    def found() -> dict | None:  # type: ignore[type-arg]
        code, report = egress.status(node)
        services = [s for s in (report or {}).get("services", []) if s["name"] == "relay"]
        if code == 0 and services and services[0]["gateway_node"] == "node-b":
            return report  # type: ignore[no-any-return]
        return None

    return wait_until(found, timeout=20, interval=0.2, message=f"status of {node}")


def test_status_matches_the_cluster_and_the_kernel(egress: EgressLab) -> None:
    lab = egress.lab
    forwarder = relay_status(egress, "node-a")
    (service,) = forwarder["services"]
    assert service["role"] == "forwarder" and service["lb_ips"] == [LB_IP4, LB_IP6]
    assert service["source_ips"] == 2  # relay-a, IPv4 and IPv6
    assert (
        forwarder["firewall_backend"] == "nftables" and forwarder["healthy"] and forwarder["ready"]
    )
    names = [p["name"] for p in forwarder["processes"]]
    assert names == ["supervisor", "watcher", "firewall", "routing", "audit"]
    assert all(p["state"] == "running" and p["pid"] for p in forwarder["processes"])
    assert {p["applied_generation"] for p in forwarder["processes"][2:4]} == {
        forwarder["generation"]
    }
    # The kernel holds what status says: relay-a's sources marked towards node-b's table.
    mark = re.search(r"mark (0x[0-9a-f]+)", service["detail"]).group(1)  # type: ignore[union-attr]
    relay_a = lab.pod("relay-a")
    assert relay_a.ipv4 in lab.exec("node-a", "nft", "list", "map", "inet", "metaleg", "mark4")
    assert f"fwmark {mark}/0xf00000" in lab.exec("node-a", "ip", "rule")

    gateway = relay_status(egress, "node-b")
    (service,) = gateway["services"]
    assert service["role"] == "gateway" and service["source_ips"] == 6
    snat = lab.exec("node-b", "nft", "list", "map", "inet", "metaleg", "snat4")
    assert all(p.ipv4 in snat for p in lab.pods.values()) and LB_IP4 in snat

    code, table = egress.status("node-a", json_output=False)
    assert code == 0
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("PROCESS"))
    row = next(line for line in lines if line.startswith("firewall"))
    assert header.index("STATE") == row.index("running")  # aligned columns
    assert any(line.startswith("mail/relay") and "forwarder" in line for line in lines)


def test_status_without_a_supervisor_says_so_and_exits_1() -> None:
    with tempfile.TemporaryDirectory(prefix="mlst") as run_dir:
        result = subprocess.run(
            [SUPERVISOR, "status"],
            env={"PATH": os.environ["PATH"], "METALEG_RUN_DIR": run_dir},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no supervisor is running" in result.stderr


def test_metrics_carry_every_process(egress: EgressLab) -> None:
    relay_status(egress, "node-a")
    status, text = http_get(egress, "node-a", 21793, "/metrics")
    assert status == 200
    for process in ("supervisor", "watcher", "firewall", "routing", "audit"):
        assert metric(text, "metaleg_process_up", process=process) == 1
        assert (metric(text, "metaleg_process_resident_memory_bytes", process=process) or 0) > 1e6
        assert metric(text, "metaleg_process_cpu_seconds_total", process=process) is not None
    assert (
        metric(text, "metaleg_apply_duration_seconds_count", process="firewall", backend="nftables")
        or 0
    ) >= 1
    assert (
        metric(text, "metaleg_apply_duration_seconds_count", process="routing", backend="netlink")
        or 0
    ) >= 1
    assert (
        metric(text, "metaleg_watch_relists_total", process="watcher", resource="services") or 0
    ) >= 1
    assert metric(text, "metaleg_egress_services", role="forwarder") == 1
    assert metric(text, "metaleg_source_ips", family="ipv4", action="mark") == 1
    assert metric(text, "metaleg_firewall_backend_info", backend="nftables") == 1
    assert metric(text, "metaleg_snapshot_generation", process="supervisor") == metric(
        text, "metaleg_snapshot_generation", process="firewall"
    )


def test_killed_worker_shows_in_restarts_status_and_readyz(egress: EgressLab) -> None:
    agent = egress.agents["node-a"]
    assert http_get(egress, "node-a", 21794, "/readyz")[0] == 200
    # Three quick crashes: the third restart backs off for 2 s, long enough to be seen.
    for _ in range(3):
        pid = wait_until(lambda: agent.worker_pid("routing"), timeout=10, message="routing pid")
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda p=pid: agent.worker_pid("routing") != p, timeout=10, message="routing gone"
        )
    not_ready = wait_until(
        lambda: (r := http_get(egress, "node-a", 21794, "/readyz"))[0] == 503 and r,
        timeout=5,
        interval=0.05,
        message="/readyz failing",
    )
    assert "routing is restarting" in not_ready[1]
    egress.wait_ready("node-a")
    _, report = egress.status("node-a")
    routing = next(p for p in report["processes"] if p["name"] == "routing")
    assert routing["restarts"] == 3 and routing["state"] == "running"
    _, text = http_get(egress, "node-a", 21793, "/metrics")
    assert metric(text, "metaleg_process_restarts_total", process="routing") == 3
    assert (
        http_get(egress, "node-a", 21794, "/healthz")[0] == 200
    )  # three crashes, but it recovered


def test_crash_looping_worker_fails_healthz(egress: EgressLab) -> None:
    # A kubeconfig that does not exist: the watcher exits at start, again and again.
    egress.start_agent("node-c", KUBECONFIG="/nonexistent/kubeconfig")
    try:
        body = wait_until(
            lambda: (r := http_get(egress, "node-c", 21794, "/healthz"))[0] == 503 and r[1],
            timeout=20,
            interval=0.2,
            message="/healthz failing",
        )
        assert "watcher is crash-looping" in body
        code, report = egress.status("node-c")
        assert code == 3 and not report["healthy"]
        assert "cannot load the Kubernetes client configuration" in egress.agents["node-c"].log()
    finally:
        egress.stop_agent("node-c")


def test_events_appear_on_the_service(egress: EgressLab) -> None:
    relay_status(egress, "node-a")
    core = egress.cluster.core

    def events() -> list[tuple[str, str]]:
        items = core.list_namespaced_event("mail").items
        return [(e.reason, e.message) for e in items if e.involved_object.name == "relay"]

    seen = wait_until(
        lambda: (
            (found := events())
            and any(r == "EgressForwarding" for r, _ in found)
            and any(r == "EgressGateway" for r, _ in found)
            and found
        ),
        timeout=15,
        message="Events on mail/relay",
    )
    assert (
        "EgressForwarding",
        f"node-a: IPv4: egress via node-b as {LB_IP4}; IPv6: egress via node-b as {LB_IP6}",
    ) in seen
    assert any(
        r == "EgressGateway" and m.startswith("node-b: IPv4: egress here as") for r, m in seen
    )
    # A gateway that disappears is a Warning with the reason.
    egress.cluster.gateway("mail", "relay", None)
    wait_until(
        lambda: any(r == "EgressRejected" and "no ServiceL2Status" in m for r, m in events()),
        timeout=15,
        message="EgressRejected Event",
    )
    egress.cluster.gateway("mail", "relay", "node-b")
    # An invalid destination annotation is a Warning naming the annotation and the element.
    annotation = "metaleg.de/destinationCIDRs"
    patch = {"metadata": {"annotations": {annotation: "192.0.2.0/24, relay.example"}}}
    core.patch_namespaced_service("relay", "mail", patch)
    try:
        wait_until(
            lambda: any(
                r == "EgressProblem"
                and f"metadata.annotations[{annotation}]" in m
                and "'relay.example' is not a CIDR" in m
                for r, m in events()
            ),
            timeout=15,
            message="EgressProblem Event for the annotation",
        )
    finally:
        core.patch_namespaced_service(
            "relay", "mail", {"metadata": {"annotations": {annotation: None}}}
        )
