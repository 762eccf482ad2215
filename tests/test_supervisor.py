"""The supervisor as a real process: configuration errors, worker restarts, stop, cleanup."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from metaleg.ipc import (
    Applied,
    Hello,
    PublishChange,
    ResendRequest,
    Snapshot,
    StateChange,
    StateDelta,
    connect_worker,
    control_endpoint,
    decode,
    encode,
)
from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    GatewayRoute,
    NodeDesiredState,
    Role,
    ServiceEgress,
)
from metaleg.state_changes import ChangePublisher
from tests.lab.agents import SUPERVISOR, Agent
from tests.netns import namespace, run_in_netns, sh
from tests.processes import agent_processes, children_of, process_alive, process_state
from tests.waiting import wait_until


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


@contextlib.contextmanager
def running_agent(
    node_namespace: str, *, as_pid_1: bool = False
) -> Iterator[tuple[Agent, dict[str, str]]]:
    """A real ``metaleg-supervisor run`` in ``node_namespace`` with an API server that is
    not there (the watcher retries), killed in teardown if still running.

    ``as_pid_1``: as in its container, the supervisor is pid 1 of a PID namespace of its
    own (``agent.process`` is then ``unshare``, which SIGTERMs it if it is killed)."""
    with tempfile.TemporaryDirectory(prefix="mlsv") as run_dir:
        kubeconfig = os.path.join(run_dir, "kubeconfig")
        with open(kubeconfig, "w") as file:
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
        pid_namespace = (
            ["unshare", "--pid", "--mount-proc", "--kill-child=SIGTERM"] if as_pid_1 else []
        )
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                [*pid_namespace, "ip", "netns", "exec", node_namespace, SUPERVISOR, "run"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        agent = Agent("node-a", env["METALEG_RUN_DIR"], log_path, process)
        try:
            yield agent, env
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.netns
def test_workers_are_restarted_and_all_stop_on_sigterm(node_namespace: str) -> None:
    with running_agent(node_namespace) as (agent, env):
        process = agent.process
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


@pytest.mark.netns
def test_the_workers_run_under_a_supervisor_that_is_pid_1(node_namespace: str) -> None:
    # The DaemonSet's container: the supervisor is pid 1. A worker that took "my parent
    # is pid 1" for "my parent died" killed itself at every start (crash loop).
    with running_agent(node_namespace, as_pid_1=True) as (agent, env):
        context: zmq.Context[Any] = zmq.Context()

        def settled() -> dict[str, Any] | None:
            try:
                report = _status(context, env["METALEG_RUN_DIR"])
            except (TimeoutError, zmq.ZMQError):
                return None
            processes = {p["name"]: p for p in report["processes"]}
            restarted = {n: p["last_error"] for n, p in processes.items() if p["restarts"]}
            assert not restarted, f"workers restarted: {restarted}\n{agent.log()}"
            up = all(
                p["state"] == "running" and p["uptime_seconds"] >= 3 for p in processes.values()
            )
            return processes if up else None

        try:
            processes = wait_until(settled, timeout=30, message="workers up for 3 s")
        finally:
            context.term()
        assert processes["supervisor"]["pid"] == 1
        # unshare ignores SIGTERM while it waits: the supervisor (its child, pid 1 inside)
        # gets it, as from the kubelet, stops its workers and exits; unshare with it.
        (supervisor,) = children_of(agent.process.pid)
        os.kill(supervisor, signal.SIGTERM)
        assert agent.process.wait(20) == 0
        assert "stopping workers; kernel state stays in place" in agent.log(tail=1 << 22)


@pytest.mark.netns
def test_a_killed_fork_server_costs_a_restart_of_every_worker(node_namespace: str) -> None:
    with running_agent(node_namespace) as (agent, _):
        pids = wait_until(lambda: _all_pids(agent), timeout=15, message="three workers")
        server = agent_processes(agent.process.pid)["forkserver"]
        os.kill(server, signal.SIGKILL)

        def all_new() -> dict[str, int] | None:
            now = agent_processes(agent.process.pid)
            fresh = {w: now.get(w) for w in pids}
            if now.get("forkserver") in (None, server) or set(fresh.values()) & {
                None,
                *pids.values(),
            }:
                return None
            return now

        now = wait_until(all_new, timeout=20, message="a new fork server and new workers")
        for worker, pid in pids.items():
            assert not process_alive(pid), f"the old {worker} still runs beside the new one"
        assert "fork server lost" in agent.log(tail=1 << 22)
        # The old workers were orphans adopted by the supervisor (a subreaper): collected,
        # not left as zombies.
        wait_until(
            lambda: not [c for c in children_of(agent.process.pid) if process_state(c) == "Z"],
            timeout=10,
            message="no zombie children of the supervisor",
        )
        assert agent.process.poll() is None
        assert now["routing"] != pids["routing"]


@pytest.mark.netns
def test_workers_end_with_a_killed_supervisor(node_namespace: str) -> None:
    with running_agent(node_namespace) as (agent, _):
        wait_until(lambda: _all_pids(agent), timeout=15, message="three workers")
        processes = agent_processes(agent.process.pid)
        agent.process.kill()  # no chance to stop anything: the parent-death signals do it
        agent.process.wait()
        for name, pid in processes.items():
            wait_until(lambda pid=pid: not process_alive(pid), timeout=15, message=f"{name} gone")


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
    from metaleg.firewall.iptables.backend import IptablesBackend
    from metaleg.routing.backend import NetlinkRoutingBackend

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


# --- the hub: changes through the supervisor, with fake workers on real sockets ---------------


def _run_hub(run_dir: str, options: dict[str, Any] | None = None) -> None:
    """The supervisor's loop in a child process; its "workers" are sleeping processes, and
    the test speaks for them on DEALER sockets with their identities. ``options``: class
    attributes of the supervisor to change (``bus_send_hwm``, ``lag_resend_after``)."""
    from metaleg.config import Config
    from metaleg.logs import setup_logging
    from metaleg.supervisor.supervisor import Supervisor
    from metaleg.supervisor.workers import Worker

    class HubOnly(Supervisor):
        def _start(self, worker: Worker) -> None:
            worker.process = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(600)"]
            )
            worker.started_at = time.monotonic()

    options = dict(options or {})
    # The audit process (AUDIT_LOG) is left out unless asked for ({"audit_log": True}): the
    # peers speak for the three workers.
    audit_log = bool(options.pop("audit_log", False))
    for name, value in options.items():
        setattr(HubOnly, name, value)
    setup_logging("supervisor", "info", "text")
    config = Config(node_name="node-a", run_dir=run_dir, audit_log=audit_log)
    raise SystemExit(HubOnly(config).run())


class Peer:
    """One fake worker: a DEALER with the worker's identity."""

    def __init__(self, context: zmq.Context[Any], run_dir: str, name: str) -> None:
        self.socket = connect_worker(context, run_dir, name)

    def send(self, message: Any) -> None:
        self.socket.send(message if isinstance(message, bytes) else encode(message))

    def receive(self, timeout: float = 5.0) -> Any:
        if not self.socket.poll(int(timeout * 1000)):
            raise TimeoutError("nothing from the supervisor")
        return decode(self.socket.recv())

    def receive_after(self, generation: int) -> Any:
        """The next message but a complete snapshot of ``generation``: a Hello that reaches
        the supervisor after a new state (another connection, no order between them) is
        answered with a second one."""
        while True:
            message = self.receive()
            if not (isinstance(message, Snapshot) and message.generation == generation):
                return message

    def quiet(self, timeout: float = 0.3) -> bool:
        """Nothing arrives within ``timeout`` (a bound, not an expectation of timing)."""
        return not self.socket.poll(int(timeout * 1000))

    def close(self) -> None:
        self.socket.close(0)


