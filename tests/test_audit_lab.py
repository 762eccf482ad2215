"""The SNAT audit log through the real agent, in the lab.

A pod on node-a (a forwarder) sends to the internet host through the gateway
node-b, which SNATs it to the LB IP. For each of several connections (IPv4 and
IPv6, TCP and UDP) the internet host reports the LB IP and source port it saw;
node-b's agent log (JSON) must hold exactly one audit line mapping that
LB IP:port to the pod's IP, and the forwarder's none.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.lab import LB_IP4, LB_IP6, Lab, ProbeResult
from tests.lab.agents import EgressLab
from tests.waiting import wait_until

pytestmark = pytest.mark.lab

NAMESPACE, SERVICE = "mail", "relay"
GATEWAY, FORWARDER = "node-b", "node-a"
CONNECTIONS = 3
"""Connections per family and protocol."""
WHOLE_LOG = 1 << 24


def audit_lines(egress: EgressLab, node: str) -> list[dict[str, Any]]:
    lines = []
    for text in egress.agents[node].log(tail=WHOLE_LOG).splitlines():
        if '"audit"' not in text:
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if entry.get("audit") == "snat":
            lines.append(entry)
    return lines


def status_of(egress: EgressLab, node: str) -> dict[str, Any]:
    _, report = egress.status(node)
    return report or {}


def audit_holds_the_gateway_state(egress: EgressLab) -> bool:
    """node-b's audit process holds the newest generation, in which it is the gateway."""
    report = status_of(egress, GATEWAY)
    audit = next((p for p in report.get("processes", []) if p["name"] == "audit"), None)
    roles = [s["role"] for s in report.get("services", [])]
    return (
        audit is not None
        and audit["state"] == "running"
        and audit["applied_generation"] == report.get("generation")
        and not audit["last_error"]
        and roles == ["gateway"]
    )


def test_every_snated_connection_has_exactly_one_audit_line_on_the_gateway() -> None:
    with Lab(masquerade="nft") as lab, EgressLab(lab, LOG_FORMAT="json") as egress:
        pod = egress.add_pod(FORWARDER, "relay-a", {"app": SERVICE})
        for node in (FORWARDER, GATEWAY):
            egress.start_agent(node)
        for node in (FORWARDER, GATEWAY):
            egress.wait_ready(node)
        egress.cluster.service(NAMESPACE, SERVICE, (LB_IP4, LB_IP6))
        egress.cluster.endpoints(NAMESPACE, SERVICE, "IPv4", [(pod.ipv4, pod.node)])
        egress.cluster.endpoints(NAMESPACE, SERVICE, "IPv6", [(pod.ipv6, pod.node)])
        egress.cluster.gateway(NAMESPACE, SERVICE, GATEWAY)
        lab.announce(LB_IP4, GATEWAY)
        lab.announce(LB_IP6, GATEWAY)
        wait_until(
            lambda: audit_holds_the_gateway_state(egress),
            timeout=30,
            interval=0.2,
            message=lambda: f"node-b's audit process: {status_of(egress, GATEWAY)}",
        )
        # The forwarder marks and routes (until then the pod's traffic is rejected).
        for family in (4, 6):
            egress.wait_for_probe(pod, family, source=LB_IP4 if family == 4 else LB_IP6)

        results: list[tuple[int, str, ProbeResult]] = []
        for family in (4, 6):
            for proto in ("tcp", "udp"):
                for _ in range(CONNECTIONS):
                    result = lab.probe(pod, family=family, proto=proto)  # type: ignore[arg-type]
                    assert result.ok and result.source == (LB_IP4 if family == 4 else LB_IP6), (
                        result
                    )
                    results.append((family, proto, result))

        def line_for(proto: str, result: ProbeResult) -> list[dict[str, Any]]:
            return [
                line
                for line in audit_lines(egress, GATEWAY)
                if (line["proto"], line["snat_ip"], line["snat_port"])
                == (proto, result.source, result.sport)
            ]

        wait_until(
            lambda: all(line_for(proto, result) for _, proto, result in results),
            timeout=20,
            interval=0.2,
            message=lambda: f"audit lines: {audit_lines(egress, GATEWAY)}",
        )
        for family, proto, result in results:
            lines = line_for(proto, result)
            assert len(lines) == 1, (proto, result, lines)
            (line,) = lines
            assert line["pod_ip"] == (pod.ipv4 if family == 4 else pod.ipv6)
            assert line["service"] == f"{NAMESPACE}/{SERVICE}"
            assert line["process"] == "audit" and isinstance(line["pod_port"], int)
        # The forwarder SNATs nothing: no audit line there.
        assert audit_lines(egress, FORWARDER) == []
