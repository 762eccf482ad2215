"""The start-up gate in the lab: real agents, real HTTP between the nodes, the real kernel.

One lab per backend (nftables beside kube-router's nft mode, iptables beside legacy
iptables) with agents on node-a (a forwarder) and node-b (the gateway): ``/egress?ip=`` answers 503 while no
gateway is known (the pods are rejected), 200 for programmed pods on the gateway and on
the forwarder (which asks node-b over its health port), 404 for a pod of an unlabelled
Service; and ``metaleg-supervisor wait-egress`` in a new pod's namespace, started before
the Pod exists in the API, returns once its egress works: the pod's very first packet
reaches the internet host from the LB IP.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab import LB_IP4, LB_IP6, Lab, Pod
from tests.lab.agents import BACKEND_IDS, BACKEND_LABS, SUPERVISOR, EgressLab, http_get
from tests.lab.topology import INTERNET4, UDP_PORT
from tests.lab.traffic import CLIENT_SCRIPT, PYTHON, new_token
from tests.waiting import wait_until

pytestmark = pytest.mark.lab

NAMESPACE, SERVICE = "mail", "relay"
PORT = 21794  # HEALTH_PROBE_BIND_ADDRESS's default, on every node
AGENTS = ("node-a", "node-b")
GATEWAY = "node-b"


def gate(egress: EgressLab, node: str, ip: str) -> tuple[int, dict[str, Any]]:
    """``GET /egress?ip=`` on ``node``'s agent, from inside the node (status 0: no answer)."""
    status, body = http_get(egress, node, PORT, f"/egress?ip={ip}")
    return status, json.loads(body) if status else {}


def wait_gate(
    egress: EgressLab, node: str, ip: str, status: int, fragment: str = "", timeout: float = 30
) -> dict[str, Any]:
    """Poll the gate until it answers ``status`` with ``fragment`` in the reason; the body."""
    last: list[Any] = [None]

    def answered() -> dict[str, Any] | None:
        code, body = gate(egress, node, ip)
        last[0] = (code, body)
        return body if code == status and fragment in body.get("reason", "") else None

    try:
        return wait_until(answered, timeout=timeout, interval=0.2)
    except TimeoutError:
        logs = "\n".join(f"--- {n}\n{a.log(3000)}" for n, a in egress.agents.items())
        raise AssertionError(
            f"{node} {ip}: wanted {status} {fragment!r}, last {last[0]}\n{logs}"
        ) from None


@pytest.fixture(
    scope="module",
    params=BACKEND_LABS,
    ids=BACKEND_IDS,
)
def egress(request: pytest.FixtureRequest) -> Iterator[EgressLab]:
    # The gate reads only what the workers report applied; both backends all the same,
    # since "applied" must mean the kernel has it with either.
    backend, masquerade = request.param
    with Lab(masquerade=masquerade) as lab, EgressLab(lab) as egress:
        for node in AGENTS:
            egress.add_pod(node, f"relay-{node[-1]}", {"app": SERVICE})
        egress.add_pod("node-a", "plain-a", {"app": "plain"})
        for node in AGENTS:
            egress.start_agent(node, FIREWALL_BACKEND=backend)
        for node in AGENTS:
            egress.wait_ready(node)
        cluster = egress.cluster
        cluster.service(NAMESPACE, "plain", (), labelled=False)
        cluster.service(NAMESPACE, SERVICE, (LB_IP4, LB_IP6))
        pods = [lab.pod("relay-a"), lab.pod("relay-b")]
        cluster.endpoints(NAMESPACE, SERVICE, "IPv4", [(p.ipv4, p.node) for p in pods])
        cluster.endpoints(NAMESPACE, SERVICE, "IPv6", [(p.ipv6, p.node) for p in pods])
        yield egress


def test_gate_answers_503_while_no_gateway_is_known(egress: EgressLab) -> None:
    for node in AGENTS:
        pod = egress.lab.pod(f"relay-{node[-1]}")  # each node knows its own pods only
        body = wait_gate(egress, node, pod.ipv4, 503, "no usable gateway: rejecting")
        assert body["service"] == "mail/relay" and body["role"] == "reject"
        assert body["gateway_node"] is None and body["generation"] >= 1
    assert gate(egress, "node-a", "not-an-ip")[0] == 400


