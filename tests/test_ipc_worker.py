"""IPC messages and the data-plane worker loop, over real ZeroMQ sockets between real processes."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from metaleg.backend import BackendError
from metaleg.config import Config
from metaleg.ipc import (
    Applied,
    Hello,
    MessageError,
    Publish,
    PublishChange,
    ResendRequest,
    Snapshot,
    StateChange,
    StateDecoder,
    StateDelta,
    _EncodedPublish,
    _EncodedSnapshot,
    _EncodedState,
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
)
from metaleg.state_changes import (
    ChangeError,
    ChangePublisher,
    Folded,
    FollowedState,
    apply_change,
    diff_states,
)
from tests.test_nft_incremental import random_walk
from tests.waiting import wait_until


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
        StateChange(8, 7, StateDelta(upserted=state("10.244.1.12").services, removed=("a/b",))),
        StateChange(9, 8, StateDelta(routes=(), transit_guard_ipv4=("10.244.2.0/24",))),
        PublishChange(5, 4, StateDelta(), ("problem",)),
        ResendRequest("a gap"),
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
        msgspec.msgpack.encode(
            {"type": "change", "generation": 2, "base_generation": 1, "delta": {"upserted": [{}]}}
        ),
        msgspec.msgpack.encode(
            {"type": "change", "generation": 2, "base_generation": 1, "delta": {"removed": 5}}
        ),
        msgspec.msgpack.encode({"type": "change", "generation": 2, "delta": {}}),
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
    # A change keeps only its routes: its Services are not even decoded.
    change = StateChange(
        8, 7, StateDelta(upserted=full.services, removed=("a/b",), routes=(route,))
    )
    assert decode_routes_only(encode(change)) == StateChange(8, 7, StateDelta(routes=(route,)))
    unparsed = msgspec.msgpack.encode(
        {"type": "change", "generation": 8, "base_generation": 7, "delta": {"upserted": [5]}}
    )
    assert decode_routes_only(unparsed) == StateChange(8, 7, StateDelta())
    for frame in (
        b"\xff\x00garbage",
        msgspec.msgpack.encode({"type": "snapshot", "generation": 1, "state": {"node": "x"}}),
    ):
        with pytest.raises(MessageError, match="invalid message"):
            decode_routes_only(frame)


# --- changes ---------------------------------------------------------------------------------


def _strictly_sorted(candidate: NodeDesiredState) -> bool:
    keys = [(service.namespace, service.name) for service in candidate.services]
    return all(a < b for a, b in itertools.pairwise(keys))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_change_from_diff_states_turns_the_old_state_into_the_new_one(seed: int) -> None:
    """Along a random walk of states (Services changed, added, removed; sometimes an
    unsorted or duplicated order, another guard or exclusion), as the supervisor and a
    worker see them: through the encoded change, sharing what did not change."""
    walk = random_walk(random.Random(seed), 30, lambda _: True)
    held = walk[0]
    for new in walk[1:]:
        delta = diff_states(held, new)
        if delta is None:
            # Only a complete state can say it.
            assert not (_strictly_sorted(held) and _strictly_sorted(new)) or (
                new.exclude_dst_ipv4 != held.exclude_dst_ipv4
            )
            held = new
            continue
        received = decode(encode(StateChange(2, 1, delta)))
        assert isinstance(received, StateChange)
        after = apply_change(held, received.delta)
        assert after == new
        # Unchanged Services are the objects held before, not decoded copies.
        before = {(s.namespace, s.name): s for s in held.services}
        upserted = {(s.namespace, s.name) for s in delta.upserted}
        for service in after.services:
            key = (service.namespace, service.name)
            if key not in upserted:
                assert service is before[key]
        assert all(before.get((s.namespace, s.name)) != s for s in delta.upserted)
        assert diff_states(held, new, old_sorted=True) == delta
        held = after


def test_apply_change_refuses_a_change_that_does_not_fit() -> None:
    held = state("10.244.1.10")
    relay = held.services[0]
    other = msgspec.structs.replace(relay, name="zeta")
    for delta, fragment in (
        (StateDelta(removed=("mail/absent",)), "not in the state"),
        (StateDelta(removed=("no-slash",)), "not namespace/name"),
        (StateDelta(upserted=(other, relay)), "not strictly sorted"),
        (StateDelta(upserted=(relay,), removed=("mail/relay",)), "twice"),
    ):
        with pytest.raises(ChangeError, match=fragment):
            apply_change(held, delta)
    assert apply_change(held, StateDelta()) is held


def test_a_followed_state_folds_only_changes_onto_their_base() -> None:
    """What the workers and the audit process share: the state held, changes folded on,
    a missed change turned into a request for the complete state."""
    first, second, third = state("10.244.1.10"), state("10.244.1.11"), state("10.244.1.12")
    followed = FollowedState()
    assert followed.wants_snapshot
    change = StateChange(2, 1, diff_states(first, second))
    assert followed.fold(change) == Folded.HELD  # no state yet: the snapshot will include it
    assert followed.take_snapshot(Snapshot(1, first)) and not followed.wants_snapshot
    assert not followed.take_snapshot(Snapshot(1, first))  # the same generation again
    assert followed.fold(change) == Folded.TAKEN
    assert followed.latest == Snapshot(2, second)
    assert followed.fold(change) == Folded.HELD  # already in it
    with pytest.raises(ChangeError, match="follows generation 7, not 2"):
        followed.fold(StateChange(8, 7, diff_states(second, third)))
    assert followed.wants_snapshot and followed.latest == Snapshot(2, second)
    assert followed.fold(StateChange(3, 2, diff_states(second, third))) == Folded.AWAITED
    assert followed.take_snapshot(Snapshot(3, third)) and not followed.wants_snapshot


def test_the_change_publisher_sends_a_complete_state_first_then_changes() -> None:
    publisher = ChangePublisher()
    first = state("10.244.1.10")
    second = state("10.244.1.10", "10.244.1.11")
    complete = decode(publisher.frame(first, ("p",)))
    assert isinstance(complete, Publish)
    assert (complete.state, complete.problems) == (first, ("p",))
    change = decode(publisher.frame(second, ("p",)))
    assert isinstance(change, PublishChange)
    assert change.base_sequence == complete.sequence and change.sequence == complete.sequence + 1
    assert change.delta == StateDelta(upserted=second.services) and change.problems is None
    # The same state again: a few bytes that only check the sequence.
    frame = publisher.frame(second, ("p",))
    assert len(frame) < 100
    assert decode(frame) == PublishChange(change.sequence, change.sequence, StateDelta())
    # Only the problems changed: they alone, under a new number.
    only_problems = decode(publisher.frame(second, ()))
    assert only_problems == PublishChange(
        change.sequence + 1, change.sequence, StateDelta(), problems=()
    )
    # The supervisor missed something: a complete state next.
    assert publisher.handle(encode(ResendRequest("gap")))
    again = decode(publisher.frame(second, ()))
    assert isinstance(again, Publish) and again.sequence == change.sequence + 2
    assert isinstance(decode(publisher.frame(first, ())), PublishChange)
    for frame in (b"\x00garbage", encode(Hello("x", 1))):
        with pytest.raises(MessageError):
            publisher.handle(frame)
    # A new watcher process numbers its states elsewhere.
    assert abs(ChangePublisher().sequence - publisher.sequence) > 1000


# --- the worker loop in a real child process ------------------------------------------------------


class RecordingBackend:
    """A backend that records calls to a file and fails while ``fail_file`` exists; while
    ``<fail_file>.unfinished`` exists, its calls succeed and leave its text undone."""

    name = "recording"

    def __init__(self, log_path: str, fail_path: str) -> None:
        self.log_path = log_path
        self.fail_path = fail_path

    def _record(self, call: str, state: NodeDesiredState) -> None:
        if os.path.exists(self.fail_path):
            raise BackendError("told to fail")
        if os.path.exists(self.fail_path + ".slow"):
            time.sleep(1.2)
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

    def unfinished_work(self) -> str:
        try:
            with open(self.fail_path + ".unfinished") as file:
                return file.read()
        except FileNotFoundError:
            return ""


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
        message = self.next_message(timeout)
        if message is None:
            raise TimeoutError("no message from the worker")
        return message

    def next_message(self, timeout: float) -> Any:
        """The worker's next message, or None when none comes within ``timeout`` s."""
        if not self.socket.poll(int(timeout * 1000)):
            return None
        identity, frame = self.socket.recv_multipart()
        assert identity == b"firewall"
        return decode(frame)

    def receive_until(self, predicate: Any, timeout: float = 5.0) -> Any:
        """The first message that satisfies ``predicate``; the ones before it are dropped."""
        received: list[Any] = []

        def next_message() -> Any:
            message = self.next_message(0.2)
            if message is not None:
                received.append(message)
            return message

        return wait_until(
            next_message,
            timeout,
            interval=0,
            message=lambda: f"the awaited message from the worker; received: {received}",
            accept=lambda message: message is not None and predicate(message),
        )

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


