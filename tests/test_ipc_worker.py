"""IPC messages and the data-plane worker loop, over real ZeroMQ sockets between real processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq

from metaleg.backend import BackendError
from metaleg.config import Config
from metaleg.ipc import (
    Applied,
    Hello,
    MessageError,
    Publish,
    Snapshot,
    bind_supervisor,
    decode,
    decode_routes_only,
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
    share_unchanged_services,
)


def state(*sources: str) -> NodeDesiredState:
    return NodeDesiredState(
        node="node-a",
        fwmask=0xF00000,
        exclude_dst_ipv4=("10.0.0.0/8",),
        exclude_dst_ipv6=(),
        services=(
            ServiceEgress(
                "mail",
                "relay",
                Role.GATEWAY,
                "node-a",
                ("198.51.100.200",),
                (FamilyEgress(Family.IPV4, Action.SNAT, tuple(sources), snat_ip="198.51.100.200"),),
            ),
        ),
    )


def test_messages_round_trip() -> None:
    for message in (
        Hello("firewall", 42, 3),
        Publish(state("10.244.1.10"), ("problem",)),
        Snapshot(7, state("10.244.1.10", "10.244.1.11")),
        Applied("routing", 7, "", 0.01),
    ):
        assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xff\x00garbage",
        msgspec.msgpack.encode({"type": "launch-missiles"}),
        msgspec.msgpack.encode({"type": "hello", "process": "firewall", "pid": "not-a-number"}),
        msgspec.msgpack.encode({"type": "hello", "process": "firewall", "pid": 1, "extra": 1}),
        msgspec.msgpack.encode({"type": "snapshot", "generation": 1, "state": {"node": "x"}}),
    ],
)
def test_malformed_frames_raise_a_specific_error(frame: bytes) -> None:
    with pytest.raises(MessageError, match="invalid message"):
        decode(frame)


def test_the_routing_worker_decodes_snapshots_without_services_and_transit_guard() -> None:
    route = GatewayRoute("node-b", 1, 0x100000, 100001, "198.51.100.12", None)
    full = msgspec.structs.replace(
        state("10.244.1.10", "10.244.1.11"),
        routes=(route,),
        transit_guard_ipv4=("10.244.2.0/24",),
    )
    decoded = decode_routes_only(encode(Snapshot(7, full)))
    assert decoded == Snapshot(7, msgspec.structs.replace(full, services=(), transit_guard_ipv4=()))
    for message in (Hello("routing", 42, 3), Applied("routing", 7, "", 0.01)):
        assert decode_routes_only(encode(message)) == message
    for frame in (
        b"\xff\x00garbage",
        msgspec.msgpack.encode({"type": "snapshot", "generation": 1, "state": {"node": "x"}}),
    ):
        with pytest.raises(MessageError, match="invalid message"):
            decode_routes_only(frame)


# --- the worker loop in a real child process ------------------------------------------------------


class RecordingBackend:
    """A backend that records calls to a file and fails while ``fail_file`` exists."""

    name = "recording"

    def __init__(self, log_path: str, fail_path: str) -> None:
        self.log_path = log_path
        self.fail_path = fail_path

    def _record(self, call: str, state: NodeDesiredState) -> None:
        if os.path.exists(self.fail_path):
            raise BackendError("told to fail")
        sources = state.services[0].families[0].source_ips if state.services else ()
        with open(self.log_path, "a") as file:
            file.write(f"{call} {','.join(sources)}\n")

    def apply(self, state: NodeDesiredState) -> None:
        self._record("apply", state)

    def resync(self, state: NodeDesiredState) -> None:
        self._record("resync", state)

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        pass


def _run_worker(run_dir: str, log_path: str, fail_path: str, interval: float) -> None:
    from metaleg.worker import DataplaneWorker

    config = Config(node_name="node-a", run_dir=run_dir, reconciliation_interval=interval)
    raise SystemExit(
        DataplaneWorker("firewall", RecordingBackend(log_path, fail_path), config).run()
    )


class Hub:
    """The supervisor's side of the bus, driven by the test."""

    def __init__(self, run_dir: str) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket = bind_supervisor(self.context, run_dir)

    def receive(self, timeout: float = 5.0) -> Any:
        if not self.socket.poll(int(timeout * 1000)):
            raise TimeoutError("no message from the worker")
        identity, frame = self.socket.recv_multipart()
        assert identity == b"firewall"
        return decode(frame)

    def receive_until(self, predicate: Any, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            if predicate(message):
                return message

    def send(self, payload: bytes) -> None:
        self.socket.send_multipart([b"firewall", payload])

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def worker_env() -> Iterator[tuple[Hub, str, str, multiprocessing.process.BaseProcess]]:
    with tempfile.TemporaryDirectory(prefix="mlw") as run_dir:
        hub = Hub(run_dir)
        log_path = os.path.join(run_dir, "calls")
        fail_path = os.path.join(run_dir, "fail")
        process = multiprocessing.get_context("spawn").Process(
            target=_run_worker, args=(run_dir, log_path, fail_path, 3600.0)
        )
        process.start()
        try:
            yield hub, log_path, fail_path, process
        finally:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(5)
            hub.close()


def calls(path: str) -> list[str]:
    try:
        with open(path) as file:
            return file.read().splitlines()
    except FileNotFoundError:
        return []


def test_worker_says_hello_resyncs_first_then_applies_and_reports(worker_env: Any) -> None:
    hub, log_path, _, process = worker_env
    hello = hub.receive()
    assert isinstance(hello, Hello) and hello.process == "firewall" and hello.pid == process.pid
    hub.send(encode(Snapshot(1, state("10.244.1.10"))))
    applied = hub.receive_until(lambda m: isinstance(m, Applied))
    assert (applied.process, applied.generation, applied.error, applied.backend) == (
        "firewall",
        1,
        "",
        "recording",
    )
    hub.send(encode(Snapshot(2, state("10.244.1.10", "10.244.1.11"))))
    applied = hub.receive_until(lambda m: isinstance(m, Applied))
    assert (applied.generation, applied.error) == (2, "")
    assert calls(log_path) == ["resync 10.244.1.10", "apply 10.244.1.10,10.244.1.11"]


def test_worker_drops_malformed_messages_and_keeps_going(worker_env: Any) -> None:
    hub, log_path, _, process = worker_env
    hub.receive()  # hello
    hub.send(b"\x00garbage")
    hub.send(encode(Applied("x", 1)))  # valid message, wrong direction
    hub.send(encode(Snapshot(5, state("10.244.1.12"))))
    applied = hub.receive_until(lambda m: isinstance(m, Applied))
    assert applied.generation == 5 and process.is_alive()
    assert calls(log_path) == ["resync 10.244.1.12"]


def test_worker_retries_a_failed_apply_with_backoff_until_it_succeeds(worker_env: Any) -> None:
    hub, log_path, fail_path, _ = worker_env
    hub.receive()
    open(fail_path, "w").close()
    hub.send(encode(Snapshot(1, state("10.244.1.10"))))
    failed = [hub.receive_until(lambda m: isinstance(m, Applied)) for _ in range(2)]
    assert all(m.error == "told to fail" and m.generation == 1 for m in failed)
    os.unlink(fail_path)
    applied = hub.receive_until(lambda m: isinstance(m, Applied) and not m.error, timeout=10)
    assert applied.generation == 1
    assert calls(log_path) == ["resync 10.244.1.10"]


def test_worker_stops_on_sigterm(worker_env: Any) -> None:
    hub, _, _, process = worker_env
    hub.receive()
    os.kill(process.pid, signal.SIGTERM)
    process.join(5)
    assert process.exitcode == 0


def test_a_new_snapshot_shares_the_unchanged_services_of_the_previous_one() -> None:
    def service(name: str, *sources: str) -> ServiceEgress:
        entry = FamilyEgress(Family.IPV4, Action.REJECT, sources, reason="no gateway")
        return ServiceEgress("ns", name, Role.REJECT, None, (), (entry,))

    previous = NodeDesiredState(
        "node-a", 0xF00000, (), (), (service("a", "10.244.1.1"), service("b", "10.244.1.2"))
    )

    def decoded(*services: ServiceEgress) -> NodeDesiredState:
        state = msgspec.structs.replace(previous, services=services)
        return msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=NodeDesiredState)

    # Same keys: a kept, b changed.
    new = decoded(service("a", "10.244.1.1"), service("b", "10.244.1.3"))
    shared = share_unchanged_services(previous, new)
    assert shared == new
    assert shared.services[0] is previous.services[0]
    assert shared.services[1] is new.services[1]
    # A Service added in front: matched by key.
    new = decoded(service("0", "10.244.1.9"), *previous.services)
    shared = share_unchanged_services(previous, new)
    assert shared == new
    assert [s is p for s, p in zip(shared.services[1:], previous.services, strict=True)] == [
        True,
        True,
    ]
    assert share_unchanged_services(None, new) is new
