"""Messages between metaleg's processes and the ZeroMQ sockets that carry them.

Topology: the supervisor binds one ROUTER socket at ``ipc://<run dir>/bus.sock``;
the watcher, firewall and routing workers each connect a DEALER whose identity
is the process name. The supervisor is the hub because it outlives every
worker:

- the watcher sends :class:`Publish` with the complete desired state whenever
  it changes; the supervisor numbers it (a rising ``generation``) and keeps it;
- a data-plane worker sends :class:`Hello` when it (re)starts and gets the
  current :class:`Snapshot` at once — no waiting for a cluster event, nothing
  lost to a slow joiner (this is why it is not PUB/SUB) — and every later one;
- workers answer :class:`Applied` with the generation applied or the error.

Messages are msgpack-encoded msgspec Structs, tagged by type and decoded
strictly: anything malformed raises :class:`MessageError`, which receivers log,
count and drop.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import zmq

from metaleg.model import GatewayRoute, NodeDesiredState

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


class Snapshot(msgspec.Struct, tag="snapshot", frozen=True, forbid_unknown_fields=True):
    """A numbered desired state, sent by the supervisor to the data-plane workers."""

    generation: int
    state: NodeDesiredState


class Applied(msgspec.Struct, tag="applied", frozen=True, forbid_unknown_fields=True):
    """A worker's report: ``generation`` applied (error empty), or failed with ``error``."""

    process: str
    generation: int
    error: str = ""
    duration_seconds: float = 0.0
    backend: str = ""


class WatcherStatus(msgspec.Struct, tag="watcher-status", frozen=True, forbid_unknown_fields=True):
    """The watcher's view of the API server: synced resources and the current problem."""

    synced: bool
    error: str = ""


Message = Hello | Publish | Snapshot | Applied | WatcherStatus

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


_routes_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
    Hello | Publish | _RoutesSnapshot | Applied | WatcherStatus
)


def decode_routes_only(frame: bytes) -> Message:
    """:func:`decode`, but a :class:`Snapshot`'s state keeps only its node, mask, exclude
    CIDRs and routes (no Services, no transit guard): all the routing worker reads."""
    try:
        message = _routes_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise MessageError(f"invalid message ({len(frame)} bytes): {error}") from None
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


def bind_supervisor(context: zmq.Context[Any], run_dir: str) -> zmq.Socket[Any]:
    """The supervisor's ROUTER socket. A restarted worker reuses its identity, so the new
    connection takes over the old one (ROUTER_HANDOVER) instead of being refused."""
    socket: zmq.Socket[Any] = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
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
