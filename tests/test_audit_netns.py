"""The SNAT audit process against the kernel, in network namespaces.

Connections SNATed by nft in a "gateway" namespace towards a recorder in a
second namespace, which reports the source address and port it saw; the real
``python -m metaleg.audit`` process, fed its desired state by a stand-in
supervisor, must write exactly one line per connection with that address and
port. Also: the rate bound and its counters, ``nf_conntrack_events=0`` reported,
and events lost to a full socket buffer counted exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from metaleg.audit.listener import EventListener, conntrack_events_setting
from metaleg.config import Config
from metaleg.ipc import (
    Applied,
    AuditCounts,
    Hello,
    Snapshot,
    StateChange,
    StateDelta,
    decode,
    encode,
)
from metaleg.lifecycle import CONFIG_ENVIRONMENT
from metaleg.model import Action, Family, FamilyEgress, NodeDesiredState, Role, ServiceEgress
from tests.lab.agents import PACKAGE_ROOT
from tests.lab.traffic import Recorder
from tests.netns import namespace, run_in_netns, sh
from tests.packet_harness import add_addresses, link
from tests.waiting import wait_until

POD4, POD6 = "10.244.1.10", "fd00:10:244:1::10"
LB4, LB6 = "198.51.100.200", "2001:db8:100::200"
NODE4, NODE6 = "198.51.100.1", "2001:db8:100::1"
PEER4, PEER6 = "198.51.100.2", "2001:db8:100::2"
UDP_PORT, TCP_PORT = 5300, 5301

RELAY = ServiceEgress(
    "mail",
    "relay",
    Role.GATEWAY,
    "node-a",
    (LB4, LB6),
    (
        FamilyEgress(Family.IPV4, Action.SNAT, (POD4,), snat_ip=LB4),
        FamilyEgress(Family.IPV6, Action.SNAT, (POD6,), snat_ip=LB6),
    ),
)
STATE = NodeDesiredState("node-a", 0xF00000, ("10.0.0.0/8",), ("fc00::/7",), (RELAY,))


def nft(netns: str, ruleset: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=ruleset,
        text=True,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[str, str]]:
    """(gateway namespace, peer namespace), see :func:`gateway_namespaces`."""
    with gateway_namespaces() as namespaces:
        yield namespaces


@contextlib.contextmanager
def gateway_namespaces() -> Iterator[tuple[str, str]]:
    """(gateway namespace, peer namespace): the gateway SNATs its "pod" addresses (on lo)
    to the LB IPs with nft; the peer is where tests run a recorder that answers with the
    source it saw. Both are deleted afterwards."""
    with namespace("mlau") as gw, namespace("mlap") as peer:
        device = f"au{os.getpid() % 100000}"
        node_cidrs = (f"{NODE4}/24", f"{LB4}/24", f"{NODE6}/64", f"{LB6}/64")
        link(gw, device, node_cidrs, peer, (f"{PEER4}/24", f"{PEER6}/64"))
        add_addresses(gw, "lo", f"{POD4}/32", f"{POD6}/128")
        nft(
            gw,
            "table inet audit {\n"
            " chain post { type nat hook postrouting priority srcnat;\n"
            f"  ip saddr {POD4} snat ip to {LB4}\n"
            f"  ip6 saddr {POD6} snat ip6 to {LB6}\n"
            " }\n"
            "}\n",
        )
        yield gw, peer


class StandInSupervisor:
    """The supervisor's side of the bus for one audit process: answers Hello with a snapshot."""

    def __init__(self, run_dir: str, state: NodeDesiredState) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket: zmq.Socket[Any] = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"ipc://{run_dir}/bus.sock")
        self.state = state
        self.generation = 1
        self.applied: list[Applied] = []
        self.counts = AuditCounts(0, 0, 0, 0)
        """The audit process's last reported counts (what the supervisor exports)."""

    def pump(self, timeout: float = 0.1) -> None:
        while self.socket.poll(int(timeout * 1000)):
            identity, frame = self.socket.recv_multipart()
            message = decode(frame)
            if isinstance(message, Hello):
                self.socket.send_multipart(
                    [identity, encode(Snapshot(self.generation, self.state))]
                )
            elif isinstance(message, Applied):
                self.applied.append(message)
            elif isinstance(message, AuditCounts):
                self.counts = message
            timeout = 0.0

    def change(self, delta: StateDelta, state: NodeDesiredState) -> None:
        self.socket.send_multipart(
            [b"audit", encode(StateChange(self.generation + 1, self.generation, delta))]
        )
        self.generation += 1
        self.state = state

    def wait_applied(self, generation: int, timeout: float = 20.0) -> Applied:
        def found() -> Applied | None:
            self.pump()
            return next((a for a in self.applied if a.generation == generation), None)

        return wait_until(found, timeout=timeout, message=f"Applied {generation}: {self.applied}")

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


