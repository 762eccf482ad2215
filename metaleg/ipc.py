"""Messages between metaleg's processes and the ZeroMQ sockets that carry them.

Topology: the supervisor binds one ROUTER socket at ``ipc://<run dir>/bus.sock``;
the watcher, firewall and routing workers each connect a DEALER whose identity
is the process name. The supervisor is the hub because it outlives every
worker:

- the watcher sends its first desired state complete (:class:`Publish`), then
  only what changed (:class:`PublishChange`, numbered by a ``sequence``), built by
  a :class:`~metaleg.state_changes.ChangePublisher`; the supervisor applies each change to the state it
  holds, numbers every distinct state (a rising ``generation``), and asks the
  watcher for a complete state (:class:`ResendRequest`) when a change does not
  follow the one before;
- a data-plane worker sends :class:`Hello` when it (re)starts or has missed a
  change and gets the current complete :class:`Snapshot` at once — no waiting for
  a cluster event, nothing lost to a slow joiner (this is why it is not
  PUB/SUB) — and later a :class:`StateChange` per generation;
- workers answer :class:`Applied` with the generation applied or the error.

A change names the Services added or changed and the keys of those removed
(:class:`StateDelta`); :mod:`metaleg.state_changes` applies and computes them,
sharing every unchanged Service object. So the bus carries O(change), and nobody
decodes or compares the Services that did not change.

Messages are msgpack-encoded msgspec Structs, tagged by type and decoded
strictly: anything malformed raises :class:`MessageError`, which receivers log,
count and drop. Receivers of complete states decode them with a
:class:`StateDecoder`, which builds only what differs from the state before.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import zmq

from metaleg.backend import EgressCount
from metaleg.model import GatewayRoute, NodeDesiredState, ServiceEgress

BUS_SOCKET = "bus.sock"
CONTROL_SOCKET = "control.sock"
"""A REP socket of the supervisor: ``status`` requests from ``metaleg-supervisor status``."""


class Hello(msgspec.Struct, tag="hello", frozen=True, forbid_unknown_fields=True):
    """A worker announces itself; the supervisor answers with the current snapshot."""

    process: str
    pid: int
    applied_generation: int = 0
    backend: str = ""


class Publish(msgspec.Struct, tag="publish", frozen=True, forbid_unknown_fields=True):
    """The watcher's complete desired state for this node."""

    state: NodeDesiredState
    problems: tuple[str, ...] = ()
    """Problems found in cluster objects, for status and logs."""
    sequence: int = 0
    """The :class:`ChangePublisher`'s number of this state; the next change's base."""


class StateDelta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What changed from one :class:`NodeDesiredState` to the next (see :func:`apply_change`).

    Node, mask and exclude CIDRs never change within one: when they differ, a
    complete state is sent instead. The fields left out (None) are unchanged.
    """

    upserted: tuple[ServiceEgress, ...] = ()
    """New or changed Services, strictly sorted by (namespace, name)."""
    removed: tuple[str, ...] = ()
    """``namespace/name`` keys of the Services removed."""
    routes: tuple[GatewayRoute, ...] | None = None
    transit_guard_ipv4: tuple[str, ...] | None = None
    transit_guard_ipv6: tuple[str, ...] | None = None

    @property
    def empty(self) -> bool:
        """It changes nothing."""
        return not (
            self.upserted
            or self.removed
            or self.routes is not None
            or self.transit_guard_ipv4 is not None
            or self.transit_guard_ipv6 is not None
        )


class PublishChange(msgspec.Struct, tag="publish-change", frozen=True, forbid_unknown_fields=True):
    """The watcher's change from its state ``base_sequence`` to its state ``sequence``.

    Equal numbers and an empty delta: nothing changed (a liveness signal, and the check
    that the supervisor holds ``base_sequence``).
    """

    sequence: int
    base_sequence: int
    delta: StateDelta
    problems: tuple[str, ...] | None = None
    """The problems found in cluster objects, when they changed."""


class ResendRequest(msgspec.Struct, tag="resend", frozen=True, forbid_unknown_fields=True):
    """The supervisor to the watcher: a change did not follow the state I hold; send the
    complete state next."""

    reason: str = ""


class Snapshot(msgspec.Struct, tag="snapshot", frozen=True, forbid_unknown_fields=True):
    """A numbered desired state, sent by the supervisor to the data-plane workers."""

    generation: int
    state: NodeDesiredState


class StateChange(msgspec.Struct, tag="change", frozen=True, forbid_unknown_fields=True):
    """The supervisor's change from generation ``base_generation`` to ``generation``, for a
    data-plane worker that holds ``base_generation`` (else it asks again with Hello)."""

    generation: int
    base_generation: int
    delta: StateDelta


class Applied(msgspec.Struct, tag="applied", frozen=True, forbid_unknown_fields=True):
    """A worker's report: ``generation`` applied (error empty), or failed with ``error``."""

    process: str
    generation: int
    error: str = ""
    duration_seconds: float = 0.0
    backend: str = ""
    drift: str = ""
    """Non-empty when this application repaired drift: what was found (``kind: detail; ...``)."""
    unfinished: str = ""
    """Non-empty when the application succeeded but left something to retry (the firewall:
    a failed deletion of outdated conntrack entries); the worker retries with back-off."""