def _status(context: zmq.Context[Any], run_dir: str) -> dict[str, Any]:
    request: zmq.Socket[Any] = context.socket(zmq.REQ)
    request.setsockopt(zmq.LINGER, 0)
    try:
        request.connect(control_endpoint(run_dir))
        request.send(b"status")
        if not request.poll(5000):
            raise TimeoutError("no status")
        report: dict[str, Any] = json.loads(request.recv())
        return report
    finally:
        request.close(0)


def _dropped(metrics_dir: str) -> float:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return sum(
        sample.value
        for family in registry.collect()
        if family.name == "metaleg_ipc_messages_dropped"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("process") == "supervisor"
    )


@pytest.fixture
def hub(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[str, str, zmq.Context[Any]]]:
    """A supervisor hub in a child process: (run dir, metrics dir, a context for peers).
    Indirect parameters: the supervisor's class attributes to change (see ``_run_hub``)."""
    options = getattr(request, "param", None)
    with tempfile.TemporaryDirectory(prefix="mlhub") as run_dir:
        metrics_dir = os.path.join(run_dir, "metrics")
        os.makedirs(metrics_dir)
        # The child's counters go to files the test reads.
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
        process = multiprocessing.get_context("spawn").Process(
            target=_run_hub, args=(run_dir, options)
        )
        process.start()
        context: zmq.Context[Any] = zmq.Context()
        try:
            wait_until(
                lambda: os.path.exists(control_endpoint(run_dir).removeprefix("ipc://")),
                timeout=15,
                message="the supervisor's control socket",
            )
            yield run_dir, metrics_dir, context
        finally:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
            process.join(15)
            context.term()