@contextlib.contextmanager
def audit_process(
    netns: str, **config: Any
) -> Iterator[tuple[StandInSupervisor, Path, subprocess.Popen[bytes]]]:
    """``python -m metaleg.audit`` in ``netns`` (``ip netns exec`` execs it: the process is
    the audit process itself), its stderr in a file, and its supervisor."""
    with tempfile.TemporaryDirectory(prefix="mlaudit") as run_dir:
        os.makedirs(os.path.join(run_dir, "metrics"))
        supervisor = StandInSupervisor(run_dir, STATE)
        log_path = Path(run_dir) / "audit.log"
        settings = Config(node_name="node-a", run_dir=run_dir, **config)
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": PACKAGE_ROOT,
            "PROMETHEUS_MULTIPROC_DIR": os.path.join(run_dir, "metrics"),
            CONFIG_ENVIRONMENT: msgspec.json.encode(settings).decode(),
        }
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "metaleg.audit"],
                env=env,
                cwd=PACKAGE_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            yield supervisor, log_path, process
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            supervisor.close()


def audit_lines(log_path: Path) -> list[dict[str, Any]]:
    found = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("audit") == "snat":
                found.append(entry)
    return found


def connect(family: int, proto: str, source: str, target: str) -> tuple[str, int, int]:
    """One connection from ``source`` to the recorder at ``target``: (the address and port the
    recorder saw, our own port)."""
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect((target, UDP_PORT if proto == "udp" else TCP_PORT))
        if proto == "udp":
            sock.send(b"audit\n")
            answer = json.loads(sock.recv(65535))
        else:
            sock.sendall(b"audit\n")
            with sock.makefile("rb") as reader:
                answer = json.loads(reader.readline())
        return answer["src"], answer["sport"], sock.getsockname()[1]


CONNECTIONS = [(socket.AF_INET, proto, POD4, PEER4) for proto in ("tcp", "udp", "tcp", "udp")] + [
    (socket.AF_INET6, proto, POD6, PEER6) for proto in ("tcp", "udp", "tcp", "udp")
]


def make_connections() -> list[tuple[str, int, int]]:
    # First one that is not SNATed (the node's own address): it must give no line.
    connect(socket.AF_INET, "udp", NODE4, PEER4)
    return [connect(*spec) for spec in CONNECTIONS]


