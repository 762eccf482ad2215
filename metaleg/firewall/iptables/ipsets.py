"""metaleg's ipsets, driven over netlink (never the ipset binary).

The iptables backend keeps, per family, ``hash:net`` sets (the excluded
destinations, the transit guard's sources, destination policies' networks),
``hash:ip`` sets (one per SNAT Service, the shared sets of SNAT and REJECT
sources, policed sources), a ``hash:ip skbinfo`` set (marked sources with their
marks) and a ``hash:ip,port`` set (policed sources' ports); see
:mod:`metaleg.firewall.iptables.render` and :mod:`metaleg.firewall.iptables.policy`.
The shared SNAT, REJECT and mark sets have the ``counters`` extension: their
members' counters are the per-Service counters. This module holds
the plain description of a set (:class:`SetSpec`), the pure planning of how to
get from the kernel's sets to the desired ones (:func:`plan_sets`), and a
client that reads and edits sets in batches of netlink requests
(:class:`IpsetClient`, over :mod:`metaleg.firewall.wire.ipset`). Every error
is a :class:`~metaleg.backend.BackendError` that names the set (and the member).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable

import msgspec

from metaleg.backend import BackendError
from metaleg.firewall.wire.ipset import (
    CMD_ADD,
    CMD_CREATE,
    CMD_DEL,
    CMD_DESTROY,
    ERR_BUSY,
    HASH_IP_PORT,
    IpsetError,
    IpsetSocket,
    Request,
)
from metaleg.firewall.wire.ipset_counters import IpsetCounterReader, MemberCount
from metaleg.firewall.wire.ipset_ports import port_run_changes
from metaleg.model import Family

SET_PREFIXES = ("METALEG-", "inet6:METALEG-")
"""Names metaleg owns: its own sets, and the Go original's (whose IPv6 sets were
named with an ``inet6:`` prefix). Garbage collection removes any of them it
does not need."""

HASH_IP = "hash:ip"
HASH_NET = "hash:net"
HASH_IP_MARK = "hash:ip skbinfo"
"""A ``hash:ip`` set with the skbinfo extension: each member carries an skbmark
(``<address> skbmark <value>/<mask>``) that ``-j SET --map-set ... --map-mark`` applies."""
HASH_IP_PORT_KIND = HASH_IP_PORT
"""Members ``<address>,<protocol>:<first>[-<last>]``: runs of ports, each port one element
in the kernel (:mod:`metaleg.firewall.wire.ipset_ports`)."""
PORT_SET_MAXELEM = 1 << 22
"""The most elements (ports) a ``hash:ip,port`` set may hold: a policy's range costs one
element per port and policed source (the kernel's default limit, 65536, is 650 sources
with a ``tcp/8000-8100`` policy)."""

_ADDRESS_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_FAMILY_OF: dict[int, Family] = {socket.AF_INET: Family.IPV4, socket.AF_INET6: Family.IPV6}


class SetSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ipset: name, type (``hash:ip`` or ``hash:net``), family and members.

    Members are canonical text: addresses as :mod:`ipaddress` formats them and,
    in ``hash:net`` sets, always with a prefix length (``10.0.0.0/8``, ``192.0.2.1/32``);
    in ``hash:ip skbinfo`` sets with their mark (``10.244.1.5 skbmark 0x100000/0xf00000``).
    """

    name: str
    kind: str
    family: Family
    members: frozenset[str] = frozenset()
    counters: bool = False
    """With the ``counters`` extension (packets and bytes per member)."""
    narrows: bool = False
    """Its members narrow what other sets' members are treated for (a policy's policed
    sources): within a batch added after and removed before every other set's members,
    so that a source is never policed without its policy's members."""


