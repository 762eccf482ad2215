"""The namespace lab itself: topology, kube-router masquerade modes, traffic tools, teardown."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import (
    INTERNET4,
    INTERNET6,
    LB_IP4,
    LB_IP6,
    Family,
    Lab,
    Proto,
    wait_until,
)
from tests.lab.topology import list_namespaces
from tests.processes import process_alive

pytestmark = pytest.mark.lab

FAMILIES: tuple[Family, ...] = (4, 6)
PROTOS: tuple[Proto, ...] = ("udp", "tcp")


@pytest.fixture(scope="module", params=["legacy", "nft"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with Lab(masquerade=request.param) as lab:
        for node in lab.nodes:
            lab.add_pod(node, f"pod-{node}")
        yield lab


def test_pods_reach_the_internet_with_their_node_ip(lab: Lab) -> None:
    since = time.time()
    expected: set[str] = set()
    for node in lab.nodes.values():
        pod = lab.pod(f"pod-{node.name}")
        for family in FAMILIES:
            node_ip = node.ipv4 if family == 4 else node.ipv6
            pod_ip = pod.ipv4 if family == 4 else pod.ipv6
            expected.add(node_ip)
            for proto in PROTOS:
                result = lab.probe(pod, family, proto)
                assert result.ok, (node.name, family, proto, result)
                assert result.source == node_ip, (node.name, family, proto, result)
                assert result.local == pod_ip
                (record,) = lab.records(token=result.token)
                assert (record.src, record.proto, record.family) == (node_ip, proto, family)
    seen = lab.sources_seen(since=since)
    assert set(seen) == expected
    assert all(count == 2 for count in seen.values()), seen  # one UDP + one TCP line each


def test_pod_to_pod_across_nodes_keeps_pod_ips(lab: Lab) -> None:
    server = lab.pod("pod-node-b")
    client = lab.pod("pod-node-a")
    recorder = lab.start_recorder(server, udp_port=6000, tcp_port=6001)
    try:
        for family in FAMILIES:
            target = server.ipv4 if family == 4 else server.ipv6
            client_ip = client.ipv4 if family == 4 else client.ipv6
            for proto in PROTOS:
                result = lab.probe(
                    client, target=target, proto=proto, port=6000 if proto == "udp" else 6001
                )
                assert result.ok and result.source == client_ip, (family, proto, result)
        assert set(recorder.sources_seen()) == {client.ipv4, client.ipv6}
    finally:
        recorder.stop()


def test_masquerade_lives_in_the_selected_iptables_flavour(lab: Lab) -> None:
    other = "nft" if lab.masquerade == "legacy" else "legacy"
    node = lab.node("node-c")
    for binary in ("iptables", "ip6tables"):
        chosen = lab.exec(node, f"{binary}-{lab.masquerade}", "-w", "-S")
        assert "-A FORWARD -m comment" in chosen and "-j KUBE-ROUTER-FORWARD" in chosen
        nat = lab.exec(node, f"{binary}-{lab.masquerade}", "-w", "-t", "nat", "-S", "POSTROUTING")
        assert "-j MASQUERADE" in nat
        assert "KUBE-ROUTER" not in lab.exec(node, f"{binary}-{other}", "-w", "-S")


def test_announce_sets_and_withdraw_removes_the_routers_neighbour_entry(lab: Lab) -> None:
    for lb_ip in (LB_IP4, LB_IP6):
        lab.announce(lb_ip, "node-a")
        assert lab.neighbour(lb_ip) == lab.node("node-a").mac
        assert lab.announced_node(lb_ip) == "node-a"
        lab.announce(lb_ip, "node-c")  # failover
        assert lab.announced_node(lb_ip) == "node-c"
        assert "PERMANENT" in lab.exec("router", "ip", "neigh", "show", "to", lb_ip)
        lab.withdraw(lb_ip)
        assert lab.neighbour(lb_ip) is None


def test_stream_is_answered_and_recorded(lab: Lab) -> None:
    pod = lab.pod("pod-node-b")
    node_ip = lab.node("node-b").ipv6
    with lab.stream(pod, family=6, rate=50) as stream:
        wait_until(
            lambda: all(stream.reply_sources(proto)[node_ip] >= 10 for proto in PROTOS),
            timeout=10,
            message=lambda: f"10 answers per protocol, got {stream.reply_sources()}",
        )
    assert not stream.running
    assert set(stream.reply_sources()) == {node_ip}
    recorded = lab.records(token_prefix=stream.prefix)
    assert {r.src for r in recorded} == {node_ip}
    assert {r.proto for r in recorded} == {"udp", "tcp"}
    sent = stream.sent()
    wait_until(  # all but the last ones, maybe in flight at the stop
        lambda: len(lab.records(token_prefix=stream.prefix)) >= sent - 2,
        timeout=5,
        message=lambda: f"{sent - 2} records, got {len(lab.records(token_prefix=stream.prefix))}",
    )


def test_gateway_snat_to_a_load_balancer_ip_works_without_owning_it(lab: Lab) -> None:
    """What metaleg will do on its gateway node (dataplane-facts.md), done by hand with nft."""
    node = lab.node("node-a")
    pod = lab.pod("pod-node-a")
    rules = (
        "table inet labtest {\n"
        "  chain post { type nat hook postrouting priority srcnat - 10; policy accept;\n"
        f"    ip saddr {pod.ipv4} ip daddr {INTERNET4} snat ip to {LB_IP4}\n"
        f"    ip6 saddr {pod.ipv6} ip6 daddr {INTERNET6} snat ip6 to {LB_IP6}\n"
        "  }\n"
        "}\n"
    )
    lab.exec(node, "nft", "-f", "-", input=rules)
    try:
        for lb_ip in (LB_IP4, LB_IP6):
            lab.announce(lb_ip, node.name)
        for family, lb_ip in ((4, LB_IP4), (6, LB_IP6)):
            for proto in PROTOS:
                result = lab.probe(pod, family, proto)  # type: ignore[arg-type]
                assert result.ok and result.source == lb_ip, (family, proto, result)
    finally:
        lab.exec(node, "nft", "delete", "table", "inet", "labtest")
        for lb_ip in (LB_IP4, LB_IP6):
            lab.withdraw(lb_ip)


def test_probe_reports_rejected_and_timeout(lab: Lab) -> None:
    pod = lab.pod("pod-node-c")
    node = lab.node("node-c")
    lab.exec(
        node,
        "nft",
        "-f",
        "-",
        input="table inet labtest { chain labfwd { type filter hook forward priority -10;\n"
        f"  ip saddr {pod.ipv4} udp dport 5000 reject\n"
        f"  ip saddr {pod.ipv4} tcp dport 5001 reject with tcp reset\n"
        f"  ip6 saddr {pod.ipv6} drop\n"
        "}\n}\n",
    )
    try:
        for proto in PROTOS:
            assert lab.probe(pod, 4, proto).outcome == "rejected"
        assert lab.probe(pod, 6, "udp", timeout=0.5).outcome == "timeout"
    finally:
        lab.exec(node, "nft", "delete", "table", "inet", "labtest")
    assert lab.probe(pod, 6, "udp").ok


def test_without_masquerade_the_internet_sees_pod_ips_but_cannot_answer() -> None:
    with Lab(masquerade="none") as lab:
        pod = lab.add_pod("node-b", "leaky")
        for family, pod_ip in ((4, pod.ipv4), (6, pod.ipv6)):
            since = time.time()
            result = lab.probe(pod, family, "udp", timeout=0.5)  # type: ignore[arg-type]
            assert result.outcome == "timeout", result
            lab.wait_for_sources(pod_ip, since=since)


def test_everything_is_removed_after_the_with_block(tmp_path: Path) -> None:
    with Lab(masquerade="nft") as lab:
        lab.add_pod("node-a", "p1")
        second = lab.add_pod("node-a", "p2")
        assert second.ipv4 == "10.244.1.11"
        lab.remove_pod(second)
        assert second.netns not in lab.netns_names()
        assert lab.add_pod("node-a", "p3").ipv4 == "10.244.1.11"  # the freed address again
        stray = lab.spawn("node-b", "sleep", "600")
        stream = lab.stream("p1", family=4, rate=5)
        assert lab.recorder is not None and lab.recorder.pid is not None
        pids = [lab.recorder.pid, stray.pid, stream.process.pid]  # type: ignore[union-attr]
        names = lab.netns_names()
        assert len(names) == 8 + 2  # switch, router, internet, mirror, api, 3 nodes; 2 pods
        workdir = lab.workdir
        assert lab.setup_seconds is not None and lab.setup_seconds > 0  # printed by make demo
    assert not set(names) & set(list_namespaces())
    assert not [pid for pid in pids if process_alive(pid)]
    assert not workdir.exists()


def test_teardown_on_keyboard_interrupt_and_on_failed_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(KeyboardInterrupt), Lab(masquerade="legacy") as lab:
        lab.add_pod("node-c", "p")
        prefix = lab.prefix
        raise KeyboardInterrupt
    assert not [n for n in list_namespaces() if n.startswith(prefix + "-")]

    def broken(self: Lab) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Lab, "_wait_reachable", broken)
    failing = Lab(masquerade="legacy")
    with pytest.raises(RuntimeError, match="boom"), failing:
        pass
    assert not [n for n in list_namespaces() if n.startswith(failing.prefix + "-")]
    assert failing.recorder is not None and not failing.recorder.running


@pytest.mark.parametrize("mode", ["bogus"])
def test_masquerade_mode_is_checked(mode: str) -> None:
    with pytest.raises(ValueError):
        Lab(masquerade=mode)  # type: ignore[arg-type]


def test_no_root_namespace_change() -> None:
    """The lab creates its links inside its namespaces, none in the root namespace."""

    def root_links() -> set[str]:
        output = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
        return {line.split(":")[1].strip().split("@")[0] for line in output.stdout.splitlines()}

    before = root_links()
    with Lab(masquerade="none", recorder=False) as lab:
        pod = lab.add_pod("node-a", "x")
        ours = {"br0", "lan", "wan", "eth0", "kube-bridge", "router", "api", pod.host_interface}
        ours |= set(lab.nodes)
        new = root_links() - before
    assert not new & ours, new
