"""The members of a ``hash:ip,port`` set as text, and their port ranges.

metaleg writes such a member ``<address>,<protocol>:<first>[-<last>]``
(``10.244.1.5,tcp:25``, ``fd00::5,udp:8000-8100``), as ``ipset`` does. The
kernel holds one element per port: a range is expanded when it is added (and
removed), and a listing shows every port on its own. So the canonical text of a
set's members is its *runs*: per address and protocol, the maximal ranges of
consecutive ports (:func:`port_runs`), which is what the desired members are
(ranges merged, :class:`~metaleg.model.PortRange`) and what a listing is turned
into; :func:`port_run_changes` computes the runs to add and to remove between two
such sets without expanding them (a ``tcp/1024-65535`` policy is one run, not
64512 ports).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
"""The protocols a destination port policy names, by IP protocol number."""
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}

PortKey = tuple[str, str]
"""(address, protocol) of a member: its runs are compared per key."""
Run = tuple[int, int]
"""``first``..``last``, inclusive."""


def port_member(address: str, protocol: str, first: int, last: int) -> str:
    """The text of one run: ``<address>,<protocol>:<first>[-<last>]``."""
    if first == last:
        return f"{address},{protocol}:{first}"
    return f"{address},{protocol}:{first}-{last}"


def parse_port_member(member: str) -> tuple[str, str, int, int]:
    """(address, protocol, first, last) of a member's text; ``ValueError`` when it is not one.

    The protocol is a name of :data:`PROTOCOL_NUMBERS` or a number (a listing's
    member of another protocol)."""
    address, comma, rest = member.partition(",")
    protocol, colon, ports = rest.partition(":")
    if not comma or not colon or not address or not protocol:
        raise ValueError(f"not <address>,<protocol>:<port>: {member!r}")
    first_text, dash, last_text = ports.partition("-")
    first = int(first_text)
    last = int(last_text) if dash else first
    if not 0 <= first <= last <= 0xFFFF:
        raise ValueError(f"not a port range: {member!r}")
    return address, protocol, first, last


def protocol_number(protocol: str) -> int:
    """The IP protocol number of a member's protocol (a name or a number)."""
    number = PROTOCOL_NUMBERS.get(protocol)
    if number is None:
        number = int(protocol)
        if not 0 < number < 256:
            raise ValueError(f"not an IP protocol: {protocol!r}")
    return number


def protocol_name(number: int) -> str:
    """A protocol number as a member writes it (a name when there is one)."""
    return PROTOCOL_NAMES.get(number) or str(number)


def merge_runs(runs: Iterable[Run]) -> list[Run]:
    """Sorted, with overlapping and adjacent runs merged: the canonical runs."""
    merged: list[list[int]] = []
    for first, last in sorted(runs):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(first, last) for first, last in merged]


def _by_key(members: Iterable[str]) -> dict[PortKey, list[Run]]:
    grouped: dict[PortKey, list[Run]] = {}
    for member in members:
        address, protocol, first, last = parse_port_member(member)
        grouped.setdefault((address, protocol), []).append((first, last))
    return grouped


def port_runs(members: Iterable[str]) -> frozenset[str]:
    """The canonical members of a set holding ``members`` (single ports or runs)."""
    return frozenset(
        port_member(address, protocol, first, last)
        for (address, protocol), runs in _by_key(members).items()
        for first, last in merge_runs(runs)
    )


def port_runs_of(ports: Mapping[PortKey, list[int]]) -> set[str]:
    """The canonical members (runs) of single ports, given per (address, protocol)."""
    members: set[str] = set()
    for (address, protocol), numbers in ports.items():
        numbers.sort()
        first = last = numbers[0]
        for number in numbers[1:]:
            if number > last + 1:
                members.add(port_member(address, protocol, first, last))
                first = number
            last = number
        members.add(port_member(address, protocol, first, last))
    return members


def subtract_runs(runs: list[Run], taken: list[Run]) -> list[Run]:
    """The ports of ``runs`` not in ``taken`` (both canonical), as canonical runs."""
    result: list[Run] = []
    index = 0
    for first, last in runs:
        start = first
        while index < len(taken) and taken[index][1] < start:
            index += 1
        probe = index
        while start <= last:
            if probe >= len(taken) or taken[probe][0] > last:
                result.append((start, last))
                break
            taken_first, taken_last = taken[probe]
            if taken_first > start:
                result.append((start, taken_first - 1))
            start = max(start, taken_last + 1)
            probe += 1
    return result


def port_run_changes(
    current: frozenset[str], desired: frozenset[str]
) -> tuple[frozenset[str], frozenset[str]]:
    """The runs to add and to remove to take a set from ``current`` to ``desired`` members.

    Only the keys (address and protocol) whose members differ are looked at; a
    port in both stays untouched (it is neither removed nor added again)."""
    if current == desired:
        return frozenset(), frozenset()
    changed = current ^ desired
    keys = {(address, protocol) for address, protocol, _, _ in map(parse_port_member, changed)}
    before = _by_key(m for m in current if _key(m) in keys)
    after = _by_key(m for m in desired if _key(m) in keys)
    gained: set[str] = set()
    lost: set[str] = set()
    for key in keys:
        old, new = merge_runs(before.get(key, ())), merge_runs(after.get(key, ()))
        gained.update(port_member(*key, *run) for run in subtract_runs(new, old))
        lost.update(port_member(*key, *run) for run in subtract_runs(old, new))
    return frozenset(gained), frozenset(lost)


def _key(member: str) -> PortKey:
    address, _, rest = member.partition(",")
    return address, rest.partition(":")[0]