class SetPlan(msgspec.Struct, frozen=True):
    """The ipset operations that take the kernel from one set of sets to another.

    They run in two phases around the iptables commits: ``create`` (and
    ``recreate``) and ``add`` before any rule references the sets; ``remove``
    and ``destroy`` after no rule references what goes away any more.
    """

    create: tuple[SetSpec, ...] = ()
    """Sets to create (empty; their members are in ``add``)."""
    recreate: tuple[SetSpec, ...] = ()
    """Sets that exist with the wrong type or family: destroyed and created again."""
    add: tuple[tuple[SetSpec, frozenset[str]], ...] = ()
    remove: tuple[tuple[SetSpec, frozenset[str]], ...] = ()
    destroy: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when nothing needs to change."""
        return not (self.create or self.recreate or self.add or self.remove or self.destroy)

    def describe_make(self) -> list[str]:
        """The changes of the first phase, one line per set, for logs (``ipset NAME: +2``)."""
        lines = [f"ipset {spec.name}: create" for spec in self.create]
        lines += [f"ipset {spec.name}: recreate" for spec in self.recreate]
        lines += [f"ipset {spec.name}: +{len(members)}" for spec, members in self.add]
        return lines

    def describe_break(self) -> list[str]:
        """The changes of the last phase, one line per set (``ipset NAME: -1``, ``destroy``)."""
        lines = [f"ipset {spec.name}: -{len(members)}" for spec, members in self.remove]
        lines += [f"ipset {name}: destroy" for name in self.destroy]
        return lines


def is_metaleg_set(name: str) -> bool:
    """Whether a set name belongs to metaleg (this version or an older one)."""
    return name.startswith(SET_PREFIXES)


def plan_sets(current: dict[str, SetSpec], desired: dict[str, SetSpec]) -> SetPlan:
    """How to get from the ``current`` sets to the ``desired`` ones (a pure function).

    Members are changed by difference, never by recreating a set; every current
    set that is not desired is destroyed. ``current`` is either what was applied
    last or (for a re-sync) every metaleg set the kernel has.
    """
    create: list[SetSpec] = []
    recreate: list[SetSpec] = []
    add: list[tuple[SetSpec, frozenset[str]]] = []
    remove: list[tuple[SetSpec, frozenset[str]]] = []
    for name, spec in desired.items():
        existing = current.get(name)
        if existing is spec:
            continue  # the same object: unchanged since the last apply
        if existing is None or _layout(existing) != _layout(spec):
            (create if existing is None else recreate).append(
                SetSpec(
                    name=name,
                    kind=spec.kind,
                    family=spec.family,
                    counters=spec.counters,
                    narrows=spec.narrows,
                )
            )
            if spec.members:
                add.append((spec, spec.members))
            continue
        if spec.kind == HASH_IP_MARK:
            # Members are addresses with a mark: a changed mark is an add (the kernel
            # updates it in place, atomically); only addresses that go are removed.
            gained, lost = _mark_changes(existing.members, spec.members)
        elif spec.kind == HASH_IP_PORT_KIND:
            # Runs of ports: only the ports that differ are added or removed.
            gained, lost = port_run_changes(existing.members, spec.members)
        else:
            gained, lost = spec.members - existing.members, existing.members - spec.members
        if gained:
            add.append((spec, gained))
        if lost:
            remove.append((spec, lost))
    destroy = tuple(sorted(name for name in current if name not in desired))
    return SetPlan(
        create=tuple(sorted(create, key=_name)),
        recreate=tuple(sorted(recreate, key=_name)),
        add=tuple(sorted(add, key=_added_order)),
        remove=tuple(sorted(remove, key=_removed_order)),
        destroy=destroy,
    )


def _layout(spec: SetSpec) -> tuple[str, Family, bool]:
    """What a set is created with: type, family, counters."""
    return spec.kind, spec.family, spec.counters


def _name(spec: SetSpec) -> str:
    return spec.name


def _added_order(item: tuple[SetSpec, frozenset[str]]) -> tuple[bool, str]:
    return item[0].narrows, item[0].name


def _removed_order(item: tuple[SetSpec, frozenset[str]]) -> tuple[bool, str]:
    return not item[0].narrows, item[0].name


def temporary_set_name(name: str) -> str:
    """The name a set is built under before it takes ``name``'s place (:meth:`IpsetClient.make`)."""
    return f"METALEG-TMP-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _mark_changes(
    current: frozenset[str], desired: frozenset[str]
) -> tuple[frozenset[str], frozenset[str]]:
    """Members of an skbinfo set to add (new or with another mark) and to remove (address gone).

    An address of ``current`` whose member is not in ``desired`` either goes or has
    another mark there, and then its new member is among the gained ones.
    """
    gained = desired - current
    renewed = {member.partition(" ")[0] for member in gained}
    lost = frozenset(
        member for member in current - desired if member.partition(" ")[0] not in renewed
    )
    return gained, lost


