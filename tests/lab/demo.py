"""``make demo``: metaleg at work in a local three-node lab of network namespaces.

It builds the lab (three nodes on one LAN, a router, an internet host, pods
behind each node's kube-bridge, kube-router-style masquerade), serves a
Kubernetes API emulator on the LAN, starts one real ``metaleg-supervisor run``
per node and then shows what the internet host sees as source address:
before and after labelling the mail relay's Service, and across a gateway
failover. Everything is torn down at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from tests.lab import LB_IP4, LB_IP6, Lab, Pod
from tests.lab.agents import EgressLab

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str) -> None:
    print(f"\n{BOLD}==> {text}{RESET}", flush=True)


def check_privileges() -> str | None:
    """Why the demo cannot run here, or None."""
    if os.geteuid() != 0:
        return "the demo builds network namespaces: run it as root (sudo make demo)"
    if shutil.which("ip") is None:
        return "iproute2 is missing (apt-get install iproute2)"
    probe = subprocess.run(
        ["ip", "netns", "add", f"mldemo-check-{os.getpid()}"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace (needs CAP_NET_ADMIN/CAP_SYS_ADMIN): {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"mldemo-check-{os.getpid()}"], capture_output=True)
    return None


def show_sources(
    egress: EgressLab,
    pods: list[Pod],
    expected: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> None:
    """Probe the internet host from every pod (UDP, IPv4 and IPv6) and print the source it saw.

    With ``expected`` (pod name -> IPv4 source), keep probing until it holds, so the
    table shows the settled state rather than a moment in a transition.
    """
    rows = []
    for pod in pods:
        if expected is not None and pod.name in expected:
            lb = expected[pod.name]
            egress.wait_for_probe(pod, 4, source=lb, timeout=timeout)
            egress.wait_for_probe(
                pod,
                6,
                source=LB_IP6 if lb == LB_IP4 else egress.lab.node(pod.node).ipv6,
                timeout=timeout,
            )
        v4 = egress.lab.probe(pod, family=4)
        v6 = egress.lab.probe(pod, family=6)
        rows.append(
            (pod.name, pod.node, pod.ipv4, v4.source or v4.outcome, v6.source or v6.outcome)
        )
    header = ("POD", "NODE", "POD IP", "SEEN AS (IPv4)", "SEEN AS (IPv6)")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "   "
            + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        )


def run_demo(masquerade: str) -> int:
    started = time.monotonic()
    say(
        f"Building the lab: 3 nodes, a router, an internet host (kube-router masquerade: {masquerade} iptables)"
    )
    with Lab(masquerade=masquerade) as lab, EgressLab(lab) as egress:  # type: ignore[arg-type]
        relay = [egress.add_pod(node, f"relay-{node[-1]}", {"app": "relay"}) for node in lab.nodes]
        web = egress.add_pod("node-a", "web-a", {"app": "web"})
        pods = [*relay, web]
        print(
            f"   LAN 198.51.100.0/24 + 2001:db8:1::/64; internet host {lab.internet.ipv4} / {lab.internet.ipv6}"
        )
        print(
            f"   Kubernetes API emulator at http://{lab.api.ipv4}:6443 (reached by the agents over the LAN)"
        )

        say("Starting one metaleg agent per node (metaleg-supervisor run)")
        for node in lab.nodes:
            egress.start_agent(node)
        for node in lab.nodes:
            pids = egress.wait_for_workers(node)
            print(f"   {node}: " + ", ".join(f"{worker} pid {pid}" for worker, pid in pids.items()))

        say("Before: every pod leaves with its node's IP")
        show_sources(egress, pods)

        say(
            f"Label Service mail/relay (metaleg.de/rewriteSrcIP=true), LB IPs {LB_IP4} / {LB_IP6}, MetalLB announces from node-b"
        )
        cluster = egress.cluster
        cluster.service("mail", "relay", (LB_IP4, LB_IP6))
        cluster.endpoints("mail", "relay", "IPv4", [(p.ipv4, p.node) for p in relay])
        cluster.endpoints("mail", "relay", "IPv6", [(p.ipv6, p.node) for p in relay])
        cluster.gateway("mail", "relay", "node-b")
        lab.announce(LB_IP4, "node-b")
        lab.announce(LB_IP6, "node-b")
        t0 = time.monotonic()
        show_sources(egress, pods, expected={p.name: LB_IP4 for p in relay})
        print(
            f"{DIM}   (relay pods on all three nodes now send from the LB IP; web-a is not labelled; settled in {time.monotonic() - t0:.1f}s){RESET}"
        )

        say("Failover: MetalLB moves the IP to node-c")
        cluster.gateway("mail", "relay", "node-c")
        lab.announce(LB_IP4, "node-c")
        lab.announce(LB_IP6, "node-c")
        t0 = time.monotonic()
        show_sources(egress, pods, expected={p.name: LB_IP4 for p in relay})
        print(f"{DIM}   (settled in {time.monotonic() - t0:.1f}s){RESET}")

        _, report = egress.status("node-a")
        backend = report["firewall_backend"] if report else "?"
        say(f"Kernel state on node-a (a forwarder; FIREWALL_BACKEND=auto chose {backend})")
        for line in lab.exec("node-a", "ip", "rule", "show").splitlines():
            if "fwmark" in line:
                print(f"   {line}")
        if backend == "nftables":
            listing = lab.exec("node-a", "nft", "list", "chain", "inet", "metaleg", "prerouting")
        else:
            listing = lab.exec("node-a", "iptables-legacy", "-t", "mangle", "-S", "METALEG-RT-MARK")
        for line in listing.splitlines():
            if line.strip() and not line.strip().startswith(("table", "}")):
                print(f"   {line.rstrip()}")

        say("metaleg-supervisor status on node-a")
        _, text = egress.status("node-a", json_output=False)
        print("\n".join(f"   {line}" for line in text.rstrip().splitlines()))

        say("Unlabel the Service: node IPs again")
        cluster.label_service("mail", "relay", False)
        show_sources(egress, pods, expected={p.name: lab.node(p.node).ipv4 for p in relay})

        say("Tearing down")
    print(
        f"\n{BOLD}Done in {time.monotonic() - started:.0f}s.{RESET} Nothing is left behind (ip netns list)."
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument(
        "--masquerade",
        choices=["legacy", "nft"],
        default="nft",
        help="the iptables mode of the lab's kube-router masquerade (nft: today's distributions)",
    )
    arguments = parser.parse_args()
    problem = check_privileges()
    if problem:
        print(f"make demo: {problem}", file=sys.stderr)
        raise SystemExit(1)
    raise SystemExit(run_demo(arguments.masquerade))


if __name__ == "__main__":
    main()
