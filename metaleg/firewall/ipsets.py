"""metaleg's ipsets, driven over netlink with pyroute2 (never the ipset binary).

The iptables backend keeps, per family, one ``hash:net`` set of excluded
destinations, one ``hash:net`` set of the transit guard's sources (while there
are any) and one ``hash:ip`` set of source addresses per Service. This module holds
the plain description of a set (:class:`SetSpec`), the pure planning of how to
get from the kernel's sets to the desired ones (:func:`plan_sets`), and a thin
client that reads and edits sets (:class:`IpsetClient`). Every error is a
:class:`~metaleg.backend.BackendError` that names the set.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import msgspec

from metaleg.backend import BackendError
from metaleg.model import Family

SET_PREFIXES = ("METALEG-", "inet6:METALEG-")
"""Names metaleg owns: its own sets, and the Go original's (whose IPv6 sets were
named with an ``inet6:`` prefix). Garbage collection removes any of them it
does not need."""

HASH_IP = "hash:ip"
HASH_NET = "hash:net"

_ADDRESS_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_FAMILY_OF = {socket.AF_INET: Family.IPV4, socket.AF_INET6: Family.IPV6}
_IPSET_FLAG_LIST_SETNAME = 1 << 1  # list only the names (``ipset list -n``)
_IPSET_ERR_BUSY = 4100  # "set is in use by a kernel component", e.g. an iptables rule


class SetSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ipset: name, type (``hash:ip`` or ``hash:net``), family and members.

    Members are canonical text: addresses as :mod:`ipaddress` formats them and,
    in ``hash:net`` sets, always with a prefix length (``10.0.0.0/8``, ``192.0.2.1/32``).
    """

    name: str
    kind: str
    family: Family
    members: frozenset[str] = frozenset()


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


def canonical_member(kind: str, text: str) -> str:
    """The canonical text of a set member (raises ``ValueError`` for garbage)."""
    if kind == HASH_NET:
        return str(ipaddress.ip_network(text, strict=False))
    return str(ipaddress.ip_address(text))


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
    for name, spec in sorted(desired.items()):
        existing = current.get(name)
        if existing is None or (existing.kind, existing.family) != (spec.kind, spec.family):
            (create if existing is None else recreate).append(
                SetSpec(name=name, kind=spec.kind, family=spec.family)
            )
            if spec.members:
                add.append((spec, spec.members))
            continue
        if spec.members - existing.members:
            add.append((spec, spec.members - existing.members))
        if existing.members - spec.members:
            remove.append((spec, existing.members - spec.members))
    destroy = tuple(sorted(name for name in current if name not in desired))
    return SetPlan(
        create=tuple(create),
        recreate=tuple(recreate),
        add=tuple(add),
        remove=tuple(remove),
        destroy=destroy,
    )


