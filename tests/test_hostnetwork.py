"""Sources are pods, never nodes: a hostNetwork endpoint in a labelled Service.

A ``hostNetwork: true`` Pod matches the Service's selector and its EndpointSlice
lists it (with its node's name) next to the normal pods; its addresses are its
node's. Taking it as a source would SNAT, mark, reject or guard the node's own
traffic. The agents must skip it and say so (a problem in ``status``, a Warning
Event), and the rest of the Service must keep working: every node keeps its own
egress and reachability, the Service's regular pods keep the LB IP.

Two hostNetwork Pods: one on the gateway (node-b), one on a forwarding node
(node-c); node-a has none. In kube-router's nft and legacy masquerade modes,
with the backend ``auto`` picks there (nftables, iptables).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab import LB_IP4, LB_IP6, Lab, Node, Pod, ProbeResult
from tests.lab.agents import EgressLab
from tests.lab.traffic import netns_command
from tests.waiting import wait_until

pytestmark = pytest.mark.lab

NAMESPACE, SERVICE = "mail", "relay"
GATEWAY = "node-b"
#: hostNetwork Pod name -> its node.
HOST_NETWORK_PODS = {"relay-hostnet-b": "node-b", "relay-hostnet-c": "node-c"}


class HostNetworkScene:
    def __init__(self, egress: EgressLab, masquerade: str) -> None:
        self.egress = egress
        self.lab = egress.lab
        self.masquerade = masquerade
        self.gateway = GATEWAY
        self.relay: dict[str, Pod] = {}
        #: hostNetwork Pod name -> its node, and its (IPv4, IPv6): its node's.
        self.host_network_nodes: dict[str, str] = {}
        self.host_network_ips: dict[str, tuple[str, str]] = {}

    def nodes(self) -> list[Node]:
        return list(self.lab.nodes.values())

    def node_ips(self) -> list[str]:
        return [ip for node in self.nodes() for ip in (node.ipv4, node.ipv6)]

    def add_host_network_pod(self, name: str, node: str) -> None:
        self.host_network_ips[name] = self.egress.add_host_network_pod(node, name, {"app": SERVICE})
        self.host_network_nodes[name] = node

    def publish_endpoints(self) -> None:
        """The EndpointSlices list the hostNetwork Pods next to the normal ones, as the
        EndpointSlice controller does: their node's addresses, with the node's name."""
        for index, address_type in enumerate(("IPv4", "IPv6")):
            endpoints: list[tuple[str, str | None]] = [
                ((pod.ipv4, pod.ipv6)[index], pod.node) for pod in self.relay.values()
            ]
            endpoints += [
                (self.host_network_ips[name][index], node)
                for name, node in self.host_network_nodes.items()
            ]
            self.egress.cluster.endpoints(NAMESPACE, SERVICE, address_type, endpoints)

    def set_gateway(self, node: str) -> None:
        self.gateway = node
        self.egress.cluster.gateway(NAMESPACE, SERVICE, node)
        self.lab.announce(LB_IP4, node)
        self.lab.announce(LB_IP6, node)

    def wait_applied(self) -> None:
        """Every agent is ready (has applied its newest state) with the Service's gateway."""
        for node in self.lab.nodes:
            wait_until(
                lambda node=node: applied_relay(self.egress, node, self.gateway),
                timeout=30,
                interval=0.2,
                message=lambda node=node: f"{node} applied {SERVICE}: {self.egress.status(node)}",
            )

    def wait_reported(self, node: str, pods: list[str], timeout: float = 15.0) -> None:
        """Wait until the node's status lists a problem naming each of ``pods`` (its name or
        its address)."""

        def problems() -> list[str]:
            _, report = self.egress.status(node)
            return list((report or {}).get("problems", []))

        def reported() -> bool:
            found = problems()
            return all(
                any(
                    name in problem
                    or any(mentions(problem, ip) for ip in self.host_network_ips[name])
                    for problem in found
                )
                for name in pods
            )

        wait_until(
            reported,
            timeout=timeout,
            interval=0.2,
            message=lambda: f"{node} reporting {pods}: {problems()}",
        )


@pytest.fixture(scope="module", params=["nft", "legacy"])
def scene(request: pytest.FixtureRequest) -> Iterator[HostNetworkScene]:
    masquerade = request.param
    with Lab(masquerade=masquerade) as lab, EgressLab(lab) as egress:
        scene = HostNetworkScene(egress, masquerade)
        for node in lab.nodes:
            scene.relay[node] = egress.add_pod(node, f"relay-{node[-1]}", {"app": SERVICE})
        for name, node in HOST_NETWORK_PODS.items():
            scene.add_host_network_pod(name, node)
        for node in lab.nodes:
            egress.start_agent(node)
        for node in lab.nodes:
            egress.wait_ready(node)
        egress.cluster.service(NAMESPACE, SERVICE, (LB_IP4, LB_IP6))
        scene.publish_endpoints()
        scene.set_gateway(GATEWAY)
        # The slices came in one go: a state with the regular pods has the others too.
        scene.wait_applied()
        yield scene