def test_a_due_resync_applies_a_pending_snapshot_first() -> None:
    """A periodic re-sync compares the kernel with what was applied: a snapshot that
    arrived meanwhile is applied first, never handed to the re-sync as "drift"."""
    with tempfile.TemporaryDirectory(prefix="mlw") as run_dir:
        hub = Hub(run_dir)
        log_path, fail_path = os.path.join(run_dir, "calls"), os.path.join(run_dir, "fail")
        process = multiprocessing.get_context("spawn").Process(
            target=_run_worker, args=(run_dir, log_path, fail_path, 1.0)
        )
        process.start()
        try:
            hub.receive()  # hello
            hub.send(encode(Snapshot(1, state("10.244.1.10"))))
            hub.receive_until(lambda m: isinstance(m, Applied) and m.generation == 1)
            open(fail_path + ".slow", "w").close()  # every call takes 1.2 s from now
            hub.send(encode(Snapshot(2, state("10.244.1.11"))))
            time.sleep(0.5)  # the worker is applying 2; 3 arrives meanwhile
            hub.send(encode(Snapshot(3, state("10.244.1.12"))))
            # When 2 is done, the re-sync (every 1 s) is due and 3 is pending.
            hub.receive_until(lambda m: isinstance(m, Applied) and m.generation == 3, timeout=10)
        finally:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(5)
            hub.close()
        assert calls(log_path)[:4] == [
            "resync 10.244.1.10",
            "apply 10.244.1.11",
            "apply 10.244.1.12",
            "resync 10.244.1.12",
        ]


