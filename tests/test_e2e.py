"""End to end: three nodes, a router, the internet, the API emulator and one real agent per node.

What the internet host sees is the verdict: the labelled Service's pods must
appear with the LoadBalancer IP, from every node, in both families, and never
with a node or pod IP while the Service is labelled.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.lab import LB_IP4, LB_IP6, Lab, Pod
from tests.lab.agents import EgressLab

pytestmark = pytest.mark.lab

NAMESPACE, SERVICE = "mail", "relay"


class Scene:
    """The running lab with the mail relay's pods, one per node, and an unlabelled pod."""

    def __init__(self, egress: EgressLab) -> None:
        self.masquerade = "legacy"
        self.backend = "auto"
        self.egress = egress
        self.lab = egress.lab
        self.cluster = egress.cluster
        # With their Pod objects (IPs, hostIPs), as a kubelet reports them.
        self.relay = {
            node: egress.add_pod(node, f"relay-{node[-1]}", {"app": SERVICE})
            for node in ("node-a", "node-b", "node-c")
        }
        self.web = egress.add_pod("node-a", "web-a", {"app": "web"})

    def publish_endpoints(self, pods: list[Pod] | None = None) -> None:
        pods = list(self.relay.values()) if pods is None else pods
        self.cluster.endpoints(NAMESPACE, SERVICE, "IPv4", [(p.ipv4, p.node) for p in pods])
        self.cluster.endpoints(NAMESPACE, SERVICE, "IPv6", [(p.ipv6, p.node) for p in pods])

    def label_relay(self, gateway: str | None = "node-b") -> None:
        self.cluster.service(NAMESPACE, SERVICE, (LB_IP4, LB_IP6))
        self.publish_endpoints()
        self.cluster.gateway(NAMESPACE, SERVICE, gateway)
        if gateway is not None:
            self.lab.announce(LB_IP4, gateway)
            self.lab.announce(LB_IP6, gateway)

    def node_ip(self, pod: Pod, family: int) -> str:
        node = self.lab.node(pod.node)
        return node.ipv4 if family == 4 else node.ipv6

    def expect_lb(self, family: int, proto: str = "udp", timeout: float = 20.0) -> None:
        lb = LB_IP4 if family == 4 else LB_IP6
        for pod in self.relay.values():
            self.egress.wait_for_probe(pod, family, source=lb, proto=proto, timeout=timeout)

    def expect_node_ips(self, family: int, timeout: float = 20.0) -> None:
        for pod in self.relay.values():
            self.egress.wait_for_probe(
                pod, family, source=self.node_ip(pod, family), timeout=timeout
            )


@pytest.fixture(
    scope="module",
    params=[("legacy", "auto"), ("nft", "auto"), ("legacy", "nftables")],
    ids=["legacy-auto", "nft-auto", "legacy-nftables"],
)
def scene(request: pytest.FixtureRequest) -> Iterator[Scene]:
    """kube-router's masquerade in legacy or nft mode, with FIREWALL_BACKEND auto or forced.

    The nftables backend applies in both modes (its NAT bindings come first either way);
    the iptables backend only where the masquerade is in legacy tables, which auto picks.
    """
    masquerade, backend = request.param
    with Lab(masquerade=masquerade) as lab, EgressLab(lab, FIREWALL_BACKEND=backend) as egress:
        scene = Scene(egress)
        scene.masquerade = masquerade
        scene.backend = backend
        for node in lab.nodes:
            egress.start_agent(node)
        for node in lab.nodes:
            egress.wait_ready(node)
        yield scene


def test_auto_picks_the_backend_of_the_nodes_masquerade(scene: Scene) -> None:
    if scene.backend != "auto":
        expected = scene.backend
    else:
        expected = "iptables" if scene.masquerade == "legacy" else "nftables"
    for node, agent in scene.egress.agents.items():
        log = agent.log(100_000)
        assert f"using the {expected} firewall backend" in log, (node, log[-2000:])


def test_before_labelling_pods_leave_with_their_node_ip(scene: Scene) -> None:
    for family in (4, 6):
        scene.expect_node_ips(family)