class IpsetClient:
    """Reads and edits ipsets of the current network namespace over netlink.

    The netlink socket opens on first use and is closed after any error (a
    failed request can leave it out of step), so the next call starts clean.
    """

    def __init__(self) -> None:
        self._socket: Any = None

    def close(self) -> None:
        """Close the netlink socket (it reopens on the next call)."""
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None

    def _ipset(self) -> Any:
        if self._socket is None:
            from pyroute2 import IPSet

            try:
                self._socket = IPSet()
            except Exception as error:
                raise BackendError(f"ipset: cannot open the netlink socket: {error}") from error
        return self._socket

    def _fail(self, message: str, error: BaseException) -> BackendError:
        self.close()
        return BackendError(f"{message}: {_describe(error)}")

    def list_sets(self) -> dict[str, SetSpec]:
        """Every metaleg set in the kernel with its type, family and members.

        Sets of other types or families than metaleg creates are reported with
        their real type, so that :func:`plan_sets` recreates them.
        """
        ipset = self._ipset()
        try:
            names = [
                message.get_attr("IPSET_ATTR_SETNAME")
                for message in ipset.list(flags=_IPSET_FLAG_LIST_SETNAME)
            ]
        except Exception as error:
            raise self._fail("ipset: cannot list sets", error) from error
        sets: dict[str, SetSpec] = {}
        for name in names:
            if not isinstance(name, str) or not is_metaleg_set(name):
                continue
            spec = self._read(name)
            if spec is not None:
                sets[name] = spec
        return sets

    def _read(self, name: str) -> SetSpec | None:
        """One set with its members; None when it vanished meanwhile."""
        from pyroute2.ipset import NoSuchObject

        ipset = self._ipset()
        try:
            messages = list(ipset.list(name))
        except NoSuchObject:
            return None
        except Exception as error:
            raise self._fail(f"ipset {name}: cannot list members", error) from error
        kind = ""
        family: Family | None = None
        members: set[str] = set()
        # A large set arrives in several messages; only the first has the header.
        for message in messages:
            kind = message.get_attr("IPSET_ATTR_TYPENAME") or kind
            address_family = message.get_attr("IPSET_ATTR_FAMILY")
            if address_family in _FAMILY_OF:
                family = _FAMILY_OF[address_family]
            entries = message.get_attr("IPSET_ATTR_ADT")
            if entries is None:
                continue
            for data in entries.get_attrs("IPSET_ATTR_DATA"):
                member = _member_text(kind, data)
                if member is not None:
                    members.add(member)
        if family is None:
            # Not an IP set (e.g. a list:set or hash:mac): wrong for us whatever the family.
            return SetSpec(name=name, kind=kind or "unknown", family=Family.IPV4)
        return SetSpec(name=name, kind=kind, family=family, members=frozenset(members))

    def create(self, spec: SetSpec) -> None:
        """Create an empty set (no error if it already exists with this type)."""
        from pyroute2.ipset import AlreadyExists

        try:
            self._ipset().create(
                spec.name, stype=spec.kind, family=_ADDRESS_FAMILY[spec.family], exclusive=True
            )
        except AlreadyExists:
            pass
        except Exception as error:
            raise self._fail(
                f"ipset {spec.name}: cannot create ({spec.kind}, IPv{int(spec.family)})", error
            ) from error

    def add(self, spec: SetSpec, members: Iterable[str]) -> None:
        """Add members (those already present are fine)."""
        etype = "net" if spec.kind == HASH_NET else "ip"
        family = _ADDRESS_FAMILY[spec.family]
        ipset = self._ipset()
        for member in sorted(members):
            try:
                ipset.add(spec.name, member, family=family, exclusive=False, etype=etype)
            except Exception as error:
                raise self._fail(f"ipset {spec.name}: cannot add {member}", error) from error

    def remove(self, spec: SetSpec, members: Iterable[str]) -> None:
        """Delete members (those already gone are fine)."""
        etype = "net" if spec.kind == HASH_NET else "ip"
        family = _ADDRESS_FAMILY[spec.family]
        ipset = self._ipset()
        for member in sorted(members):
            try:
                ipset.delete(spec.name, member, family=family, exclusive=False, etype=etype)
            except Exception as error:
                raise self._fail(f"ipset {spec.name}: cannot delete {member}", error) from error

    def destroy(self, name: str) -> None:
        """Destroy a set (no error if it does not exist)."""
        from pyroute2.ipset import NoSuchObject

        try:
            self._ipset().destroy(name)
        except NoSuchObject:
            pass
        except Exception as error:
            if getattr(error, "code", None) == _IPSET_ERR_BUSY:
                raise self._fail(
                    f"ipset {name}: cannot destroy, a rule outside metaleg's chains still uses it",
                    error,
                ) from error
            raise self._fail(f"ipset {name}: cannot destroy", error) from error


def _member_text(kind: str, data: Any) -> str | None:
    """The canonical text of one listed member, or None if it is not an IP entry."""
    address = data.get_attr("IPSET_ATTR_IP_FROM")
    if address is None:
        return None
    text = address.get_attr("IPSET_ATTR_IPADDR_IPV4") or address.get_attr("IPSET_ATTR_IPADDR_IPV6")
    if not text:
        return None
    if kind == HASH_NET:
        prefix = data.get_attr("IPSET_ATTR_CIDR")
        if prefix is None:
            prefix = ipaddress.ip_address(text).max_prefixlen
        return str(ipaddress.ip_network(f"{text}/{prefix}", strict=False))
    return str(ipaddress.ip_address(text))


def _describe(error: BaseException) -> str:
    """pyroute2's ipset errors are ``(code, message)`` tuples; show them as text."""
    args: tuple[object, ...] = tuple(getattr(error, "args", ()))
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        return f"{args[1]} (code {args[0]})"
    return str(error) or type(error).__name__