class IpsetClient:
    """Reads and edits ipsets of the current network namespace over netlink, in batches.

    Requests go out many to a datagram through
    :class:`~metaleg.firewall.wire.ipset.IpsetSocket`; errors name the set and, for
    members, the member. The
    socket opens on first use and is closed after any error (a failed exchange
    can leave it out of step), so the next call starts clean.
    """

    def __init__(self) -> None:
        self._socket = IpsetSocket()
        self._counters = IpsetCounterReader()

    def close(self) -> None:
        """Close the netlink sockets (they reopen on the next call)."""
        self._socket.close()
        self._counters.close()

    def read_counters(self, name: str) -> list[MemberCount] | None:
        """The counters of every member of set ``name`` (None: no such set)."""
        try:
            return self._counters.counters(name)
        except Exception as error:
            raise BackendError(f"ipset {name}: cannot read counters: {_describe(error)}") from error

    def _fail(self, message: str, error: BaseException) -> BackendError:
        self.close()
        return BackendError(f"{message}: {_describe(error)}")

    def list_sets(self) -> dict[str, SetSpec]:
        """Every metaleg set in the kernel with its type, family and members (one dump).

        Sets of other types or families than metaleg creates are reported with
        their real type, so that :func:`plan_sets` recreates them.
        """
        try:
            listed = self._socket.dump(is_metaleg_set)
        except Exception as error:
            raise self._fail("ipset: cannot list sets", error) from error
        sets: dict[str, SetSpec] = {}
        for name, entry in listed.items():
            family = _FAMILY_OF.get(entry.family)
            kind = HASH_IP_MARK if entry.kind == HASH_IP and entry.skbinfo else entry.kind
            if family is None or kind not in (HASH_IP, HASH_NET, HASH_IP_MARK, HASH_IP_PORT_KIND):
                # Not a set of IP entries metaleg can use: wrong whatever the family.
                sets[name] = SetSpec(name=name, kind=entry.kind or "unknown", family=Family.IPV4)
                continue
            sets[name] = SetSpec(
                name=name,
                kind=kind,
                family=family,
                members=frozenset(entry.members),
                counters=entry.counters,
            )
        return sets

    def make(self, plan: SetPlan) -> None:
        """The first phase of ``plan`` in one batch: recreate, create, add members.

        The kernel carries out the requests in order; the first failure raises
        (naming the set and, for a member, the member) after the batch. Sets are
        recreated first (:meth:`_recreate`).
        """
        swapped = self._recreate(plan) if plan.recreate else set()
        requests: list[Request] = []
        for spec in plan.create:
            requests.append(self._create(spec))
        for spec, members in plan.add:
            if spec.name not in swapped:
                requests += self._members(CMD_ADD, spec, members)
        self._run(requests)

    def _recreate(self, plan: SetPlan) -> set[str]:
        """Give the sets of ``plan.recreate`` their new type, family or extensions; the names
        of those that hold their members already.

        A set that rules reference cannot be destroyed. So the new set is built under a
        temporary name with all its members and swapped into place (rules refer to the
        set's index, which keeps the name): its members change atomically, never empty in
        between. The kernel swaps sets of the same type and family only (another
        extension is fine: the ``counters`` an older version's sets lack); other sets
        are destroyed and created again, which fails while a rule uses them.
        """
        recreated = {spec.name for spec in plan.recreate}
        members: dict[str, set[str]] = {name: set() for name in recreated}
        for spec, added in plan.add:
            if spec.name in recreated:
                members[spec.name].update(added)
        requests: list[Request] = []
        swaps: dict[str, Request] = {}
        for spec in plan.recreate:
            temporary = temporary_set_name(spec.name)
            requests.append(self._socket.destroy(temporary))
            requests.append(self._create(spec, temporary))
            requests += self._members(CMD_ADD, spec, members[spec.name], temporary)
            swaps[spec.name] = self._socket.swap(temporary, spec.name)
            requests.append(swaps[spec.name])
            requests.append(self._socket.destroy(temporary))
        failed = self._send(requests)
        unswapped = {name for name, request in swaps.items() if request.error is not None}
        swap_ids = {id(request) for request in swaps.values()}
        others = [request for request in failed if id(request) not in swap_ids]
        if others:
            raise self._failed(others[0])
        fallback: list[Request] = []
        for spec in plan.recreate:
            if spec.name in unswapped:
                fallback.append(self._socket.destroy(spec.name))
                fallback.append(self._create(spec))
        self._run(fallback)
        return recreated - unswapped

    def unmake(self, plan: SetPlan) -> list[str]:
        """The last phase of ``plan`` in one batch: remove members, destroy sets.

        Raises for a failed removal; returns the errors of failed destroys (the
        other sets are destroyed all the same).
        """
        requests: list[Request] = []
        for spec, members in plan.remove:
            requests += self._members(CMD_DEL, spec, members)
        destroys = [self._socket.destroy(name) for name in plan.destroy]
        failed = self._send(requests + destroys)
        removal = [request for request in failed if request.command == CMD_DEL]
        if removal:
            raise self._failed(removal[0])
        return [str(self._failed(request)) for request in failed]

    # -- internals --------------------------------------------------------

    def _create(self, spec: SetSpec, name: str | None = None) -> Request:
        """A CREATE request for ``spec`` (under ``name``, if given)."""
        try:
            return self._socket.create(
                name or spec.name,
                spec.kind,
                _ADDRESS_FAMILY[spec.family],
                counters=spec.counters,
                maxelem=PORT_SET_MAXELEM if spec.kind == HASH_IP_PORT_KIND else None,
            )
        except Exception as error:
            raise self._fail(
                f"ipset {spec.name}: cannot create ({spec.kind}, IPv{int(spec.family)})", error
            ) from error

    def _members(
        self, command: int, spec: SetSpec, members: Iterable[str], name: str | None = None
    ) -> list[Request]:
        try:
            return self._socket.members(
                command,
                name or spec.name,
                _ADDRESS_FAMILY[spec.family],
                spec.kind == HASH_NET,
                sorted(members),
            )
        except IpsetError as error:
            verb = "add" if command == CMD_ADD else "delete"
            raise BackendError(
                f"ipset {spec.name}: cannot {verb} {error.member}: {error}"
            ) from error

    def _send(self, requests: list[Request]) -> list[Request]:
        try:
            return self._socket.run(requests)
        except Exception as error:
            raise self._fail("ipset: netlink exchange failed", error) from error

    def _run(self, requests: list[Request]) -> None:
        failed = self._send(requests)
        if failed:
            raise self._failed(failed[0])

    def _failed(self, request: Request) -> BackendError:
        error = request.error
        assert error is not None
        if request.command == CMD_CREATE:
            return BackendError(f"ipset {request.name}: cannot create: {error}")
        if request.command == CMD_DESTROY:
            if error.code == ERR_BUSY:
                return BackendError(
                    f"ipset {request.name}: cannot destroy, a rule outside metaleg's chains "
                    f"still uses it: {error}"
                )
            return BackendError(f"ipset {request.name}: cannot destroy: {error}")
        verb = "add" if request.command == CMD_ADD else "delete"
        member = error.member if error.member is not None else "members"
        return BackendError(f"ipset {request.name}: cannot {verb} {member}: {error}")


def _describe(error: BaseException) -> str:
    """An exception as text (ipset errors carry the kernel's code)."""
    return str(error) or type(error).__name__