def test_gate_answers_200_for_programmed_pods_and_404_for_others(egress: EgressLab) -> None:
    lab = egress.lab
    egress.cluster.gateway(NAMESPACE, SERVICE, GATEWAY)
    lab.announce(LB_IP4, GATEWAY)
    lab.announce(LB_IP6, GATEWAY)
    local, remote = lab.pod("relay-b"), lab.pod("relay-a")
    body = wait_gate(egress, GATEWAY, local.ipv4, 200)
    assert (body["role"], body["gateway_node"]) == ("gateway", GATEWAY) and LB_IP4 in body["reason"]
    wait_gate(egress, GATEWAY, remote.ipv6, 200)  # the gateway SNATs every node's pods
    for ip, lb_ip in ((remote.ipv4, LB_IP4), (remote.ipv6, LB_IP6)):
        body = wait_gate(egress, "node-a", ip, 200)
        assert (body["service"], body["role"], body["gateway_node"]) == (
            "mail/relay",
            "forwarder",
            GATEWAY,
        )
        assert f"via gateway node {GATEWAY} as {lb_ip}" in body["reason"]
    # 200 means it works: the forwarder's pod leaves with the LB IP.
    egress.wait_for_probe(remote, 4, source=LB_IP4, timeout=5)

    plain = lab.pod("plain-a")
    status, body = gate(egress, "node-a", plain.ipv4)
    assert status == 404 and body["service"] is None and "node-a" in body["reason"]


def _sources_since(lab: Lab, since: float) -> dict[str, int]:
    return dict(lab.sources_seen(since=since))


def test_wait_egress_in_a_new_pod_blocks_until_its_egress_works(egress: EgressLab) -> None:
    lab = egress.lab
    wait_gate(egress, "node-a", lab.pod("relay-a").ipv4, 200)  # the gateway is known
    pod: Pod = lab.add_pod("node-a", "relay-new")
    host = lab.node("node-a")
    token = new_token("gate")
    log_path = os.path.join(lab.workdir, "wait-egress.log")
    probe = [
        *PYTHON,
        str(CLIENT_SCRIPT),
        "probe",
        "--family=4",
        "--proto=udp",
        f"--target={INTERNET4}",
        f"--port={UDP_PORT}",
        f"--token={token}",
        "--timeout=2",
    ]
    # The init container, then the application's first packet: nothing in between.
    script = f'"$0" wait-egress --timeout 40s 2>"$1" && exec {" ".join(probe)}'
    since = time.time()
    with open(os.devnull, "rb") as devnull:
        process = lab.spawn(
            pod,
            "env",
            "-i",
            f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
            f"POD_IP={pod.ipv4}",
            f"HOST_IP={host.ipv4}",
            "sh",
            "-c",
            script,
            SUPERVISOR,
            log_path,
            stdin=devnull,
            stdout=subprocess.PIPE,
            text=True,
        )

    def log() -> str:
        try:
            with open(log_path) as file:
                return file.read()
        except FileNotFoundError:
            return ""

    # It waits: the agent does not know the pod yet.
    wait_until(lambda: "waiting: 404" in log(), timeout=20, message=lambda: f"404 in {log()!r}")
    assert process.poll() is None
    egress.cluster.pod(
        NAMESPACE,
        "relay-new",
        "node-a",
        (pod.ipv4, pod.ipv6),
        {"app": SERVICE},
        host_ips=(host.ipv4, host.ipv6),
    )
    try:
        out, _ = process.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"wait-egress did not return: {log()}") from None
    assert process.returncode == 0, (out, log())
    ready, result_line = out.strip().splitlines()[-2:]
    assert "egress ready" in ready and pod.ipv4 in ready, out
    result = json.loads(result_line)
    assert (result["outcome"], result["source"]) == ("ok", LB_IP4), (result, log())
    # The internet host saw the first packet from the LB IP, and nothing else from this pod.
    (record,) = lab.records(token=token)
    assert record.src == LB_IP4
    seen = _sources_since(lab, since)
    assert set(seen) <= {LB_IP4}, seen