def _relay(*sources: str) -> ServiceEgress:
    return msgspec.structs.replace(
        STATE.services[1],
        families=(FamilyEgress(Family.IPV4, Action.SNAT, sources, snat_ip="198.51.100.201"),),
    )


def _with_relay(*sources: str) -> NodeDesiredState:
    services = tuple(
        sorted((STATE.services[0], _relay(*sources)), key=lambda s: (s.namespace, s.name))
    )
    return msgspec.structs.replace(STATE, services=services)


def test_the_supervisor_forwards_a_one_service_change_as_a_change(
    hub: tuple[str, str, zmq.Context[Any]],
) -> None:
    run_dir, metrics_dir, context = hub
    watcher, firewall, routing = (
        Peer(context, run_dir, n) for n in ("watcher", "firewall", "routing")
    )
    try:
        for peer, name in ((firewall, "firewall"), (routing, "routing")):
            peer.send(Hello(name, os.getpid()))
        publisher = ChangePublisher()
        first = _with_relay("10.244.1.11")
        watcher.send(publisher.frame(first, ("a problem",)))
        for peer in (firewall, routing):
            snapshot = peer.receive()
            assert isinstance(snapshot, Snapshot) and snapshot.generation == 1
            assert snapshot.state == first
        # One Service changes: the up-to-date workers get that change, not the state.
        second = _with_relay("10.244.1.11", "10.244.1.12")
        watcher.send(publisher.frame(second, ("a problem",)))
        for peer in (firewall, routing):
            message = peer.receive_after(1)
            assert isinstance(message, StateChange)
            assert (message.generation, message.base_generation) == (2, 1)
            assert message.delta == StateDelta(upserted=(_relay("10.244.1.11", "10.244.1.12"),))
        # The same state again (the watcher's liveness resend): no new generation.
        watcher.send(publisher.frame(second, ("a problem",)))
        report = _status(context, run_dir)
        assert report["generation"] == 2 and report["problems"] == ["a problem"]
        assert [s["source_ips"] for s in report["services"]] == [2, 2]
        assert firewall.quiet() and routing.quiet()
        # A restarted worker gets the complete current state at once.
        firewall.close()
        firewall = Peer(context, run_dir, "firewall")
        firewall.send(Hello("firewall", os.getpid()))
        snapshot = firewall.receive()
        assert isinstance(snapshot, Snapshot) and (snapshot.generation, snapshot.state) == (
            2,
            second,
        )
        # Applied generations are reported as before.
        firewall.send(Applied("firewall", 2))
        routing.send(Applied("routing", 2))
        wait_until(
            lambda: (
                {p["name"]: p["applied_generation"] for p in _status(context, run_dir)["processes"]}
                == {"supervisor": None, "watcher": None, "firewall": 2, "routing": 2}
            ),
            timeout=5,
            message="applied generations",
        )
        # A removal, forwarded as a change to both.
        third = msgspec.structs.replace(second, services=second.services[:1])
        watcher.send(publisher.frame(third, ()))
        for peer in (firewall, routing):
            message = peer.receive()
            assert isinstance(message, StateChange) and message.generation == 3
            assert message.delta == StateDelta(removed=(second.services[1].key,))
        assert _status(context, run_dir)["problems"] == []
        assert _dropped(metrics_dir) == 0
    finally:
        for peer in (watcher, firewall, routing):
            peer.close()


def test_the_supervisor_asks_for_a_complete_state_after_a_missed_change(
    hub: tuple[str, str, zmq.Context[Any]],
) -> None:
    run_dir, metrics_dir, context = hub
    watcher, firewall = Peer(context, run_dir, "watcher"), Peer(context, run_dir, "firewall")
    try:
        firewall.send(Hello("firewall", os.getpid()))
        publisher = ChangePublisher()
        first = _with_relay("10.244.1.11")
        watcher.send(publisher.frame(first))
        assert isinstance(firewall.receive(), Snapshot)
        # A change the supervisor never gets: the next one does not follow what it holds.
        publisher.frame(_with_relay("10.244.1.12"))
        third = _with_relay("10.244.1.13")
        watcher.send(publisher.frame(third))
        request = watcher.receive()
        assert isinstance(request, ResendRequest)
        assert publisher.handle(encode(request))
        watcher.send(publisher.frame(third))
        message = firewall.receive_after(1)
        # The firewall held generation 1: the supervisor's own change from it suffices.
        assert isinstance(message, StateChange) and (
            message.base_generation,
            message.generation,
        ) == (1, 2)
        assert message.delta == StateDelta(upserted=(_relay("10.244.1.13"),))
        assert _status(context, run_dir)["generation"] == 2
        wait_until(lambda: _dropped(metrics_dir) == 1, timeout=5, message="the drop counted")
    finally:
        watcher.close()
        firewall.close()