def test_labelled_service_egresses_from_the_lb_ip_on_every_node(scene: Scene) -> None:
    scene.label_relay("node-b")
    for family in (4, 6):
        scene.expect_lb(family, "udp")
        scene.expect_lb(family, "tcp", timeout=5)
    # An unlabelled pod on the same node as a labelled one keeps its node IP.
    for family in (4, 6):
        scene.egress.wait_for_probe(
            scene.web, family, source=scene.node_ip(scene.web, family), timeout=5
        )


def test_pod_to_pod_and_excluded_destinations_are_untouched(scene: Scene) -> None:
    target = scene.relay["node-c"]
    scene.lab.start_recorder(target)
    for family in (4, 6):
        source = scene.relay["node-a"]
        result = scene.lab.probe(
            source, family=family, target=target.ipv4 if family == 4 else target.ipv6
        )  # type: ignore[arg-type]
        assert result.ok, result
        assert result.source == (source.ipv4 if family == 4 else source.ipv6)


def test_gateway_failover_moves_egress(scene: Scene) -> None:
    for gateway in ("node-c", "node-a", "node-b"):
        scene.cluster.gateway(NAMESPACE, SERVICE, gateway)
        scene.lab.announce(LB_IP4, gateway)
        scene.lab.announce(LB_IP6, gateway)
        for family in (4, 6):
            scene.expect_lb(family)


def test_firewall_worker_kill_is_repaired_without_visible_change(scene: Scene) -> None:
    agent = scene.egress.agents["node-a"]
    old = agent.worker_pid("firewall")
    assert old is not None
    pod = scene.relay["node-a"]
    since = time.time()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 3.0
    results = []
    while time.monotonic() < deadline:  # keep sending while the worker is down and restarting
        results.append(scene.lab.probe(pod, family=4, timeout=1.0))
    new = scene.egress.wait_for_workers("node-a")["firewall"]
    assert new != old
    assert results and all(r.ok and r.source == LB_IP4 for r in results), results
    scene.expect_lb(4)
    assert set(scene.lab.sources_seen(since=since)) <= {LB_IP4}


def test_gateway_unknown_rejects_instead_of_leaking(scene: Scene) -> None:
    since = time.time()
    scene.cluster.gateway(NAMESPACE, SERVICE, None)  # no ServiceL2Status
    for family in (4, 6):
        for pod in scene.relay.values():
            scene.egress.wait_for_probe(pod, family, outcome="rejected")
    scene.cluster.gateway(NAMESPACE, SERVICE, "node-gone")  # names an unknown node
    for family in (4, 6):
        for pod in scene.relay.values():
            scene.egress.wait_for_probe(pod, family, outcome="rejected", timeout=5)
    leaked = {src for src in scene.lab.sources_seen(since=since) if src not in (LB_IP4, LB_IP6)}
    assert leaked == set()
    scene.cluster.gateway(NAMESPACE, SERVICE, "node-b")
    scene.lab.announce(LB_IP4, "node-b")
    scene.lab.announce(LB_IP6, "node-b")
    for family in (4, 6):
        scene.expect_lb(family)


def test_unlabelling_and_deleting_restore_node_ip_egress(scene: Scene) -> None:
    scene.cluster.label_service(NAMESPACE, SERVICE, False)
    for family in (4, 6):
        scene.expect_node_ips(family)
    scene.cluster.label_service(NAMESPACE, SERVICE, True)
    for family in (4, 6):
        scene.expect_lb(family)
    scene.cluster.delete_service(NAMESPACE, SERVICE)
    for family in (4, 6):
        scene.expect_node_ips(family)


def test_agents_stop_cleanly_and_leave_kernel_state(scene: Scene) -> None:
    agent = scene.egress.agents["node-c"]
    assert scene.egress.stop_agent("node-c") == 0
    rules = scene.lab.exec("node-c", "ip", "rule", "show")
    assert "31001" in rules  # the fail-closed catch-all stays
    assert agent.worker_pid("firewall") is None