def applied_relay(egress: EgressLab, node: str, gateway: str) -> dict[str, Any] | None:
    """The node's status report once it is ready (the newest state applied) with the relay
    Service's gateway known; else None."""
    code, report = egress.status(node)
    if code != 0 or not report:
        return None
    services = [
        s for s in report["services"] if (s["namespace"], s["name"]) == (NAMESPACE, SERVICE)
    ]
    if not services or services[0]["gateway_node"] != gateway:
        return None
    return report  # type: ignore[no-any-return]


def ping(node: Node, address: str, timeout: float = 5.0) -> bool:
    """Whether ``node`` gets an echo reply from ``address`` within ``timeout`` (a lost
    packet is retried; a path that stays broken is not)."""
    command = netns_command(node.netns, ["ping", "-n", "-q", "-c", "1", "-W", "1", address])
    try:
        wait_until(
            lambda: subprocess.run(command, capture_output=True, timeout=10).returncode == 0,
            timeout=timeout,
            interval=0.1,
        )
    except TimeoutError:
        return False
    return True


def node_egress(scene: HostNetworkScene, node: Node, family: int, proto: str) -> ProbeResult:
    """A probe from the node itself to the internet host, retried for a few seconds until it
    arrives with the node's own address; the last result."""
    address = node.ipv4 if family == 4 else node.ipv6
    last: list[ProbeResult] = []

    def own_address() -> bool:
        result = scene.lab.probe(node, family=family, proto=proto, timeout=1.0)  # type: ignore[arg-type]
        last[:] = [result]
        return result.ok and result.source == address

    with contextlib.suppress(TimeoutError):
        wait_until(own_address, timeout=5.0, interval=0.1)
    return last[0]


def mentions(text: str, address: str) -> bool:
    """Whether ``address`` occurs in ``text`` as a whole address (not inside a longer one)."""
    return (
        re.search(rf"(?<![0-9a-fA-F:.]){re.escape(address)}(?![0-9a-fA-F:.]*[0-9a-fA-F])", text)
        is not None
    )


def covered(text: str, address: str) -> bool:
    """Whether ``text`` holds ``address``, or a network containing it (a collapsed set element
    such as ``198.51.100.12/31``); /0 networks aside. The excluded destinations hold the pod
    networks (10.0.0.0/8, fc00::/7), so this is no test for a pod address."""
    target = ipaddress.ip_address(address)
    for token in re.findall(r"[0-9a-fA-F:.]*[.:][0-9a-fA-F:.]*(?:/[0-9]+)?", text):
        try:
            network = ipaddress.ip_network(token, strict=False)
        except ValueError:
            continue
        if network.version == target.version and network.prefixlen > 0 and target in network:
            return True
    return False


def metaleg_kernel_state(scene: HostNetworkScene, node: str) -> str:
    """metaleg's netfilter state on the node, as text: its nftables table, or its ipsets
    and legacy iptables rules (the backend ``auto`` picked for the node's masquerade)."""
    lab = scene.lab
    if scene.masquerade == "nft":
        return lab.exec(node, "nft", "list", "table", "inet", "metaleg")
    sets = lab.exec(node, "ipset", "save")
    rules = lab.exec(node, "iptables-legacy-save") + lab.exec(node, "ip6tables-legacy-save")
    return sets + "\n".join(line for line in rules.splitlines() if "METALEG" in line)


def test_regular_pods_keep_the_lb_ip(scene: HostNetworkScene) -> None:
    for pod in scene.relay.values():
        for family, lb_ip in ((4, LB_IP4), (6, LB_IP6)):
            for proto in ("udp", "tcp"):
                scene.egress.wait_for_probe(pod, family, source=lb_ip, proto=proto, timeout=10)


def own_egress_failures(scene: HostNetworkScene) -> list[str]:
    failures = []
    for node in scene.nodes():
        for family, address in ((4, node.ipv4), (6, node.ipv6)):
            for proto in ("udp", "tcp"):
                result = node_egress(scene, node, family, proto)
                if not (result.ok and result.source == address):
                    failures.append(f"{node.name} IPv{family}/{proto}: {result}")
    return failures