def test_the_supervisor_drops_malformed_changes_and_keeps_its_state(
    hub: tuple[str, str, zmq.Context[Any]],
) -> None:
    run_dir, metrics_dir, context = hub
    watcher, firewall = Peer(context, run_dir, "watcher"), Peer(context, run_dir, "firewall")
    try:
        firewall.send(Hello("firewall", os.getpid()))
        publisher = ChangePublisher()
        watcher.send(publisher.frame(STATE))
        assert isinstance(firewall.receive(), Snapshot)
        sequence = publisher.sequence
        broken = {
            "type": "publish-change",
            "sequence": sequence + 1,
            "base_sequence": sequence,
            "delta": {"upserted": [{"namespace": "mail"}]},
        }
        watcher.send(msgspec.msgpack.encode(broken))
        watcher.send(b"\x00garbage")
        # Well-formed but not fitting the state: dropped, and a complete state asked for.
        watcher.send(PublishChange(sequence + 1, sequence, StateDelta(removed=("mail/absent",))))
        assert isinstance(watcher.receive(), ResendRequest)
        wait_until(lambda: _dropped(metrics_dir) == 3, timeout=5, message="three drops counted")
        report = _status(context, run_dir)
        assert report["generation"] == 1
        assert [(s["namespace"], s["name"]) for s in report["services"]] == [
            ("mail", "relay"),
            ("mail", "other"),
        ]
        while not firewall.quiet():  # at most the second snapshot of generation 1
            message = firewall.receive()
            assert isinstance(message, Snapshot) and message.generation == 1
    finally:
        watcher.close()
        firewall.close()


def _many_sources(round_: int, count: int = 3000) -> tuple[str, ...]:
    return tuple(f"10.{100 + round_ % 100}.{i // 250}.{i % 250 + 1}" for i in range(count))


@pytest.mark.parametrize("hub", [{"bus_send_hwm": 2}], indirect=True)
def test_a_worker_whose_queue_was_full_gets_the_current_state_once_it_reads(
    hub: tuple[str, str, zmq.Context[Any]],
) -> None:
    run_dir, _, context = hub
    watcher = Peer(context, run_dir, "watcher")
    # A firewall that stops reading, with a small queue of its own.
    firewall: zmq.Socket[Any] = context.socket(zmq.DEALER)
    firewall.setsockopt(zmq.IDENTITY, b"firewall")
    firewall.setsockopt(zmq.LINGER, 0)
    firewall.setsockopt(zmq.RCVHWM, 2)
    firewall.connect(control_endpoint(run_dir).replace("control.sock", "bus.sock"))
    try:
        firewall.send(encode(Hello("firewall", os.getpid())))
        publisher = ChangePublisher()
        watcher.send(publisher.frame(_with_relay("10.244.1.11")))
        assert firewall.poll(5000)
        assert isinstance(decode(firewall.recv()), Snapshot)
        # Changes of ~45 KB each, far more than the queues and socket buffers hold.
        rounds = 60
        for round_ in range(rounds):
            watcher.send(publisher.frame(_with_relay(*_many_sources(round_))))
        newest = rounds + 1
        wait_until(
            lambda: _status(context, run_dir)["generation"] == newest,
            timeout=30,
            message="every change numbered",
        )
        received: list[Any] = []

        def next_message() -> Any:
            if firewall.poll(500):
                received.append(decode(firewall.recv()))
                return received[-1]
            return None

        wait_until(
            next_message,
            timeout=20,
            interval=0,
            message=lambda: f"Snapshot {newest}; generations: {[m.generation for m in received]}",
            accept=lambda message: isinstance(message, Snapshot) and message.generation == newest,
        )
        generations = [message.generation for message in received]
        assert set(range(2, newest + 1)) - set(generations), "no frame was dropped: no test"
        last = received[-1]
        assert isinstance(last, Snapshot), generations
        assert (last.generation, last.state) == (newest, _with_relay(*_many_sources(rounds - 1)))
    finally:
        watcher.close()
        firewall.close(0)