class EgressCounts(msgspec.Struct, tag="egress-counts", frozen=True, forbid_unknown_fields=True):
    """The firewall worker's reading of the kernel's per-Service counters: every labelled
    Service's packets and bytes per family and action (sent only when they changed)."""

    process: str
    counts: tuple[EgressCount, ...]


class AuditCounts(msgspec.Struct, tag="audit-counts", frozen=True, forbid_unknown_fields=True):
    """The audit process's counts since it started, sent when they changed (at most every
    second). The supervisor adds them to its Prometheus counters: the audit process does
    not load prometheus-client (~6 MiB of memory on every node)."""

    lines: int
    """Audit lines written."""
    lines_dropped: int
    """Lines not written because AUDIT_LOG_RATE was reached."""
    events_lost: int
    """Conntrack events the kernel dropped (the socket's buffer was full)."""
    messages_dropped: int
    """Bus messages the audit process dropped (malformed, or not following its state)."""


class WatcherStatus(msgspec.Struct, tag="watcher-status", frozen=True, forbid_unknown_fields=True):
    """The watcher's view of the API server: synced resources and the current problem."""

    synced: bool
    error: str = ""


Message = (
    Hello
    | Publish
    | PublishChange
    | ResendRequest
    | Snapshot
    | StateChange
    | Applied
    | EgressCounts
    | AuditCounts
    | WatcherStatus
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


class MessageError(ValueError):
    """A received frame is not a valid message."""


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> Message:
    """Decode one frame strictly, or raise :class:`MessageError` saying what is wrong."""
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise MessageError(f"invalid message ({len(frame)} bytes): {error}") from None


class _RoutesState(msgspec.Struct, frozen=True):
    """What the routing worker uses of a :class:`NodeDesiredState`. Not forbidding unknown
    fields, a decoder of it skips the Services and the transit guard (tens of thousands of
    source addresses at N=1000) instead of building them."""

    node: str
    fwmask: int
    exclude_dst_ipv4: tuple[str, ...]
    exclude_dst_ipv6: tuple[str, ...]
    routes: tuple[GatewayRoute, ...] = ()


class _RoutesSnapshot(msgspec.Struct, tag="snapshot", frozen=True):
    generation: int
    state: _RoutesState


class _RoutesDelta(msgspec.Struct, frozen=True):
    """A :class:`StateDelta`'s routes; its Services and transit guard are skipped."""

    routes: tuple[GatewayRoute, ...] | None = None


class _RoutesChange(msgspec.Struct, tag="change", frozen=True, forbid_unknown_fields=True):
    generation: int
    base_generation: int
    delta: _RoutesDelta


_routes_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
    Hello
    | Publish
    | PublishChange
    | ResendRequest
    | _RoutesSnapshot
    | _RoutesChange
    | Applied
    | EgressCounts
    | AuditCounts
    | WatcherStatus
)


