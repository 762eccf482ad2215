"""Changes of the desired state: applied, computed and published (O(change) on the bus).

A change names the Services added or changed and the keys of those removed
(:class:`~metaleg.ipc.StateDelta`): :func:`apply_change` builds the next state
from the one before, sharing every unchanged Service object, :func:`diff_states`
computes a change between two states, and :class:`ChangePublisher` is the
watcher's side: it numbers the changes it sends and answers a resend request with
a complete state. The messages themselves and their sockets are
:mod:`metaleg.ipc`'s.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import operator
import secrets
from typing import Any

from metaleg.ipc import (
    MessageError,
    Publish,
    PublishChange,
    ResendRequest,
    Snapshot,
    StateChange,
    StateDelta,
    decode,
    encode,
)
from metaleg.model import NodeDesiredState, ServiceEgress


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


class Folded(enum.Enum):
    """What :meth:`FollowedState.fold` did with a change."""

    TAKEN = "taken"
    """The change was folded onto the state held: a new newest state."""
    HELD = "held"
    """Nothing to do: the state held already includes it, or no state is held yet (the
    first complete one is on its way)."""
    AWAITED = "awaited"
    """Dropped while a complete state is on its way (it includes the change)."""


class FollowedState:
    """The desired state a receiver of the supervisor's messages holds (the data-plane
    workers, the audit process): the newest complete :class:`~metaleg.ipc.Snapshot`,
    with the changes that follow it folded on.

    A change is folded only onto its own base generation; one that does not follow
    the state held raises :class:`ChangeError` and sets :attr:`awaiting_snapshot`: the
    receiver then asks for the complete state (``Hello``) and drops changes until it
    arrives."""

    def __init__(self) -> None:
        self.latest: Snapshot | None = None
        """The newest state received (complete, or folded from changes) and its generation."""
        self.awaiting_snapshot = False
        """A change did not follow ``latest``: a complete state was asked for."""

    @property
    def wants_snapshot(self) -> bool:
        """No state yet, or a change was missed: ask for the complete state."""
        return self.latest is None or self.awaiting_snapshot

    def take_snapshot(self, snapshot: Snapshot) -> bool:
        """Hold a complete state; True when it is another generation than the one held."""
        self.awaiting_snapshot = False
        if self.latest is not None and snapshot.generation == self.latest.generation:
            return False
        self.latest = snapshot
        return True

    def fold(self, change: StateChange) -> Folded:
        """Fold ``change`` onto the state held (see :class:`Folded`); raises
        :class:`ChangeError` when it does not follow it."""
        latest = self.latest
        if latest is None or change.generation <= latest.generation:
            return Folded.HELD
        if self.awaiting_snapshot:
            return Folded.AWAITED
        try:
            if change.base_generation != latest.generation:
                raise ChangeError(
                    f"it follows generation {change.base_generation}, not {latest.generation}"
                )
            state = apply_change(latest.state, change.delta)
        except ChangeError:
            self.awaiting_snapshot = True
            raise
        self.latest = Snapshot(change.generation, state)
        return Folded.TAKEN
