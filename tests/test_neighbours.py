"""One agent per node: a second supervisor is refused before it touches anything.

Real ``metaleg-supervisor run`` processes in a network namespace of their own
(abstract Unix socket names and TCP ports belong to a network namespace, as
on a node with hostNetwork pods).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest

from tests.lab.agents import SUPERVISOR
from tests.netns import namespace, sh
from tests.waiting import wait_until

pytestmark = pytest.mark.netns

KUBECONFIG = (
    '{"apiVersion":"v1","kind":"Config","clusters":[{"name":"c","cluster":{"server":"http://127.0.0.1:9"}}],'
    '"users":[{"name":"u","user":{}}],"contexts":[{"name":"x","context":{"cluster":"c","user":"u"}}],"current-context":"x"}'
)


class Node:
    """A network namespace and a scratch directory; every process started is stopped."""

    def __init__(self, netns: str, scratch: str) -> None:
        self.netns = netns
        self.scratch = scratch
        self.kubeconfig = os.path.join(scratch, "kubeconfig")
        with open(self.kubeconfig, "w") as file:  # no API server: the watcher retries
            file.write(KUBECONFIG)
        self.processes: list[subprocess.Popen[bytes]] = []

    def env(self, run_dir: str, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "NODE_NAME": "node-a",
            "KUBECONFIG": self.kubeconfig,
            "METALEG_RUN_DIR": run_dir,
            "LOG_FORMAT": "text",
            **extra,
        }

    def start(self, run_dir: str, **extra: str) -> subprocess.Popen[bytes]:
        """A supervisor left running; waits until it serves status."""
        log = open(os.path.join(self.scratch, f"agent-{len(self.processes)}.log"), "wb")  # noqa: SIM115
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, SUPERVISOR, "run"],
            env=self.env(run_dir, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        wait_until(
            lambda: self.status(run_dir).returncode in (0, 3),
            timeout=20,
            message="the first supervisor answers status",
        )
        return process

    def run(self, run_dir: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """A supervisor expected to exit at once."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, SUPERVISOR, "run"],
            env=self.env(run_dir, **extra),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def status(self, run_dir: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, SUPERVISOR, "status", "--json"],
            env=self.env(run_dir),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def node() -> Iterator[Node]:
    with namespace("mlnb") as netns, tempfile.TemporaryDirectory(prefix="mlnb") as scratch:
        node = Node(netns, scratch)
        try:
            yield node
        finally:
            node.stop()


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _kernel(netns: str) -> str:
    return (
        sh("nft", "list", "ruleset", netns=netns)
        + sh("iptables-legacy-save", netns=netns)
        + sh("ip", "rule", netns=netns)
    )


def test_a_second_agent_on_the_same_run_dir_is_refused_and_wipes_nothing(node: Node) -> None:
    run_dir = os.path.join(node.scratch, "run")
    first = node.start(run_dir)
    metrics = os.path.join(run_dir, "metrics")
    wait_until(lambda: len(os.listdir(metrics)) > 0, timeout=15, message="metrics files")
    files = sorted(os.listdir(metrics))
    # Other ports, so that only the lock can tell.
    result = node.run(run_dir, METRICS_BIND_ADDRESS=":31793", HEALTH_PROBE_BIND_ADDRESS=":31794")
    assert result.returncode == 4
    line = _one_line(result)
    assert (
        f"another metaleg supervisor (pid {first.pid}) runs with METALEG_RUN_DIR={run_dir}" in line
    )
    assert set(files) <= set(os.listdir(metrics)), "the running agent's metrics were wiped"
    assert first.poll() is None
    assert node.status(run_dir).returncode in (0, 3)


def test_a_second_agent_with_another_run_dir_is_refused(node: Node) -> None:
    first = node.start(os.path.join(node.scratch, "one"))
    second_dir = os.path.join(node.scratch, "two")
    result = node.run(second_dir, METRICS_BIND_ADDRESS="0", HEALTH_PROBE_BIND_ADDRESS="0")
    assert result.returncode == 4
    line = _one_line(result)
    assert f"another metaleg agent (pid {first.pid}) runs on this node" in line
    assert "@metaleg-agent" in line
    assert not os.path.exists(os.path.join(second_dir, "metrics"))
    assert not os.path.exists(os.path.join(second_dir, "bus.sock"))
    assert first.poll() is None
    # Once the first one is gone, the second starts.
    first.send_signal(signal.SIGTERM)
    assert first.wait(15) == 0
    node.start(second_dir, METRICS_BIND_ADDRESS="0", HEALTH_PROBE_BIND_ADDRESS="0")


GO_METRICS_SERVER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = sys.argv[2].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (
            "# TYPE go_goroutines gauge\ngo_goroutines 12\ncontroller_runtime_reconcile_total 3\n",
            4,
            "probably the Go original MetalEG still running on this node",
        ),
        ("hello\n", 2, "METRICS_BIND_ADDRESS=':21793': in use by another process on this node"),
    ],
)
def test_a_process_on_the_metrics_port_is_refused_before_anything_is_touched(
    node: Node, body: str, status: int, fragment: str
) -> None:
    squatter = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, "python3", "-c", GO_METRICS_SERVER, "21793", body]
    )
    node.processes.append(squatter)
    wait_until(
        lambda: "21793" in sh("ss", "-ltn", netns=node.netns), timeout=10, message="listening"
    )
    before = _kernel(node.netns)
    run_dir = os.path.join(node.scratch, "run")
    result = node.run(run_dir)
    assert result.returncode == status
    assert fragment in _one_line(result)
    assert not os.path.exists(os.path.join(run_dir, "metrics"))
    assert not os.path.exists(os.path.join(run_dir, "bus.sock"))
    assert _kernel(node.netns) == before


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda scratch: "/" + "r" * 94, "too long for a Unix socket path"),
        (lambda scratch: os.path.join(scratch, "kubeconfig"), "exists and is not a directory"),
        (
            lambda scratch: os.path.join(scratch, "kubeconfig", "run"),
            "cannot be created: a parent is not a directory",
        ),
    ],
)
def test_run_dir_problems_exit_2_with_one_line(node: Node, make: object, fragment: str) -> None:
    assert callable(make)
    run_dir = make(node.scratch)
    result = node.run(run_dir)
    assert result.returncode == 2
    line = _one_line(result)
    assert f"METALEG_RUN_DIR={run_dir!r}" in line and fragment in line


def test_a_refused_agent_posts_a_warning_event_on_its_node(node: Node) -> None:
    from tests.kubeapi.control import write_kubeconfig
    from tests.kubeapi.server import KubeApiServer

    with KubeApiServer() as api:
        api.add_listener("127.0.0.1", 6443, netns=node.netns)
        write_kubeconfig(node.kubeconfig, "http://127.0.0.1:6443")
        node.start(os.path.join(node.scratch, "one"))
        result = node.run(os.path.join(node.scratch, "two"))
        assert result.returncode == 4
        line = _one_line(result).removeprefix("metaleg-supervisor: ")
        with urllib.request.urlopen(f"{api.url}/api/v1/namespaces/default/events", timeout=10) as r:
            events = json.loads(r.read())["items"]
        assert [
            (e["type"], e["reason"], e["involvedObject"]["kind"], e["involvedObject"]["name"])
            for e in events
        ] == [("Warning", "SecondAgentRefused", "Node", "node-a")]
        assert events[0]["message"] == line
