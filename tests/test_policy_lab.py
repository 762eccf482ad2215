"""A destination policy in the lab, both backends: real agents, the real kernel.

Per backend (nftables with kube-router's masquerade in nft mode, iptables with it in
legacy mode), agents on node-a (a forwarder) and node-b (the gateway), and a labelled
Service whose
``metaleg.de/destinationCIDRs`` names only the internet host: its pods reach the internet
host from the LB IP, and the lab's second internet host (the mirror) from their node's
IP, on the gateway node and on the forwarder, and the agents count that traffic per
action (``snat`` on the gateway, ``forward`` on the forwarder); with no gateway known,
the internet host is rejected (and counted as ``reject``) and the mirror still answers,
from the node's IP.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab import INTERNET4, INTERNET6, LB_IP4, LB_IP6, MIRROR4, MIRROR6, Lab, Pod
from tests.lab.agents import BACKEND_IDS, BACKEND_LABS, EgressLab
from tests.waiting import wait_until

pytestmark = pytest.mark.lab

NAMESPACE, SERVICE = "mail", "relay"
GATEWAY, FORWARDER = "node-b", "node-a"


@pytest.fixture(
    scope="module",
    params=BACKEND_LABS,
    ids=BACKEND_IDS,
)
def egress(request: pytest.FixtureRequest) -> Iterator[EgressLab]:
    backend, masquerade = request.param
    with Lab(masquerade=masquerade) as lab, EgressLab(lab) as egress:
        for node in (FORWARDER, GATEWAY):
            egress.add_pod(node, f"relay-{node[-1]}", {"app": SERVICE})
            egress.start_agent(node, FIREWALL_BACKEND=backend)
        lab.start_recorder(lab.mirror)
        for node in (FORWARDER, GATEWAY):
            egress.wait_ready(node)
        cluster = egress.cluster
        cluster.service(NAMESPACE, SERVICE, (LB_IP4, LB_IP6))
        cluster.core.patch_namespaced_service(
            SERVICE,
            NAMESPACE,
            {
                "metadata": {
                    "annotations": {"metaleg.de/destinationCIDRs": f"{INTERNET4}, {INTERNET6}"}
                }
            },
        )
        pods = [lab.pod("relay-a"), lab.pod("relay-b")]
        cluster.endpoints(NAMESPACE, SERVICE, "IPv4", [(p.ipv4, p.node) for p in pods])
        cluster.endpoints(NAMESPACE, SERVICE, "IPv6", [(p.ipv6, p.node) for p in pods])
        yield egress


def seen(egress: EgressLab, pod: Pod, target: str, source: str, outcome: str = "ok") -> None:
    """Probe ``target`` from ``pod`` until it answers as expected (bounded)."""
    last: list[object] = []

    def answered() -> bool:
        result = egress.lab.probe(pod, target=target, timeout=1.0)
        last[:] = [result]
        return result.outcome == outcome and (outcome != "ok" or result.source == source)

    try:
        wait_until(answered, timeout=20, interval=0.1, message=f"{pod.name} -> {target}")
    except TimeoutError:
        logs = "\n".join(f"--- {n}\n{a.log(3000)}" for n, a in egress.agents.items())
        raise AssertionError(
            f"{pod.name} -> {target}: wanted {outcome} {source}, last {last}\n{logs}"
        ) from None


def counted(egress: EgressLab, node: str, action: str) -> int:
    """The packets the node's agent counted for the Service under ``action`` (status)."""
    _, report = egress.status(node)
    for service in report["services"] if report else ():
        if (service["namespace"], service["name"]) == (NAMESPACE, SERVICE):
            return int(service.get("egress_packets", {}).get(action, 0))
    return 0


def wait_counted(egress: EgressLab, node: str, action: str, more_than: int) -> None:
    """Wait until the node's agent has counted more than ``more_than`` packets (the firewall
    worker reads its counters every 10 s)."""
    wait_until(
        lambda: counted(egress, node, action),
        timeout=30,
        interval=0.5,
        message=f"{node} counting {action} packets of {NAMESPACE}/{SERVICE}",
        accept=lambda packets: packets > more_than,
    )


def test_only_the_listed_destination_takes_the_lb_ip(egress: EgressLab) -> None:
    lab = egress.lab
    egress.cluster.gateway(NAMESPACE, SERVICE, GATEWAY)
    lab.announce(LB_IP4, GATEWAY)
    lab.announce(LB_IP6, GATEWAY)
    before = {
        GATEWAY: counted(egress, GATEWAY, "snat"),
        FORWARDER: counted(egress, FORWARDER, "forward"),
    }
    for pod in (lab.pod("relay-b"), lab.pod("relay-a")):  # on the gateway, on the forwarder
        node = lab.node(pod.node)
        seen(egress, pod, INTERNET4, LB_IP4)
        seen(egress, pod, INTERNET6, LB_IP6)
        seen(egress, pod, MIRROR4, node.ipv4)
        seen(egress, pod, MIRROR6, node.ipv6)
    # The gateway SNATed both pods' traffic to the internet host; the forwarder marked its own.
    wait_counted(egress, GATEWAY, "snat", before[GATEWAY])
    wait_counted(egress, FORWARDER, "forward", before[FORWARDER])


def test_without_a_gateway_only_the_listed_destination_is_rejected(egress: EgressLab) -> None:
    lab = egress.lab
    egress.cluster.gateway(NAMESPACE, SERVICE, None)
    before = counted(egress, FORWARDER, "reject")
    for pod in (lab.pod("relay-b"), lab.pod("relay-a")):
        node = lab.node(pod.node)
        seen(egress, pod, INTERNET4, "", outcome="rejected")
        seen(egress, pod, INTERNET6, "", outcome="rejected")
        seen(egress, pod, MIRROR4, node.ipv4)
        seen(egress, pod, MIRROR6, node.ipv6)
    wait_counted(egress, FORWARDER, "reject", before)
