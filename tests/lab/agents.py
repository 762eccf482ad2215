"""The lab as a cluster: a Kubernetes API emulator on the LAN and one metaleg agent per node.

:class:`EgressLab` wraps a running :class:`~tests.lab.topology.Lab`: it serves
the API emulator inside the lab's ``api`` namespace (so the agents reach it
over the lab network, like a real control plane), registers the three nodes,
and starts a real ``metaleg-supervisor run`` inside each node namespace with
its own METALEG_RUN_DIR. Tests, the demo and benchmarks drive the cluster
through :attr:`EgressLab.cluster` (the unmodified kubernetes client over HTTP).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import metaleg
from tests.kube import ClusterDriver
from tests.kubeapi import KubeApiServer, write_kubeconfig
from tests.lab.topology import Lab, Pod
from tests.lab.traffic import ProbeResult
from tests.processes import agent_processes
from tests.waiting import wait_until

API_PORT = 6443
#: The agents run the metaleg package these tests import (also from another checkout, for
#: instance ``git archive`` of an older commit, while the venv installs this one): it is
#: their PYTHONPATH and their working directory (``python -m``, which starts the workers,
#: puts the working directory ahead of PYTHONPATH).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(metaleg.__file__)))
SUPERVISOR = os.path.join(os.path.dirname(sys.executable), "metaleg-supervisor")
#: Each firewall backend with the node firewall the lab puts beside it (``Lab(masquerade=)``):
#: nftables beside kube-router's nft mode, iptables beside legacy iptables. For
#: ``pytest.fixture(params=BACKEND_LABS, ids=BACKEND_IDS)``.
BACKEND_LABS = (("nftables", "nft"), ("iptables", "legacy"))
BACKEND_IDS = ("nftables", "iptables")


@dataclass
class Agent:
    """One node's running ``metaleg-supervisor run``."""

    node: str
    run_dir: str
    log_path: str
    process: subprocess.Popen[Any]
    env: dict[str, str] = field(default_factory=dict)

    def worker_pid(self, worker: str) -> int | None:
        """The pid of the agent's ``worker`` process (forked by its fork server)."""
        return agent_processes(self.process.pid).get(worker)

    def log(self, tail: int = 6000) -> str:
        try:
            with open(self.log_path, errors="replace") as file:
                return file.read()[-tail:]
        except FileNotFoundError:
            return ""


