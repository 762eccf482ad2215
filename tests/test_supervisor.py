"""The supervisor as a real process: configuration errors, worker restarts, stop, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    GatewayRoute,
    NodeDesiredState,
    Role,
    ServiceEgress,
)
from tests.lab.agents import SUPERVISOR, Agent
from tests.lab.traffic import wait_until
from tests.netns import namespace, run_in_netns, sh
from tests.processes import process_alive


def run_cli(
    *args: str, env: dict[str, str], netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [SUPERVISOR, *args]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    return subprocess.run(
        command, env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "NODE_NAME is unset"),
        ({"NODE_NAME": "n", "FIREWALL_MASK": "0x00F0F000"}, "FIREWALL_MASK='0x00F0F000'"),
        ({"NODE_NAME": "n", "RECONCILIATION_INTERVAL": "5"}, "RECONCILIATION_INTERVAL='5'"),
        ({"NODE_NAME": "n", "METRICS_BIND_ADDRESS": "nope"}, "METRICS_BIND_ADDRESS='nope'"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(env: dict[str, str], fragment: str) -> None:
    result = run_cli("run", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.fixture
def node_namespace() -> Iterator[str]:
    with namespace("mlsv") as name:
        # A veth pair inside the namespace (this kernel has no dummy links) gives on-link next hops.
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", netns=name)
        sh("ip", "addr", "add", "198.51.100.11/24", "dev", "eth0", netns=name)
        sh("ip", "link", "set", "eth0", "up", netns=name)
        sh("ip", "link", "set", "eth1", "up", netns=name)
        yield name


@pytest.mark.netns
def test_workers_are_restarted_and_all_stop_on_sigterm(node_namespace: str) -> None:
    with tempfile.TemporaryDirectory(prefix="mlsv") as run_dir:
        kubeconfig = os.path.join(run_dir, "kubeconfig")
        with open(kubeconfig, "w") as file:  # an API server that is not there: the watcher retries
            file.write(
                '{"apiVersion":"v1","kind":"Config","clusters":[{"name":"c","cluster":{"server":"http://127.0.0.1:9"}}],'
                '"users":[{"name":"u","user":{}}],"contexts":[{"name":"x","context":{"cluster":"c","user":"u"}}],"current-context":"x"}'
            )
        log_path = os.path.join(run_dir, "agent.log")
        env = {
            "PATH": os.environ["PATH"],
            "NODE_NAME": "node-a",
            "KUBECONFIG": kubeconfig,
            "METALEG_RUN_DIR": os.path.join(run_dir, "run"),
            "LOG_FORMAT": "text",
        }
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                ["ip", "netns", "exec", node_namespace, SUPERVISOR, "run"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        agent = Agent("node-a", env["METALEG_RUN_DIR"], log_path, process)
        try:
            pids = wait_until(lambda: _all_pids(agent), timeout=15, message="three workers")
            assert oct(os.stat(env["METALEG_RUN_DIR"]).st_mode & 0o777) == "0o700"
            os.kill(pids["routing"], signal.SIGKILL)
            new = wait_until(
                lambda: (p := agent.worker_pid("routing")) not in (None, pids["routing"]) and p,
                timeout=10,
                message="routing restarted",
            )
            assert new != pids["routing"]
            # The whole log: without an API server the watcher's retries fill the tail.
            whole = 1 << 22
            assert "routing died (signal 9); restarting in 0.5s" in agent.log(tail=whole)
            # A second crash soon after backs off longer.
            os.kill(new, signal.SIGKILL)
            wait_until(
                lambda: "restarting in 1.0s" in agent.log(tail=whole),
                timeout=10,
                message="back-off",
            )
            survivors = _all_pids(agent) or pids
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
            for pid in survivors.values():
                assert not process_alive(pid), f"worker {pid} outlived the supervisor"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _all_pids(agent: Agent) -> dict[str, int] | None:
    pids = {w: agent.worker_pid(w) for w in ("watcher", "firewall", "routing")}
    return None if None in pids.values() else pids  # type: ignore[return-value]


STATE = NodeDesiredState(
    node="node-a",
    fwmask=0xF00000,
    exclude_dst_ipv4=("10.0.0.0/8",),
    exclude_dst_ipv6=("fc00::/7",),
    services=(
        ServiceEgress(
            "mail",
            "relay",
            Role.FORWARDER,
            "node-b",
            ("198.51.100.200", "2001:db8:1::200"),
            (
                FamilyEgress(Family.IPV4, Action.MARK, ("10.244.1.10",), fwmark=0x100000),
                FamilyEgress(Family.IPV6, Action.MARK, ("fd00:10:244:1::10",), fwmark=0x100000),
            ),
        ),
        ServiceEgress(
            "mail",
            "other",
            Role.GATEWAY,
            "node-a",
            ("198.51.100.201",),
            (FamilyEgress(Family.IPV4, Action.SNAT, ("10.244.1.11",), snat_ip="198.51.100.201"),),
        ),
    ),
    routes=(GatewayRoute("node-b", 1, 0x100000, 100001, "198.51.100.12", None),),
)


def _apply_everything() -> None:
    from metaleg.firewall.iptables import IptablesBackend
    from metaleg.routing.netlink import NetlinkRoutingBackend

    for backend in (IptablesBackend(), NetlinkRoutingBackend(100000, 0xF00000)):
        try:
            backend.resync(STATE)
        finally:
            backend.close()


@pytest.mark.netns
def test_cleanup_removes_every_kernel_object_and_is_idempotent(node_namespace: str) -> None:
    run_in_netns(node_namespace, _apply_everything)
    before = sh("iptables-legacy-save", netns=node_namespace) + sh(
        "ip", "rule", netns=node_namespace
    )
    assert "METALEG-SNAT" in before and "31001" in before
    for _ in range(2):
        result = run_cli("cleanup", env={"LOG_FORMAT": "text"}, netns=node_namespace)
        assert result.returncode == 0, result.stderr
    for command in (
        ["iptables-legacy-save"],
        ["ip6tables-legacy-save"],
        ["ipset", "list", "-n"],
        ["ip", "rule"],
        ["ip", "-6", "rule"],
    ):
        out = sh(*command, netns=node_namespace)
        assert "METALEG" not in out and "3100" not in out, (command, out)
    assert sh("ip", "route", "show", "table", "100001", netns=node_namespace).strip() == ""