def decode_routes_only(frame: bytes) -> Message:
    """:func:`decode`, but a :class:`Snapshot`'s state keeps only its node, mask, exclude
    CIDRs and routes (no Services, no transit guard), and a :class:`StateChange` only its
    routes: all the routing worker reads."""
    try:
        message = _routes_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise MessageError(f"invalid message ({len(frame)} bytes): {error}") from None
    if isinstance(message, _RoutesChange):
        return StateChange(
            message.generation, message.base_generation, StateDelta(routes=message.delta.routes)
        )
    if isinstance(message, _RoutesSnapshot):
        state = message.state
        return Snapshot(
            message.generation,
            NodeDesiredState(
                node=state.node,
                fwmask=state.fwmask,
                exclude_dst_ipv4=state.exclude_dst_ipv4,
                exclude_dst_ipv6=state.exclude_dst_ipv6,
                routes=state.routes,
            ),
        )
    result: Message = message
    return result


def _endpoint(run_dir: str, name: str) -> str:
    path = os.path.join(run_dir, name)
    if len(path.encode()) > 107:
        raise ValueError(f"METALEG_RUN_DIR {run_dir!r} is too long for a Unix socket path")
    return f"ipc://{path}"


def bus_endpoint(run_dir: str) -> str:
    """The supervisor's message bus; a Unix socket path, which must stay under 107 bytes."""
    return _endpoint(run_dir, BUS_SOCKET)


def control_endpoint(run_dir: str) -> str:
    """The supervisor's control socket (status requests)."""
    return _endpoint(run_dir, CONTROL_SOCKET)


def prepare_run_dir(run_dir: str) -> None:
    """Create the runtime directory with mode 0700 (the sockets in it accept any local peer)."""
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)


def connect_worker(context: zmq.Context[Any], run_dir: str, process: str) -> zmq.Socket[Any]:
    """A worker's DEALER socket to the supervisor, identified by the process name."""
    socket: zmq.Socket[Any] = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, process.encode())
    socket.setsockopt(zmq.LINGER, 0)
    # Bounded queue while the supervisor is away; what is lost is resent on the next change.
    socket.setsockopt(zmq.SNDHWM, 100)
    socket.connect(bus_endpoint(run_dir))
    return socket


def bind_supervisor(
    context: zmq.Context[Any], run_dir: str, send_hwm: int = 1000
) -> zmq.Socket[Any]:
    """The supervisor's ROUTER socket. A restarted worker reuses its identity, so the new
    connection takes over the old one (ROUTER_HANDOVER) instead of being refused.
    ``send_hwm``: frames queued per worker (set before bind: connections accepted later
    take the options the socket had when it was bound)."""
    socket: zmq.Socket[Any] = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
    socket.setsockopt(zmq.SNDHWM, send_hwm)
    socket.setsockopt(zmq.LINGER, 0)
    _bind_fresh(socket, bus_endpoint(run_dir))
    return socket


def bind_control(context: zmq.Context[Any], run_dir: str) -> zmq.Socket[Any]:
    """The supervisor's REP socket for ``metaleg-supervisor status``."""
    socket: zmq.Socket[Any] = context.socket(zmq.REP)
    socket.setsockopt(zmq.LINGER, 0)
    _bind_fresh(socket, control_endpoint(run_dir))
    return socket


def _bind_fresh(socket: zmq.Socket[Any], endpoint: str) -> None:
    path = endpoint.removeprefix("ipc://")
    if os.path.exists(path):
        os.unlink(path)  # left by a supervisor that was killed; only we bind here
    socket.bind(endpoint)


_EMPTY_ARRAY = msgspec.Raw(b"\x90")