def test_worker_drops_malformed_messages_and_keeps_going(worker_env: Any) -> None:
    hub, log_path, _, process = worker_env
    hub.receive()  # hello
    hub.send(b"\x00garbage")
    hub.send(encode(Applied("x", 1)))  # valid message, wrong direction
    hub.send(encode(Snapshot(5, state("10.244.1.12"))))
    applied = hub.receive_until(lambda m: isinstance(m, Applied))
    assert applied.generation == 5 and process.is_alive()
    assert calls(log_path) == ["resync 10.244.1.12"]


def change(generation: int, base: int, *sources: str) -> bytes:
    """A change of the one Service of :func:`state` to ``sources``."""
    return encode(StateChange(generation, base, StateDelta(upserted=state(*sources).services)))


def test_worker_folds_changes_onto_its_state_and_applies_the_newest(worker_env: Any) -> None:
    hub, log_path, _, _ = worker_env
    hub.receive()  # hello
    hub.send(encode(Snapshot(1, state("10.244.1.10"))))
    hub.receive_until(lambda m: isinstance(m, Applied) and m.generation == 1)
    hub.send(change(2, 1, "10.244.1.11"))
    applied = hub.receive_until(lambda m: isinstance(m, Applied))
    assert (applied.generation, applied.error) == (2, "")
    # Changes that queue up are folded in order, the newest applied.
    hub.send(change(3, 2, "10.244.1.12"))
    hub.send(change(4, 3, "10.244.1.13"))
    hub.receive_until(lambda m: isinstance(m, Applied) and m.generation == 4)
    assert calls(log_path)[:2] == ["resync 10.244.1.10", "apply 10.244.1.11"]
    assert calls(log_path)[-1] == "apply 10.244.1.13"
    assert "apply 10.244.1.10" not in calls(log_path)


def test_a_worker_that_missed_a_change_asks_for_the_complete_state(worker_env: Any) -> None:
    hub, log_path, _, process = worker_env
    first = hub.receive()
    assert isinstance(first, Hello)
    hub.send(encode(Snapshot(1, state("10.244.1.10"))))
    hub.receive_until(lambda m: isinstance(m, Applied) and m.generation == 1)
    # Generation 2 was lost: 3 does not follow 1, and neither does 4 that comes before
    # the complete state. Nothing of them is applied; the worker says Hello again.
    hub.send(change(3, 2, "10.244.1.66"))
    hub.send(change(4, 3, "10.244.1.67"))
    hello = hub.receive_until(lambda m: isinstance(m, Hello))
    assert (hello.pid, hello.applied_generation) == (process.pid, 1)
    hub.send(encode(Snapshot(4, state("10.244.1.12"))))
    hub.receive_until(lambda m: isinstance(m, Applied) and m.generation == 4)
    hub.send(change(5, 4, "10.244.1.13"))
    hub.receive_until(lambda m: isinstance(m, Applied) and m.generation == 5)
    assert calls(log_path) == ["resync 10.244.1.10", "apply 10.244.1.12", "apply 10.244.1.13"]


def test_worker_drops_malformed_changes_and_keeps_its_state(worker_env: Any) -> None:
    hub, log_path, _, process = worker_env
    hub.receive()  # hello
    hub.send(encode(Snapshot(1, state("10.244.1.10"))))
    hub.receive_until(lambda m: isinstance(m, Applied) and m.generation == 1)
    broken_service = msgspec.to_builtins(state("10.244.1.66").services[0])
    broken_service["families"][0]["action"] = "launch"
    hub.send(
        msgspec.msgpack.encode(
            {
                "type": "change",
                "generation": 2,
                "base_generation": 1,
                "delta": {"upserted": [broken_service]},
            }
        )
    )
    hub.send(b"\x00garbage")
    # The state held is intact: a later change applies on top of it.
    hub.send(change(2, 1, "10.244.1.11"))
    applied = hub.receive_until(lambda m: isinstance(m, Applied))
    assert (applied.generation, applied.error) == (2, "") and process.is_alive()
    assert calls(log_path) == ["resync 10.244.1.10", "apply 10.244.1.11"]


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


