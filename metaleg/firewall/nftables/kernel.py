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
from metaleg.firewall.nftables.content import TableContent, mark_literal, ranges_to_cidrs
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
from metaleg.model import Family

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
                    table.sets[obj["name"]] = SetSpec(
                        kind,
                        str(obj.get("type")),
                        obj.get("map"),
                        tuple([flags] if isinstance(flags, str) else flags),
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
        the interval sets, addresses for the others."""
        family = _family_of_set(name)
        elements = self.elements.get(name, [])
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

    def content(self) -> TableContent:
        """The set and map elements, canonical (unparseable elements are skipped); the
        marks as the slot sets hold them (what sets the mark)."""
        content = TableContent()
        for family in Family:
            s = SUFFIX[family]
            content.exclude[family] = self.set_members(f"exclude{s}")
            content.reject[family] = self.set_members(f"reject{s}")
            content.transit[family] = self.set_members(f"transit{s}")
            content.snat[family].update(self.map_members(f"snat{s}"))
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
    differing, and is recreated.
    """
    try:
        table = ActualTable.parse(nft.json(f"list table {QUALIFIED_TABLE}", terse=True))
        for name, spec in table.sets.items():
            if name in STATIC_SETS or SLOT_SET_NAME.match(name):
                listed = nft.json(f"list {spec.kind} {QUALIFIED_TABLE} {name}")
                table.elements[name] = ActualTable.parse(listed).elements.get(name, [])
                del listed
    except NftError as error:
        if "No such file or directory" not in str(error).split("\n", 1)[0]:
            # nft 1.0.6 writes broken JSON for some states (e.g. a dormant table);
            # an unreadable table is recreated like a missing one.
            log.warning("cannot read table %s: %s", QUALIFIED_TABLE, error)
        return None
    return table