class _EncodedState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A :class:`NodeDesiredState` as it arrives, its large parts (the Services and the
    transit guard) still encoded. The fields are :class:`NodeDesiredState`'s (a test
    checks it)."""

    node: str
    fwmask: int
    exclude_dst_ipv4: tuple[str, ...]
    exclude_dst_ipv6: tuple[str, ...]
    services: tuple[msgspec.Raw, ...] = ()
    routes: tuple[GatewayRoute, ...] = ()
    transit_guard_ipv4: msgspec.Raw = _EMPTY_ARRAY
    transit_guard_ipv6: msgspec.Raw = _EMPTY_ARRAY


class _EncodedPublish(msgspec.Struct, tag="publish", frozen=True, forbid_unknown_fields=True):
    state: _EncodedState
    problems: tuple[str, ...] = ()
    sequence: int = 0


class _EncodedSnapshot(msgspec.Struct, tag="snapshot", frozen=True, forbid_unknown_fields=True):
    generation: int
    state: _EncodedState


_encoded_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
    Hello
    | _EncodedPublish
    | PublishChange
    | ResendRequest
    | _EncodedSnapshot
    | StateChange
    | Applied
    | EgressCounts
    | AuditCounts
    | WatcherStatus
)
_service_decoder = msgspec.msgpack.Decoder(ServiceEgress)
_sources_decoder = msgspec.msgpack.Decoder(tuple[str, ...])


class StateDecoder:
    """:func:`decode` for a process that receives one complete state after another: it
    builds only the Services and transit guard lists whose encoding differs from the
    previous state's and takes the previous state's objects for the rest.

    A state changes by a Service or a few sources at a time, while a complete state at
    N = 1000 is ~20000 objects: decoding each in full cost a millisecond or more per
    update and, with most of each decode thrown away while long-lived objects stay
    behind in its memory pools, grew the process's heap in the first minutes of
    churn. Sharing also keeps one copy of each unchanged Service across snapshots
    (the backends' indexes hold the objects of the snapshot that last changed them).
    Equal encodings decode to equal values, so every consumer sees the state a full
    decode would give; the previous frame stays referenced until the next state.
    """

    def __init__(self) -> None:
        self._services_encoded: tuple[msgspec.Raw, ...] = ()
        self._services: tuple[ServiceEgress, ...] = ()
        self._guards: dict[str, tuple[msgspec.Raw, tuple[str, ...]]] = {}

    def decode(self, frame: bytes) -> Message:
        """Decode one frame strictly, or raise :class:`MessageError` saying what is wrong
        (the previous state stays the reference)."""
        try:
            message = _encoded_decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise MessageError(f"invalid message ({len(frame)} bytes): {error}") from None
        if isinstance(message, _EncodedSnapshot):
            return Snapshot(message.generation, self._state(message.state, len(frame)))
        if isinstance(message, _EncodedPublish):
            return Publish(
                self._state(message.state, len(frame)), message.problems, message.sequence
            )
        result: Message = message
        return result

    def _state(self, encoded: _EncodedState, size: int) -> NodeDesiredState:
        services = self._shared_services(encoded.services, size)
        guard_ipv4 = self._shared_guard("transit_guard_ipv4", encoded.transit_guard_ipv4, size)
        guard_ipv6 = self._shared_guard("transit_guard_ipv6", encoded.transit_guard_ipv6, size)
        # Only a state decoded in full becomes the reference for the next one.
        self._services_encoded, self._services = encoded.services, services
        self._guards["transit_guard_ipv4"] = (encoded.transit_guard_ipv4, guard_ipv4)
        self._guards["transit_guard_ipv6"] = (encoded.transit_guard_ipv6, guard_ipv6)
        return NodeDesiredState(
            node=encoded.node,
            fwmask=encoded.fwmask,
            exclude_dst_ipv4=encoded.exclude_dst_ipv4,
            exclude_dst_ipv6=encoded.exclude_dst_ipv6,
            services=services,
            routes=encoded.routes,
            transit_guard_ipv4=guard_ipv4,
            transit_guard_ipv6=guard_ipv6,
        )

    def _shared_services(
        self, encoded: tuple[msgspec.Raw, ...], size: int
    ) -> tuple[ServiceEgress, ...]:
        before_encoded, before = self._services_encoded, self._services
        by_encoding: dict[bytes, ServiceEgress] | None = None
        if len(encoded) != len(before_encoded):
            # Services added or removed: positions shift, match by encoding instead.
            by_encoding = {
                bytes(raw): service for raw, service in zip(before_encoded, before, strict=True)
            }
        services = []
        for index, raw in enumerate(encoded):
            if by_encoding is None:
                if raw == before_encoded[index]:
                    services.append(before[index])
                    continue
            else:
                found = by_encoding.get(bytes(raw))
                if found is not None:
                    services.append(found)
                    continue
            try:
                services.append(_service_decoder.decode(raw))
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                raise MessageError(
                    f"invalid message ({size} bytes): state.services[{index}]: {error}"
                ) from None
        return tuple(services)

    def _shared_guard(self, field: str, encoded: msgspec.Raw, size: int) -> tuple[str, ...]:
        before = self._guards.get(field)
        if before is not None and before[0] == encoded:
            return before[1]
        try:
            return _sources_decoder.decode(encoded)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise MessageError(f"invalid message ({size} bytes): state.{field}: {error}") from None