def test_worker_reports_unfinished_work_and_applies_again_until_it_is_done(
    worker_env: Any,
) -> None:
    hub, log_path, fail_path, _ = worker_env
    hub.receive()
    with open(fail_path + ".unfinished", "w") as file:
        file.write("deleting outdated conntrack entries failed")
    hub.send(encode(Snapshot(1, state("10.244.1.10"))))
    reports = [hub.receive_until(lambda m: isinstance(m, Applied)) for _ in range(3)]
    # Applied (the state is in place), the work left undone shown, and tried again.
    assert all(m.generation == 1 and not m.error for m in reports)
    assert all(m.unfinished == "deleting outdated conntrack entries failed" for m in reports)
    assert calls(log_path)[:3] == ["resync 10.244.1.10", "apply 10.244.1.10", "apply 10.244.1.10"]
    os.unlink(fail_path + ".unfinished")
    done = hub.receive_until(lambda m: isinstance(m, Applied) and not m.unfinished, timeout=10)
    assert done.generation == 1
    # Nothing left: no more calls (the next re-sync is an hour away).
    count = len(calls(log_path))
    assert hub.next_message(1.5) is None
    assert len(calls(log_path)) == count


def test_worker_stops_on_sigterm(worker_env: Any) -> None:
    hub, _, _, process = worker_env
    hub.receive()
    os.kill(process.pid, signal.SIGTERM)
    process.join(5)
    assert process.exitcode == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_the_state_decoder_gives_a_full_decode_and_shares_what_is_unchanged(seed: int) -> None:
    decoder = StateDecoder()
    previous: NodeDesiredState | None = None
    rng = random.Random(seed)
    for generation, desired in enumerate(random_walk(rng, 30, lambda _: True), start=1):
        message = Snapshot(generation, desired) if generation % 2 else Publish(desired, ("p",))
        decoded = decoder.decode(encode(message))
        assert decoded == message
        assert isinstance(decoded, Snapshot | Publish)
        state = decoded.state
        if previous is not None:
            # Same count: matched by position; else by encoding (Services added or removed).
            before = {msgspec.msgpack.encode(s): s for s in previous.services}
            same_count = len(state.services) == len(previous.services)
            for index, service in enumerate(state.services):
                if same_count:
                    earlier = previous.services[index]
                    if msgspec.msgpack.encode(earlier) == msgspec.msgpack.encode(service):
                        assert service is earlier
                    else:
                        assert all(service is not s for s in previous.services)
                else:
                    found = before.get(msgspec.msgpack.encode(service))
                    if found is not None:
                        assert service is found
            for field in ("transit_guard_ipv4", "transit_guard_ipv6"):
                if getattr(state, field) == getattr(previous, field):
                    assert getattr(state, field) is getattr(previous, field)
        previous = state


def test_the_state_decoder_refuses_a_bad_service_and_keeps_its_reference() -> None:
    decoder = StateDecoder()
    good = decoder.decode(encode(Snapshot(1, state("10.244.1.10"))))
    assert isinstance(good, Snapshot)

    def frame(**fields: Any) -> bytes:
        encoded = msgspec.to_builtins(good.state)
        encoded.update(fields)
        return msgspec.msgpack.encode({"type": "snapshot", "generation": 2, "state": encoded})

    bad_service = frame(services=[msgspec.to_builtins(good.state.services[0]), {"name": 5}])
    with pytest.raises(
        MessageError, match=r"state\.services\[1\]: Expected `str`, got `int` - at `\$\.name`"
    ):
        decoder.decode(bad_service)
    with pytest.raises(MessageError, match=r"state\.transit_guard_ipv4: Expected `str`"):
        decoder.decode(frame(transit_guard_ipv4=[5]))
    again = decoder.decode(encode(Snapshot(3, good.state)))
    assert isinstance(again, Snapshot)
    assert again.state.services[0] is good.state.services[0]


def test_the_state_decoder_reads_every_field_of_a_state() -> None:
    """Its encoded mirrors of the state and of the messages that carry it must have the
    same fields in the same order (and the same tags)."""
    for mirror, model in (
        (_EncodedState, NodeDesiredState),
        (_EncodedPublish, Publish),
        (_EncodedSnapshot, Snapshot),
    ):
        assert [f.name for f in msgspec.structs.fields(mirror)] == [
            f.name for f in msgspec.structs.fields(model)
        ]
        assert mirror.__struct_config__.tag == model.__struct_config__.tag
