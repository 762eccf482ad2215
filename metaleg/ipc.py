"""Messages between metaleg's processes and the ZeroMQ sockets that carry them.

Topology: the supervisor binds one ROUTER socket at ``ipc://<run dir>/bus.sock``;
the watcher, firewall and routing workers each connect a DEALER whose identity
is the process name. The supervisor is the hub because it outlives every
worker:

- the watcher sends its first desired state complete (:class:`Publish`), then
  only what changed (:class:`PublishChange`, numbered by a ``sequence``), built by
  a :class:`ChangePublisher`; the supervisor applies each change to the state it
  holds, numbers every distinct state (a rising ``generation``), and asks the
  watcher for a complete state (:class:`ResendRequest`) when a change does not
  follow the one before;
- a data-plane worker sends :class:`Hello` when it (re)starts or has missed a
  change and gets the current complete :class:`Snapshot` at once — no waiting for
  a cluster event, nothing lost to a slow joiner (this is why it is not
  PUB/SUB) — and later a :class:`StateChange` per generation;
- workers answer :class:`Applied` with the generation applied or the error.

A change names the Services added or changed and the keys of those removed
(:class:`StateDelta`); :func:`apply_change` builds the next state from the one
before, sharing every unchanged Service object, and :func:`diff_states` computes
a change. So the bus carries O(change), and nobody decodes or compares the
Services that did not change.

Messages are msgpack-encoded msgspec Structs, tagged by type and decoded
strictly: anything malformed raises :class:`MessageError`, which receivers log,
count and drop. Receivers of complete states decode them with a
:class:`StateDecoder`, which builds only what differs from the state before.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import os
import secrets
from typing import Any

import msgspec
import zmq

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


# --- changes ----------------------------------------------------------------------------------


class ChangeError(ValueError):
    """A well-formed change does not fit the state it is applied to: the receiver holds
    another state than the sender thinks, and needs a complete one."""


_EMPTY_DELTA = StateDelta()


def _service_key(service: ServiceEgress) -> tuple[str, str]:
    return (service.namespace, service.name)


def _strictly_sorted(keys: list[tuple[str, str]]) -> bool:
    return all(a < b for a, b in itertools.pairwise(keys))


def apply_change(state: NodeDesiredState, delta: StateDelta) -> NodeDesiredState:
    """The state after ``delta``: ``state``'s Services, minus those removed, with those
    upserted in their place by (namespace, name); the other fields replaced where the
    delta sets them.

    ``state.services`` must be strictly sorted by (namespace, name), as every state that
    :func:`diff_states` makes a change from is. Unchanged Services are the same objects
    as in ``state`` (the new tuple costs a pointer copy per Service, nothing is compared
    or decoded), and an empty delta returns ``state`` itself. Raises
    :class:`ChangeError` when the delta does not fit: it removes a Service the state
    lacks, names one key twice, or its upserted Services are not strictly sorted.
    """
    if delta.empty:
        return state
    services = state.services
    if delta.upserted or delta.removed:
        upserted_keys = [_service_key(service) for service in delta.upserted]
        if not _strictly_sorted(upserted_keys):
            raise ChangeError("upserted Services are not strictly sorted by namespace/name")
        removed_keys = []
        for text in delta.removed:
            namespace, slash, name = text.partition("/")
            if not slash:
                raise ChangeError(f"removed key {text!r} is not namespace/name")
            removed_keys.append((namespace, name))
        named = set(removed_keys)
        if len(named) != len(removed_keys) or not named.isdisjoint(upserted_keys):
            raise ChangeError("a change names a Service twice")
        listed = list(services)
        for key in removed_keys:
            index = bisect.bisect_left(listed, key, key=_service_key)
            if index == len(listed) or _service_key(listed[index]) != key:
                raise ChangeError(f"removed Service {key[0]}/{key[1]} is not in the state")
            del listed[index]
        for key, service in zip(upserted_keys, delta.upserted, strict=True):
            index = bisect.bisect_left(listed, key, key=_service_key)
            if index < len(listed) and _service_key(listed[index]) == key:
                listed[index] = service
            else:
                listed.insert(index, service)
        services = tuple(listed)
    return NodeDesiredState(
        node=state.node,
        fwmask=state.fwmask,
        exclude_dst_ipv4=state.exclude_dst_ipv4,
        exclude_dst_ipv6=state.exclude_dst_ipv6,
        services=services,
        routes=state.routes if delta.routes is None else delta.routes,
        transit_guard_ipv4=state.transit_guard_ipv4
        if delta.transit_guard_ipv4 is None
        else delta.transit_guard_ipv4,
        transit_guard_ipv6=state.transit_guard_ipv6
        if delta.transit_guard_ipv6 is None
        else delta.transit_guard_ipv6,
    )


def diff_states(
    old: NodeDesiredState, new: NodeDesiredState, *, old_sorted: bool = False
) -> StateDelta | None:
    """The change that :func:`apply_change` turns ``old`` into ``new`` with, or None when
    only a complete state can say it: node, mask or exclude CIDRs differ, or the Services
    of either are not strictly sorted by (namespace, name).

    Services are compared by identity first (a producer that shares unchanged objects
    between states, as :func:`apply_change` and :class:`StateDecoder` do, pays a pointer
    comparison for each), then by value. ``old_sorted``: the caller knows that
    ``old.services`` is strictly sorted (it was the ``new`` of a diff that gave a
    change), which spares checking it when the Services keep their places.
    """
    if (
        old.node != new.node
        or old.fwmask != new.fwmask
        or old.exclude_dst_ipv4 != new.exclude_dst_ipv4
        or old.exclude_dst_ipv6 != new.exclude_dst_ipv6
    ):
        return None
    services = _diff_services(old.services, new.services, old_sorted)
    if services is None:
        return None
    upserted, removed = services
    return StateDelta(
        upserted=upserted,
        removed=removed,
        routes=_changed(old.routes, new.routes),
        transit_guard_ipv4=_changed(old.transit_guard_ipv4, new.transit_guard_ipv4),
        transit_guard_ipv6=_changed(old.transit_guard_ipv6, new.transit_guard_ipv6),
    )


def _changed(old: tuple[Any, ...], new: tuple[Any, ...]) -> Any:
    """``new``, or None when it equals ``old``."""
    return None if new is old or new == old else new


def _diff_services(
    before: tuple[ServiceEgress, ...], after: tuple[ServiceEgress, ...], before_sorted: bool
) -> tuple[tuple[ServiceEgress, ...], tuple[str, ...]] | None:
    """(upserted, removed keys) from ``before`` to ``after``, None if either is unsorted."""
    if before is after:
        return (), ()
    if len(before) == len(after):
        # The common change: Services replaced in place. The identity pass runs in C.
        differing = list(itertools.compress(range(len(after)), map(operator.is_not, before, after)))
        if all(_service_key(before[i]) == _service_key(after[i]) for i in differing) and (
            before_sorted or _strictly_sorted([_service_key(service) for service in before])
        ):
            return tuple(after[i] for i in differing if before[i] != after[i]), ()
    before_keys = [_service_key(service) for service in before]
    after_keys = [_service_key(service) for service in after]
    if not (_strictly_sorted(before_keys) and _strictly_sorted(after_keys)):
        return None
    upserted: list[ServiceEgress] = []
    removed: list[str] = []
    i = j = 0
    while i < len(before) or j < len(after):
        if j == len(after) or (i < len(before) and before_keys[i] < after_keys[j]):
            removed.append(before[i].key)
            i += 1
        elif i == len(before) or after_keys[j] < before_keys[i]:
            upserted.append(after[j])
            j += 1
        else:
            if before[i] is not after[j] and before[i] != after[j]:
                upserted.append(after[j])
            i += 1
            j += 1
    return tuple(upserted), tuple(removed)


class ChangePublisher:
    """The watcher's side of the bus: turns each desired state into the frame to send.

    The first frame, and the first after :meth:`reset` or a :class:`ResendRequest`, is a
    complete :class:`Publish`; every later one a :class:`PublishChange` from the state
    of the frame before, numbered by a ``sequence`` that rises with every change. The
    supervisor checks that each change follows the state it holds and, when one does
    not (a frame was lost, or the supervisor restarted), sends a
    :class:`ResendRequest`. The same state again (the periodic liveness resend) is an
    empty change of a few bytes; a change of only the problems carries just those.

    Use in the watcher's loop, with its DEALER ``socket`` (:func:`connect_worker`)::

        publisher = ChangePublisher()
        ...
        # whenever a state is computed, and for the periodic resend of the last one:
        socket.send(publisher.frame(publish.state, publish.problems))
        ...
        # once per loop iteration (a ResendRequest makes the next frame complete):
        while True:
            try:
                frame = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                if publisher.handle(frame):
                    socket.send(publisher.frame(last.state, last.problems))  # at once, or
                    # let the next periodic resend carry it
            except MessageError as error:
                IPC_DROPPED.labels("watcher").inc()
                log.warning("dropped a message", extra={"error": str(error)})

    Every frame from :meth:`frame` must be sent (or :meth:`reset` called): the next one
    is a change from it. A new process starts with a new publisher, whose numbers
    start at random so that a late change of its predecessor cannot match.
    """

    def __init__(self) -> None:
        self._state: NodeDesiredState | None = None
        self._problems: tuple[str, ...] = ()
        self._sequence = secrets.randbits(48)
        self._complete_next = True
        self._state_sorted = False
        """The last state's Services are known to be strictly sorted (a diff checked them)."""

    @property
    def sequence(self) -> int:
        """The number of the state of the last frame."""
        return self._sequence

    def frame(self, state: NodeDesiredState, problems: tuple[str, ...] = ()) -> bytes:
        """The encoded message that brings the supervisor from the last frame's state (and
        problems) to ``state`` and ``problems``."""
        delta: StateDelta | None = None
        if not self._complete_next and self._state is not None:
            delta = (
                _EMPTY_DELTA
                if state is self._state
                else diff_states(self._state, state, old_sorted=self._state_sorted)
            )
        message: Publish | PublishChange
        if delta is None:
            self._sequence += 1
            message = Publish(state, problems, self._sequence)
            self._complete_next = False
        else:
            base = self._sequence
            problems_changed = problems != self._problems
            if problems_changed or not delta.empty:
                self._sequence += 1
            message = PublishChange(
                self._sequence, base, delta, problems if problems_changed else None
            )
        if delta is None:
            self._state_sorted = False
        elif self._state is not None and state.services is not self._state.services:
            self._state_sorted = True  # diff_states checked them (or kept sorted places)
        self._state, self._problems = state, problems
        return encode(message)

    def reset(self) -> None:
        """Make the next frame a complete :class:`Publish`."""
        self._complete_next = True

    def handle(self, frame: bytes) -> bool:
        """Take a frame the supervisor sent; True when it asked for a complete state (the
        next :meth:`frame` gives one). Raises :class:`MessageError` for a malformed or
        unexpected frame (log, count and drop it)."""
        message = decode(frame)
        if not isinstance(message, ResendRequest):
            raise MessageError(f"unexpected {type(message).__name__} message for the watcher")
        self.reset()
        return True
