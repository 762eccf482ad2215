"""Drift repair at packet level: the lab's real agents, their kernel objects tampered with.

After someone deletes what the agents put in place (the gateway's SNAT, a
forwarder's policy rules), the pods' traffic must be back on the LoadBalancer IP
well before the periodic re-sync (an hour away here), and the repair must show in
``metaleg-supervisor status`` and in ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab import LB_IP4, LB_IP6, Lab, Pod
from tests.lab.agents import EgressLab
from tests.test_operations import http_get, metric
from tests.waiting import wait_until

pytestmark = pytest.mark.lab

NAMESPACE, SERVICE = "mail", "relay"


class Scene:
    def __init__(self, egress: EgressLab, masquerade: str) -> None:
        self.egress = egress
        self.lab = egress.lab
        self.masquerade = masquerade
        self.relay: dict[str, Pod] = {}

    def expect_lb(self, node: str, timeout: float = 10.0) -> None:
        for family, lb in ((4, LB_IP4), (6, LB_IP6)):
            self.egress.wait_for_probe(self.relay[node], family, source=lb, timeout=timeout)

    def drift_status(self, node: str, process: str) -> dict[str, Any]:
        """The process's status entry once it reports a drift repair."""

        def repaired() -> dict[str, Any] | None:
            _, report = self.egress.status(node)
            for entry in (report or {}).get("processes", []):
                if entry["name"] == process and entry.get("drift_repairs", 0) >= 1:
                    return entry  # type: ignore[no-any-return]
            return None

        return wait_until(repaired, timeout=10, interval=0.2, message=f"{process} drift status")

    def repairs(self, node: str, process: str, kind: str) -> float:
        status, text = http_get(self.egress, node, 21793, "/metrics")
        assert status == 200
        return metric(text, "metaleg_drift_repairs_total", process=process, kind=kind) or 0.0


@pytest.fixture(scope="module", params=["nft", "legacy"])
def scene(request: pytest.FixtureRequest) -> Iterator[Scene]:
    """node-b is the relay's gateway, node-a forwards to it; kube-router's masquerade in
    nft mode (nftables backend) or legacy mode (iptables backend)."""
    masquerade = request.param
    with (
        Lab(masquerade=masquerade) as lab,
        EgressLab(lab, RECONCILIATION_INTERVAL="1h") as egress,
    ):
        scene = Scene(egress, masquerade)
        for node in ("node-a", "node-b"):
            scene.relay[node] = egress.add_pod(node, f"relay-{node[-1]}", {"app": SERVICE})
            egress.start_agent(node)
        for node in ("node-a", "node-b"):
            egress.wait_ready(node)
        pods = list(scene.relay.values())
        egress.cluster.service(NAMESPACE, SERVICE, (LB_IP4, LB_IP6))
        egress.cluster.endpoints(NAMESPACE, SERVICE, "IPv4", [(p.ipv4, p.node) for p in pods])
        egress.cluster.endpoints(NAMESPACE, SERVICE, "IPv6", [(p.ipv6, p.node) for p in pods])
        egress.cluster.gateway(NAMESPACE, SERVICE, "node-b")
        lab.announce(LB_IP4, "node-b")
        lab.announce(LB_IP6, "node-b")
        for node in ("node-a", "node-b"):
            scene.expect_lb(node, timeout=20)
        yield scene


def test_the_gateways_deleted_snat_is_repaired_and_traffic_is_back_on_the_lb_ip(
    scene: Scene,
) -> None:
    if scene.masquerade == "nft":
        kind = "nft_table"
        scene.lab.exec("node-b", "nft", "delete", "table", "inet", "metaleg")
    else:
        kind = "iptables_jump"
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            scene.lab.exec("node-b", tool, "-t", "nat", "-D", "POSTROUTING", "-j", "METALEG-SNAT")
    scene.expect_lb("node-b")
    entry = scene.drift_status("node-b", "firewall")
    assert entry["last_drift"].startswith(kind + ":"), entry
    assert scene.repairs("node-b", "firewall", kind) >= 1
    _, text = scene.egress.status("node-b", json_output=False)
    assert "firewall: 1 drift repair(s)" in text, text
    scene.expect_lb("node-a")


def test_a_forwarders_deleted_policy_rules_are_repaired_and_traffic_is_back_on_the_lb_ip(
    scene: Scene,
) -> None:
    for family in ("-4", "-6"):
        scene.lab.exec("node-a", "ip", family, "rule", "del", "priority", "31000")
    scene.expect_lb("node-a")
    entry = scene.drift_status("node-a", "routing")
    assert entry["last_drift"].startswith("policy_rule:"), entry
    assert scene.repairs("node-a", "routing", "policy_rule") >= 1