@pytest.mark.netns
def test_the_audit_process_writes_one_line_per_snated_connection(
    gateway: tuple[str, str], tmp_path: Path
) -> None:
    gw, peer = gateway
    with (
        Recorder(peer, tmp_path / "recorder.jsonl", udp_port=UDP_PORT, tcp_port=TCP_PORT),
        audit_process(gw) as (supervisor, log_path, _),
    ):
        applied = supervisor.wait_applied(1)
        assert applied.process == "audit" and applied.error == ""
        seen = run_in_netns(gw, make_connections)
        sh("ping", "-c", "1", "-W", "5", "-I", POD4, PEER4, netns=gw)
        wait_until(
            lambda: len(audit_lines(log_path)) >= len(CONNECTIONS) + 1,
            timeout=20,
            message=lambda: f"audit lines: {log_path.read_text()[-3000:]}",
        )
        lines = audit_lines(log_path)
        for (family, proto, pod, peer_ip), (src, sport, own_port) in zip(
            CONNECTIONS, seen, strict=True
        ):
            assert src == (LB4 if family == socket.AF_INET else LB6)
            mine = [
                line
                for line in lines
                if line["proto"] == proto and line["snat_ip"] == src and line["snat_port"] == sport
            ]
            assert len(mine) == 1, (proto, src, sport, lines)
            (line,) = mine
            assert line["service"] == "mail/relay" and line["pod_ip"] == pod
            assert line["pod_port"] == own_port
            assert (line["dst_ip"], line["dst_port"]) == (
                peer_ip,
                UDP_PORT if proto == "udp" else TCP_PORT,
            )
            assert line["process"] == "audit" and line["level"] == "info"
        (icmp,) = [line for line in lines if line["proto"] == "icmp"]
        assert "pod_port" not in icmp and icmp["icmp_type"] == 8 and icmp["snat_ip"] == LB4
        assert len(lines) == len(CONNECTIONS) + 1  # nothing for the node's own address

        # The Service's IPv4 pod leaves (a change): its connections get no line any more.
        relay6 = msgspec.structs.replace(RELAY, families=RELAY.families[1:])
        supervisor.change(
            StateDelta(upserted=(relay6,)), msgspec.structs.replace(STATE, services=(relay6,))
        )
        supervisor.wait_applied(2)
        run_in_netns(gw, connect, socket.AF_INET, "udp", POD4, PEER4)
        # Events arrive in order: once this connection's line is there, the one before is done.
        src, sport, _ = run_in_netns(gw, connect, socket.AF_INET6, "udp", POD6, PEER6)
        wait_until(
            lambda: len(audit_lines(log_path)) >= len(CONNECTIONS) + 2,
            timeout=20,
            message=lambda: f"audit lines: {log_path.read_text()[-3000:]}",
        )
        *_, last = audit_lines(log_path)
        assert (last["snat_ip"], last["snat_port"]) == (src, sport)
        assert len(audit_lines(log_path)) == len(CONNECTIONS) + 2


@pytest.mark.netns
def test_lines_over_the_rate_are_dropped_and_counted(
    gateway: tuple[str, str], tmp_path: Path
) -> None:
    gw, peer = gateway
    with (
        Recorder(peer, tmp_path / "recorder.jsonl", udp_port=UDP_PORT, tcp_port=TCP_PORT),
        audit_process(gw, audit_log_rate=3) as (supervisor, log_path, _),
    ):
        supervisor.wait_applied(1)
        run_in_netns(gw, lambda: [connect(socket.AF_INET, "udp", POD4, PEER4) for _ in range(12)])

        def counted() -> tuple[int, int] | None:
            supervisor.pump()
            written, dropped = supervisor.counts.lines, supervisor.counts.lines_dropped
            return (written, dropped) if written + dropped >= 12 else None

        written, dropped = wait_until(counted, timeout=20, message="12 lines counted")
        assert written + dropped == 12 and 3 <= written < 12
        assert len(audit_lines(log_path)) == written
        assert "AUDIT_LOG_RATE=3 lines per second reached" in log_path.read_text()


@pytest.mark.netns
def test_events_off_in_the_namespace_is_reported_as_the_process_error() -> None:
    with namespace("mlao") as netns:
        # Conntrack in use (a NAT table), its events switched off.
        nft(netns, "table ip t { chain c { type nat hook postrouting priority srcnat; }; }\n")
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_events=0", netns=netns)
        assert run_in_netns(netns, conntrack_events_setting) == 0
        with audit_process(netns) as (supervisor, log_path, _):
            applied = supervisor.wait_applied(1)
            assert "nf_conntrack_events is 0" in applied.error
            assert "nf_conntrack_events is 0" in log_path.read_text()


def overflow() -> tuple[int, int, int]:
    """Events into a tiny socket buffer, read only afterwards: (events read, lost, sent)."""
    listener = EventListener(receive_buffer=4096)
    listener.open()
    sent = 300
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for port in range(20000, 20000 + sent):
            sock.sendto(b"x", ("127.0.0.1", port))
    read = lost = 0
    while True:
        batch = listener.read()
        read, lost = read + len(batch.events), lost + batch.lost
        if not batch.events and not batch.lost:
            break
    listener.close()
    return read, lost, sent


@pytest.mark.netns
def test_a_full_socket_buffer_loses_events_counted_without_failing() -> None:
    with namespace("mlab") as netns:
        nft(
            netns,
            "table ip t { chain c { type filter hook output priority 0; ct state new accept; }; }\n",
        )
        read, lost, sent = run_in_netns(netns, overflow)
    assert lost > 0 and read > 0
    # The kernel's drop counter accounts for each event exactly.
    assert read + lost == sent