@pytest.mark.parametrize("hub", [{"lag_resend_after": 1.0}], indirect=True)
def test_a_worker_that_lags_behind_gets_the_complete_state_again(
    hub: tuple[str, str, zmq.Context[Any]],
) -> None:
    run_dir, _, context = hub
    watcher, firewall = Peer(context, run_dir, "watcher"), Peer(context, run_dir, "firewall")
    try:
        firewall.send(Hello("firewall", os.getpid()))
        publisher = ChangePublisher()
        watcher.send(publisher.frame(_with_relay("10.244.1.11")))
        assert isinstance(firewall.receive(), Snapshot)
        firewall.send(Applied("firewall", 1))
        second = _with_relay("10.244.1.12")
        watcher.send(publisher.frame(second))
        assert isinstance(firewall.receive_after(1), StateChange)
        # The change is lost with that connection: the next one (the same identity, as a
        # worker's DEALER reconnecting) still holds generation 1 and says so.
        firewall.close()
        firewall = Peer(context, run_dir, "firewall")
        firewall.send(Applied("firewall", 1))
        message = firewall.receive_after(1)
        assert isinstance(message, Snapshot) and (message.generation, message.state) == (
            2,
            second,
        )
        firewall.send(Applied("firewall", 2))
        assert firewall.quiet(2.5)  # caught up: nothing more
    finally:
        watcher.close()
        firewall.close()


def _run_firewall_without_kernel_support(run_dir: str, kubeconfig: str) -> None:
    """The real firewall worker on a "kernel" where neither backend's probe succeeds."""
    from metaleg.config import Config
    from metaleg.firewall.detect import choose_for_node, decide, evidence
    from metaleg.firewall.selection import UNUSABLE, build_firewall, report_unusable
    from metaleg.logs import setup_logging
    from metaleg.worker import DataplaneWorker

    def without_modules(configured: str) -> tuple[str, str]:
        nothing = decide(evidence("legacy", []), evidence("nft", []))
        choice = choose_for_node(configured, lambda: nothing, lambda name: f"{name}: no module")
        return choice.backend or UNUSABLE, choice.reason

    setup_logging("firewall", "info", "text")
    config = Config(node_name="node-a", run_dir=run_dir, kubeconfig=kubeconfig)
    firewall = build_firewall(config, without_modules)
    report_unusable(config, firewall)
    raise SystemExit(DataplaneWorker("firewall", firewall, config).run())


def test_no_usable_firewall_backend_is_an_error_in_status_and_an_event(
    hub: tuple[str, str, zmq.Context[Any]], tmp_path: Path
) -> None:
    from tests.kubeapi.control import write_kubeconfig
    from tests.kubeapi.server import KubeApiServer

    run_dir, _, context = hub
    api = KubeApiServer()
    api.start()
    kubeconfig = str(tmp_path / "kubeconfig")
    write_kubeconfig(kubeconfig, api.url)
    watcher = Peer(context, run_dir, "watcher")
    worker = multiprocessing.get_context("spawn").Process(
        target=_run_firewall_without_kernel_support, args=(run_dir, kubeconfig)
    )
    worker.start()
    try:
        watcher.send(ChangePublisher().frame(STATE))

        def firewall() -> dict[str, Any]:
            report = _status(context, run_dir)
            return next(p for p in report["processes"] if p["name"] == "firewall")

        wait_until(lambda: firewall()["last_error"], timeout=20, message="the firewall's error")
        expected = (
            "no usable firewall backend: nf_tables: nftables: no module; "
            "legacy ip_tables and ip_set: iptables: no module"
        )
        assert firewall()["last_error"] == expected
        report = _status(context, run_dir)
        assert report["firewall_backend"] == "none"
        assert not report["ready"]
        assert f"firewall applied generation 0 of 1: {expected}" in report["reasons"]
        # ... and the Node carries a Warning Event saying why, posted once at start.
        with urllib.request.urlopen(f"{api.url}/api/v1/namespaces/default/events", timeout=10) as r:
            events = json.loads(r.read())["items"]
        assert [
            (e["type"], e["reason"], e["involvedObject"]["kind"], e["involvedObject"]["name"])
            for e in events
        ] == [("Warning", "NoFirewallBackend", "Node", "node-a")]
        assert events[0]["message"] == (f"metaleg cannot program egress on this node: {expected}")
    finally:
        api.stop()
        watcher.close()
        if worker.pid is not None and worker.is_alive():
            os.kill(worker.pid, signal.SIGTERM)
        worker.join(15)
        if worker.is_alive():
            worker.kill()
            worker.join(5)