def reachability_failures(scene: HostNetworkScene) -> list[str]:
    return [
        f"{node.name} -> {other.name} {address}"
        for node in scene.nodes()
        for other in scene.nodes()
        if other is not node
        for address in (other.ipv4, other.ipv6)
        if not ping(node, address)
    ]


def node_addresses_in_state(scene: HostNetworkScene) -> list[str]:
    """Every node whose metaleg netfilter state holds a node address, with that state; and
    the regular pods missing from the gateway's sources."""
    found = []
    for node in scene.lab.nodes:
        state = metaleg_kernel_state(scene, node)
        addresses = [ip for ip in scene.node_ips() if covered(state, ip)]
        if addresses:
            found.append(f"{node}: node addresses {addresses} in metaleg's state:\n{state}")
    gateway_state = metaleg_kernel_state(scene, scene.gateway)
    for pod in scene.relay.values():
        if not (mentions(gateway_state, pod.ipv4) and mentions(gateway_state, pod.ipv6)):
            found.append(f"{pod.name} is no source on {scene.gateway}:\n{gateway_state}")
    return found


def test_every_node_keeps_its_own_egress(scene: HostNetworkScene) -> None:
    """A packet from the node itself reaches the internet host with the node's address
    (not the LB IP: not SNATed; not rejected, not dropped, not sent to the gateway)."""
    assert own_egress_failures(scene) == []


def test_nodes_reach_each_other(scene: HostNetworkScene) -> None:
    assert reachability_failures(scene) == []


def test_node_addresses_are_never_sources_nor_guarded(scene: HostNetworkScene) -> None:
    """No node address anywhere in metaleg's netfilter state (sources, SNAT, marks, transit
    guard; also not inside a collapsed network), while the regular pods' addresses are, as
    such (the gateway takes all of them)."""
    assert node_addresses_in_state(scene) == []


def test_status_names_the_host_network_pods(scene: HostNetworkScene) -> None:
    """The gateway (which takes every endpoint) reports both hostNetwork Pods, node-c its own:
    a problem naming the Pod or its address."""
    scene.wait_reported(GATEWAY, list(HOST_NETWORK_PODS))
    scene.wait_reported("node-c", ["relay-hostnet-c"])


def test_warning_event_on_the_service(scene: HostNetworkScene) -> None:
    core = scene.egress.cluster.core

    def warnings() -> list[str]:
        items = core.list_namespaced_event(NAMESPACE).items
        return [
            e.message or ""
            for e in items
            if e.involved_object.name == SERVICE and e.type == "Warning"
        ]

    def names_a_host_network_pod() -> bool:
        return any(
            name in message or any(mentions(message, ip) for ip in ips)
            for message in warnings()
            for name, ips in scene.host_network_ips.items()
        )

    wait_until(
        names_a_host_network_pod,
        timeout=15,
        interval=0.2,
        message=lambda: (
            f"a Warning Event on {NAMESPACE}/{SERVICE} naming a hostNetwork Pod: {warnings()}"
        ),
    )


def test_a_host_network_pod_added_while_running(scene: HostNetworkScene) -> None:
    """A hostNetwork Pod that comes (and enters the EndpointSlice) while the agents run, on
    node-a, which had none: the same, and node-a and the gateway report it."""
    scene.add_host_network_pod("relay-hostnet-a", "node-a")
    scene.publish_endpoints()
    scene.wait_reported(scene.gateway, ["relay-hostnet-a"])
    scene.wait_reported("node-a", ["relay-hostnet-a"])
    scene.wait_applied()
    assert own_egress_failures(scene) == []
    assert reachability_failures(scene) == []
    assert node_addresses_in_state(scene) == []
    for pod in scene.relay.values():
        for family, lb_ip in ((4, LB_IP4), (6, LB_IP6)):
            scene.egress.wait_for_probe(pod, family, source=lb_ip, timeout=10)


@pytest.mark.parametrize("gateway", ["node-c", "node-a", GATEWAY])
def test_gateway_moves_between_nodes_with_host_network_pods(
    scene: HostNetworkScene, gateway: str
) -> None:
    """The gateway moves to each node (every one has a hostNetwork Pod of the Service by
    now): the regular pods follow with the LB IP, every node keeps its own egress."""
    scene.set_gateway(gateway)
    scene.wait_applied()
    for pod in scene.relay.values():
        for family, lb_ip in ((4, LB_IP4), (6, LB_IP6)):
            scene.egress.wait_for_probe(pod, family, source=lb_ip, timeout=10)
    assert own_egress_failures(scene) == []
    assert node_addresses_in_state(scene) == []
