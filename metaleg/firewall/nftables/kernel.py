"""Reading the table back from the kernel and comparing it with the desired one.

:func:`read_table` lists ``table inet metaleg`` into an :class:`ActualTable`;
:meth:`ActualTable.content` gives its elements in the canonical form of
:class:`~.content.TableContent`, and :func:`differences` says what differs from
the desired table: sets, chains, and rules by their comment tags (in order) and,
where recorded right after our own write, by expression.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metaleg.firewall import conntrack
from metaleg.firewall.conntrack import DestinationPolicy
from metaleg.firewall.nftables.content import (
    TableContent,
    mark_literal,
    merge_port_ranges,
    port_element,
    ranges_to_cidrs,
)
from metaleg.firewall.nftables.counters import read_counted_sources, source_texts
from metaleg.firewall.nftables.layout import (
    FAMILY_OF_SUFFIX,
    QUALIFIED_TABLE,
    SLOT_SET_NAME,
    STATIC_SETS,
    SUFFIX,
    SetSpec,
    expected_sets,
    table_chains,
)
from metaleg.firewall.nftables.libnftables import Nft, NftError
from metaleg.firewall.wire.nfnetlink import NetfilterSocket
from metaleg.model import Family, PortRange, Protocol

log = logging.getLogger(__name__)

_OLD_LAYOUT_MARK_CHAIN = re.compile(r"^fwmark_([0-9a-f]{8})$")
"""A mark's chain in the layout before slot sets (a verdict map jumped to it)."""


@dataclass
class ActualTable:
    """The table as listed by ``nft -j list table inet metaleg``."""

    flags: list[str] = field(default_factory=list)
    sets: dict[str, SetSpec] = field(default_factory=dict)
    elements: dict[str, list[Any]] = field(default_factory=dict)
    chains: dict[str, tuple[str | None, str | None, int | None, str | None]] = field(
        default_factory=dict
    )
    rules: dict[str, list[tuple[str | None, str]]] = field(default_factory=dict)
    """chain -> [(comment, expression as canonical JSON)] in order"""

    @classmethod
    def parse(cls, document: Mapping[str, Any]) -> ActualTable:
        table = cls()
        for item in document.get("nftables", []):
            if not isinstance(item, dict):
                continue
            if "table" in item:
                flags = item["table"].get("flags", [])
                table.flags = [flags] if isinstance(flags, str) else list(flags)
            for kind in ("set", "map"):
                if kind in item:
                    obj = item[kind]
                    flags = obj.get("flags", [])
                    type_ = obj.get("type")  # a list for concatenations
                    statements = obj.get("stmt", [])
                    table.sets[obj["name"]] = SetSpec(
                        kind,
                        " . ".join(map(str, type_)) if isinstance(type_, list) else str(type_),
                        obj.get("map"),
                        tuple([flags] if isinstance(flags, str) else flags),
                        counter=any(isinstance(s, dict) and "counter" in s for s in statements),
                    )
                    table.elements[obj["name"]] = list(obj.get("elem", []))
            if "chain" in item:
                obj = item["chain"]
                table.chains[obj["name"]] = (
                    obj.get("type"),
                    obj.get("hook"),
                    obj.get("prio"),
                    obj.get("policy"),
                )
                table.rules.setdefault(obj["name"], [])
            if "rule" in item:
                obj = item["rule"]
                table.rules.setdefault(obj["chain"], []).append(
                    (obj.get("comment"), json.dumps(obj.get("expr"), sort_keys=True))
                )
        return table

    def set_members(self, name: str) -> frozenset[str]:
        """A plain set's elements, canonical (unparseable ones are skipped): prefixes for
        the interval sets, addresses for the others, ``<source> . <prefix>`` and
        ``<source> . <protocol> . <ports>`` for the destination policy's (see
        :func:`~.content.policy_elements`)."""
        family = _family_of_set(name)
        elements = self.elements.get(name, [])
        if name[:-1] == "count" and all(isinstance(e, str) for e in elements):
            return frozenset(elements)  # read over netlink: canonical already (read_table)
        if name[:-1] == "dst":
            return frozenset(
                f"{source} . {cidr}"
                for source, cidrs in _destinations(elements, family).items()
                for cidr in cidrs
            )
        if name[:-1] == "port":
            return frozenset(
                f"{source} . {port_element(ports)}"
                for source, found in _ports(elements, family).items()
                for ports in found
            )
        if name in STATIC_SETS and "interval" in STATIC_SETS[name].flags:
            return ranges_to_cidrs(
                [r for e in elements if (r := _address_range(e, family))], family
            )
        return frozenset(a for e in elements if (a := _canonical_address(e, family)))

    def map_members(self, name: str) -> dict[str, str]:
        """A map's elements as nft element strings (key -> value), canonical."""
        family = _family_of_set(name)
        result: dict[str, str] = {}
        for key, value in _map_entries(self.elements.get(name, [])):
            source = _canonical_address(key, family)
            if source is None:
                continue
            if name.startswith("snat"):
                if lb_ip := _canonical_address(value, family):
                    result[source] = lb_ip
            elif isinstance(value, int) and not isinstance(value, bool):
                result[source] = mark_literal(value)
        return result

    def _policies(self, family: Family) -> dict[str, DestinationPolicy]:
        """The destination policies the sets of ``family`` hold, per source (a source
        in ``policed_*`` only; its prefixes and ports as listed)."""
        s = SUFFIX[family]
        destinations = _destinations(self.elements.get(f"dst{s}", []), family)
        ports = _ports(self.elements.get(f"port{s}", []), family)
        by_cidr = self.set_members(f"policed_dst{s}")
        by_port = self.set_members(f"policed_port{s}")
        result: dict[str, DestinationPolicy] = {}
        for source in by_cidr | by_port:
            cidrs = tuple(destinations.get(source, ())) if source in by_cidr else ()
            port_ranges = ports.get(source, ()) if source in by_port else ()
            result[source] = DestinationPolicy(cidrs, port_ranges)
        return result

    def content(self) -> TableContent:
        """The set and map elements, canonical (unparseable elements are skipped); the
        marks as the slot sets hold them (what sets the mark). Without the keys of the
        counted sources (:attr:`TableContent.count`): the kernel holds no keys."""
        content = TableContent()
        for family in Family:
            s = SUFFIX[family]
            content.exclude[family] = self.set_members(f"exclude{s}")
            content.reject[family] = self.set_members(f"reject{s}")
            content.transit[family] = self.set_members(f"transit{s}")
            content.snat[family].update(self.map_members(f"snat{s}"))
            content.policy[family].update(self._policies(family))
        for name in self.elements:
            match = SLOT_SET_NAME.match(name)
            if match:
                family, fwmark = FAMILY_OF_SUFFIX[match.group(1)], int(match.group(2), 16)
                content.mark[family].update(dict.fromkeys(self.set_members(name), fwmark))
        # The layout before slot sets: verdict maps jumping to one chain per mark. Read
        # so that the first re-sync after an upgrade (a recreate) knows the sources were
        # marked already and flushes none of their flows.
        for family in Family:
            for key, value in _map_entries(self.elements.get(f"mark{SUFFIX[family]}", [])):
                target = value.get("jump", {}).get("target") if isinstance(value, dict) else None
                old = _OLD_LAYOUT_MARK_CHAIN.match(target) if isinstance(target, str) else None
                if old and (source := _canonical_address(key, family)):
                    content.mark[family].setdefault(source, int(old.group(1), 16))
        return content