class EgressLab:
    """A lab with the API emulator and metaleg agents; a context manager."""

    def __init__(self, lab: Lab, *, pod_cidrs: bool = True, **agent_env: str) -> None:
        """``pod_cidrs=False``: the Node objects carry no ``spec.podCIDR(s)``, as with
        Calico-style IPAM (the lab's nodes still route each other's pod networks)."""
        self.lab = lab
        self.pod_cidrs = pod_cidrs
        self.agent_env = agent_env
        self.api = KubeApiServer(bookmark_interval=5.0)
        self.agents: dict[str, Agent] = {}
        self.kubeconfig = os.path.join(lab.workdir, "kubeconfig")
        self.cluster: ClusterDriver

    def __enter__(self) -> EgressLab:
        self.api.start()
        try:
            self.api.add_listener(self.lab.api.ipv4, API_PORT, netns=self.lab.api.netns)
            write_kubeconfig(self.kubeconfig, f"http://{self.lab.api.ipv4}:{API_PORT}")
            self.cluster = ClusterDriver(self.api.api_client())
            for node in self.lab.nodes.values():
                cidrs = (node.pod_cidr4, node.pod_cidr6) if self.pod_cidrs else ()
                self.cluster.node(node.name, node.ipv4, node.ipv6, cidrs)
        except BaseException:
            self.api.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for node in list(self.agents):
            self.stop_agent(node)
        self.api.stop()

    def add_pod(self, node: str, name: str, labels: dict[str, str], namespace: str = "mail") -> Pod:
        """A lab pod on ``node`` and its Pod object (with its IPs, as the kubelet reports them)."""
        pod = self.lab.add_pod(node, name)
        host = self.lab.node(node)
        self.cluster.pod(
            namespace, name, node, (pod.ipv4, pod.ipv6), labels, host_ips=(host.ipv4, host.ipv6)
        )
        return pod

    def add_host_network_pod(
        self, node: str, name: str, labels: dict[str, str], namespace: str = "mail"
    ) -> tuple[str, str]:
        """A ``hostNetwork: true`` Pod object on ``node``: it has no namespace of its own, its
        IPs are the node's (as the kubelet reports them). Returns its (IPv4, IPv6)."""
        host = self.lab.node(node)
        ips = (host.ipv4, host.ipv6)
        self.cluster.pod(namespace, name, node, ips, labels, host_network=True, host_ips=ips)
        return ips

    # --- agents ----------------------------------------------------------------------------------

    def start_agent(self, node: str, **env: str) -> Agent:
        """Start ``metaleg-supervisor run`` in the node's namespace."""
        if node in self.agents and self.agents[node].process.poll() is None:
            raise RuntimeError(f"the agent on {node} runs already")
        run_dir = os.path.join(self.lab.workdir, f"run-{node}")
        log_path = os.path.join(self.lab.workdir, f"agent-{node}.log")
        environment = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "PYTHONPATH": PACKAGE_ROOT,
            "NODE_NAME": node,
            "KUBECONFIG": self.kubeconfig,
            "METALEG_RUN_DIR": run_dir,
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "info",
            "RECONCILIATION_INTERVAL": "30s",
            **self.agent_env,
            **env,
        }
        log_file = open(log_path, "a")  # noqa: SIM115 - handed to the child, closed with it below
        try:
            process = self.lab.spawn(
                node,
                "env",
                "-i",
                *(f"{k}={v}" for k, v in environment.items()),
                SUPERVISOR,
                "run",
                cwd=PACKAGE_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        finally:
            log_file.close()
        agent = Agent(node, run_dir, log_path, process, environment)
        self.agents[node] = agent
        return agent

    def stop_agent(self, node: str, timeout: float = 15.0) -> int | None:
        """SIGTERM the supervisor (it stops its workers) and wait; returns its exit status."""
        agent = self.agents.pop(node, None)
        if agent is None:
            return None
        process = agent.process
        if process.poll() is None:
            # `ip netns exec` execs the command, so the pid is the supervisor's own.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def wait_for_workers(self, node: str, timeout: float = 15.0) -> dict[str, int]:
        """Wait until all three workers of the node's agent run; return their pids."""
        agent = self.agents[node]
        pids: dict[str, int] = {}

        def ready() -> bool:
            if agent.process.poll() is not None:
                raise AssertionError(f"the agent on {node} exited: {agent.log()}")
            for worker in ("watcher", "firewall", "routing"):
                pid = agent.worker_pid(worker)
                if pid is None:
                    return False
                pids[worker] = pid
            return True

        wait_until(ready, timeout=timeout, message=f"workers of {node}")
        return pids

    def status(self, node: str, *, json_output: bool = True) -> tuple[int, Any]:
        """``metaleg-supervisor status [--json]`` run in the node's namespace: (exit status, output).

        With ``json_output`` the output is the decoded report (None when there is none).
        """
        agent = self.agents[node]
        argv = [SUPERVISOR, "status", *(["--json"] if json_output else [])]
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.lab.node(node).netns,
                "env",
                "-i",
                *(f"{k}={v}" for k, v in agent.env.items()),
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if not json_output:
            return result.returncode, result.stdout + result.stderr
        return result.returncode, json.loads(result.stdout) if result.stdout.strip() else None

    def wait_ready(self, node: str, timeout: float = 30.0) -> Any:
        """Wait until the node's agent reports healthy and ready; return its status report."""
        last: list[Any] = [None]

        def ready() -> bool:
            code, report = self.status(node)
            last[0] = report
            return code == 0

        try:
            wait_until(ready, timeout=timeout, interval=0.2, message=f"agent on {node} ready")
        except TimeoutError as error:
            raise AssertionError(f"{error}: {last[0]}\n{self.agents[node].log()}") from None
        return last[0]

    # --- traffic ---------------------------------------------------------------------------------

    def wait_for_probe(
        self,
        pod: Pod,
        family: int,
        *,
        source: str | None = None,
        outcome: str = "ok",
        proto: str = "udp",
        timeout: float = 20.0,
    ) -> ProbeResult:
        """Probe the internet host from ``pod`` until the result has ``outcome`` (and ``source``)."""
        last: list[ProbeResult] = []

        def matches() -> bool:
            result = self.lab.probe(pod, family=family, proto=proto, timeout=1.0)  # type: ignore[arg-type]
            last[:] = [result]
            return result.outcome == outcome and (source is None or result.source == source)

        try:
            wait_until(matches, timeout=timeout, interval=0.1, message=f"probe from {pod.name}")
        except Exception as error:
            logs = "\n".join(f"--- {n}\n{a.log(3000)}" for n, a in self.agents.items())
            raise AssertionError(
                f"{pod.name} IPv{family}/{proto}: wanted {outcome} {source or ''}, last {last}: {error}\n{logs}"
            ) from None
        return last[0]


def http_get(egress: EgressLab, node: str, port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:<port><path> from inside the node's namespace (status 0: no answer)."""
    script = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
        "except OSError as e:  # not listening yet (the agent is starting)\n"
        "    print(0); print(e)\n"
    )
    out = egress.lab.exec(node, "python3", "-c", script)
    status, _, body = out.partition("\n")
    return int(status), body


def read_json(path: str) -> Any:
    with open(path) as file:
        return json.load(file)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