def _destinations(elements: list[Any], family: Family) -> dict[str, list[str]]:
    """The elements of a ``dst<f>`` set: source -> its canonical prefixes, sorted."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for element in elements:
        parts = _concatenation(element, 2)
        source = _canonical_address(parts[0], family) if parts else None
        span = _address_range(parts[1], family) if parts and source else None
        if source and span:
            ranges.setdefault(source, []).append(span)
    return {
        source: sorted(
            ranges_to_cidrs(spans, family),
            key=lambda cidr: int(ipaddress.ip_network(cidr).network_address),
        )
        for source, spans in ranges.items()
    }


_PROTOCOL_NUMBERS = {6: Protocol.TCP, 17: Protocol.UDP, 132: Protocol.SCTP}


def _ports(elements: list[Any], family: Family) -> dict[str, tuple[PortRange, ...]]:
    """The elements of a ``port<f>`` set: source -> its port ranges, merged and sorted."""
    ranges: dict[str, list[PortRange]] = {}
    for element in elements:
        parts = _concatenation(element, 3)
        source = _canonical_address(parts[0], family) if parts else None
        if not parts or not source:
            continue
        protocol_value, ports = parts[1], parts[2]
        try:
            protocol = (
                _PROTOCOL_NUMBERS[protocol_value]
                if isinstance(protocol_value, int)
                else Protocol(protocol_value)
            )
            if isinstance(ports, dict) and "range" in ports:
                first, last = (int(port) for port in ports["range"])
            else:
                first = last = int(ports)
        except (KeyError, ValueError, TypeError):
            continue
        ranges.setdefault(source, []).append(PortRange(protocol, first, last))
    return {source: merge_port_ranges(found) for source, found in ranges.items()}


def _concatenation(element: Any, length: int) -> list[Any] | None:
    """The parts of a concatenated element (``{"concat": [...]}``), or None."""
    element = _element_value(element)
    parts = element.get("concat") if isinstance(element, dict) else None
    return parts if isinstance(parts, list) and len(parts) == length else None


def _family_of_set(name: str) -> Family:
    match = SLOT_SET_NAME.match(name)
    return FAMILY_OF_SUFFIX[match.group(1) if match else name[-1]]


def _element_value(element: Any) -> Any:
    # Elements with attributes (timeout, counter, comment) are listed as {"elem": {"val": ...}}.
    if isinstance(element, dict) and "elem" in element:
        return element["elem"].get("val")
    return element


def _canonical_address(value: Any, family: Family) -> str | None:
    return conntrack.canonical_ip(_element_value(value), family)


def _address_range(element: Any, family: Family) -> tuple[int, int] | None:
    element = _element_value(element)
    try:
        if isinstance(element, dict) and "prefix" in element:
            prefix = element["prefix"]
            network = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}")
            if network.version != family:
                return None
            return int(network.network_address), int(network.broadcast_address)
        if isinstance(element, dict) and "range" in element:
            start, end = (ipaddress.ip_address(a) for a in element["range"])
            if start.version != family or end.version != family:
                return None
            return int(start), int(end)
        address = ipaddress.ip_address(element)
    except (ValueError, TypeError, KeyError):
        return None
    return (int(address), int(address)) if address.version == family else None


def _map_entries(elements: list[Any]) -> list[tuple[Any, Any]]:
    pairs = []
    for element in elements:
        element = _element_value(element)
        if isinstance(element, list) and len(element) == 2:
            pairs.append((element[0], element[1]))
    return pairs


def differences(
    actual: ActualTable,
    desired: TableContent,
    fwmask: int,
    reject_with: str,
    baseline: Mapping[str, str],
) -> list[str]:
    """What differs between the listed table and the desired one (empty: nothing).

    Rules are compared by their comment tags, in order, and, where a tag's
    expression was recorded right after we wrote it (``baseline``), by
    expression too, which catches a rule edited in place.
    """
    problems: list[str] = []
    if actual.flags:
        problems.append(f"table has flags {actual.flags}")
    fwmarks = desired.fwmarks()
    sets = expected_sets(fwmarks)
    for name, spec in sets.items():
        if name not in actual.sets:
            problems.append(f"{spec.kind} {name} is missing")
        elif actual.sets[name] != spec:
            problems.append(f"{spec.kind} {name} is {actual.sets[name]}, want {spec}")
    problems += [f"unexpected set {name}" for name in actual.sets.keys() - sets.keys()]
    chains = {c.name: c for c in table_chains(fwmask, reject_with, fwmarks)}
    for name, chain in chains.items():
        if name not in actual.chains:
            problems.append(f"chain {name} is missing")
            continue
        want = (chain.type, chain.hook, chain.listed_priority, "accept" if chain.hook else None)
        if actual.chains[name] != want:
            problems.append(f"chain {name} is {actual.chains[name]}, want {want}")
        rules = actual.rules.get(name, [])
        if [comment for comment, _ in rules] != chain.rule_comments():
            problems.append(f"chain {name} holds other rules than ours")
            continue
        for comment, expression in rules:
            if comment is not None and comment in baseline and baseline[comment] != expression:
                problems.append(f"rule {comment} in chain {name} was modified")
    problems += [f"unexpected chain {name}" for name in actual.chains.keys() - chains.keys()]
    # Each set is compared on its own (the aggregate mark maps and the slot sets
    # included). A count that differs from the parsed elements means elements we could
    # not parse (or duplicates after canonicalisation): not ours, so recreate.
    for name, members in desired.element_sets().items():
        have = actual.set_members(name)
        if have != members or len(actual.elements.get(name, [])) != len(have):
            problems.append(f"set {name}: {len(have ^ members)} elements differ")
    for name, mapping in desired.element_maps().items():
        have_map = actual.map_members(name)
        if have_map != mapping or len(actual.elements.get(name, [])) != len(have_map):
            changed = {
                k for k in have_map.keys() | mapping.keys() if have_map.get(k) != mapping.get(k)
            }
            problems.append(f"map {name}: {len(changed)} elements differ")
    return problems


def read_table(nft: Nft) -> ActualTable | None:
    """The table as the kernel holds it, or None if it does not exist or cannot be read.

    Read in pieces: one terse listing (table, chains with their rules, set
    declarations, no elements), then one listing per set of ours. libnftables
    caches what a command needs: a listing of the whole table (or ``list
    tables``) builds every element of every set in its C heap at once, a set's
    listing only that set's, which keeps the process's peak lower. The
    listings are separate reads; a table that changes in between shows up as
    differing, and is recreated. The count sets (an element and a counter per
    treated source) are read over netlink instead (:mod:`.counters`): the same
    elements, in a third of the time and without libnftables's cache.
    """
    sock = NetfilterSocket()
    try:
        table = ActualTable.parse(nft.json(f"list table {QUALIFIED_TABLE}", terse=True))
        for name, spec in table.sets.items():
            if name[:-1] == "count" and name in STATIC_SETS:
                family = FAMILY_OF_SUFFIX[name[-1]]
                counted = read_counted_sources(sock, family)
                table.elements[name] = sorted(source_texts(counted, family))
            elif name in STATIC_SETS or SLOT_SET_NAME.match(name):
                listed = nft.json(f"list {spec.kind} {QUALIFIED_TABLE} {name}")
                table.elements[name] = ActualTable.parse(listed).elements.get(name, [])
                del listed
    except NftError as error:
        if "No such file or directory" not in str(error).split("\n", 1)[0]:
            # nft 1.0.6 writes broken JSON for some states (e.g. a dormant table);
            # an unreadable table is recreated like a missing one.
            log.warning("cannot read table %s: %s", QUALIFIED_TABLE, error)
        return None
    except OSError as error:
        log.warning("cannot read the count sets of table %s: %s", QUALIFIED_TABLE, error)
        return None
    finally:
        sock.close()
    return table
