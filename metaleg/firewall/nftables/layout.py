"""The table's layout: its sets, maps and chains, and the static rules.

Layout (``table inet metaleg``; IPv4 and IPv6 in one table), in the style of
kube-proxy's nftables mode: the rules never change with the Services, only the
elements of the sets and maps they look up do, so N Services cost O(1) rules
(plus two rules and two sets per gateway slot in use)::

    set exclude4/exclude6  (interval)   FIREWALL_EXCLUDE_DST_CIDRS
    map snat4/snat6        source -> LoadBalancer IP        (this node is the gateway)
    map mark4/mark6        source -> mark                   (another node is the gateway)
    set mark4_<mark>/mark6_<mark>  sources of one gateway slot  (<mark>: 8 hex digits)
    set reject4/reject6    sources                          (gateway unknown: fail closed)
    set transit4/transit6  (interval)   other nodes' pods   (the transit guard)
    set policed_dst4/6     sources whose Service names destination CIDRs
    set dst4/dst6          (interval)   source . destination CIDR
    set policed_port4/6    sources whose Service names destination ports
    set port4/port6        (interval)   source . protocol . port range
    set count4/count6      (counter)    every treated source, a counter each

    chain fwmark       regular, per slot in use and family:
        saddr @mark<f>_<mark> meta mark set meta mark & ~fwmask | <mark>
    chain prerouting   filter/prerouting  priority mangle - 10:
        daddr @exclude return; uncovered return; saddr @mark jump fwmark
    chain postrouting  nat/postrouting    priority srcnat - 10:
        daddr @exclude return;
        meta mark & fwmask != 0 snat to saddr      (null binding, see below)
        uncovered return; snat to saddr map @snat
    chain stray_reply  regular: uncovered (seen from the reply) return;
        daddr a key of @snat/@mark/@reject, saddr not @exclude: drop
    chain forward      filter/forward     priority filter - 10:
        new, not DNATed: jump stray_reply;
        daddr @exclude return;
        ct state new saddr @transit meta mark & fwmask == 0 saddr != @snat reject ...
        uncovered return; saddr @count; saddr @reject reject with icmpx admin-prohibited
    chain egress       filter/postrouting priority srcnat + 10 (after all NAT):
        daddr @exclude return; unmarked and a source of @transit: drop;
        uncovered return; unmarked and still a source of @snat or @mark: drop

    uncovered return (per family, :func:`uncovered_returns`):
        saddr @policed_dst saddr . daddr != @dst return
        saddr @policed_port saddr . meta l4proto . th dport != @port return

The destination policy (``metaleg.de/destinationCIDRs`` and
``metaleg.de/destinationPorts``, carried per source by its treatment's
:class:`~metaleg.firewall.conntrack.DestinationPolicy`): only a source's traffic
to its Service's CIDRs and ports is treated. Traffic it does not cover leaves
each base chain by the two "uncovered" returns before any treatment, so it is
neither marked, null-bound, SNATed, counted nor rejected, nor dropped by the
egress check, and follows the node's path as if the Service were not labelled;
the excluded destinations return first, so FIREWALL_EXCLUDE_DST_CIDRS still wins.
O(1) in the Services: two lookups of a plain set per family for every packet,
and the concatenated lookup only for the policed sources' packets. The sets of
policed sources keep the others (most sources: a Service without a policy)
out of the concatenated interval sets (``pipapo``, kernel >= 5.6), whose updates
cost more than a hash set's; ``th dport`` with ``meta l4proto`` covers TCP, UDP
and SCTP, and other protocols (ICMP) of a source with ports are never covered.
Where the decisions are taken: prerouting on the destination before any DNAT,
postrouting and forward after it; postrouting null-binds what prerouting marked
before it looks at the policy, so a marked packet is never masqueraded. The
stray-reply check looks at the policy from the reply's side (the pod is its
destination, the peer its source and the peer's port its source port), so a
peer the policy leaves to the node may open connections to the pod like to any
other pod. The transit guard and the transit part of the egress check come
before the policy: other nodes' pods that reach this node unmarked are not this
node's to let pass.

Counting (:mod:`.counters`): the set ``count<f>`` holds every treated source with
a counter; the one lookup in ``forward``, after the policy's returns and before
the reject, counts each treated packet (SNATed here, marked towards another
gateway, or rejected) in its source's element. The backend sums the elements per
Service, family and action. Transit guard rejects are not counted per Service:
the guard's set holds other nodes' pod CIDRs, not Services.

The transit guard (a rule of ``forward``, see
:attr:`~metaleg.model.NodeDesiredState.transit_guard_ipv4`): a *new* forwarded
connection from another node's pod to a non-excluded destination is rejected
unless this node marks it (prerouting ran before, so the mark is set) or SNATs
it (its source is a key of the SNAT map: nft looks a map up as a set, so no
parallel set is needed). Only ``ct state new`` is checked, so flows that were
established before a source entered the guard go on; the guard therefore needs
no conntrack flush of its own (:mod:`metaleg.firewall.conntrack` is unchanged).

Stray replies: when the gateway moves, the old gateway still holds the flow's
SNAT binding for a moment and forwards the peer's answers, translated back to
the pod IP, to the pod's node. If that node has just deleted the flow's
conntrack entry (its treatment changed), such an answer creates a *new* entry
with the peer as originator; the pod's own packets then match it in the reply
direction, where no NAT is ever decided, and would leave with the pod IP for as
long as the flow lives (UDP streams refresh it forever). So the forward chain
drops new connections to our sources that are not DNATed (traffic into the
Service through its LB IP, NodePorts or ClusterIPs is) and come from outside
the excluded networks (cluster traffic does not); dropped, the entry is never
confirmed, and the pod's next packet opens a correct one. The egress check
covers both directions for the same reason.

Why these priorities: each base chain runs just before the hook's iptables
chains (legacy or nft: mangle -150, srcnat 100, filter 0). NAT is decided by the
first NAT chain at the hook that creates a binding, across tables and across
legacy/nft; an ``accept``/``return`` does not stop later tables. So a marked
packet gets a *null binding* here (SNAT to its own source address): it keeps the
pod IP, and the node's masquerade (kube-router/kube-proxy, either mode) no longer
applies to it; on the gateway node the SNAT map binds the LB IP first.

Setting the mark: nft 1.0.6 cannot take the right hand side of
``meta mark & ~mask |`` from a map (it must be constant), and overwriting the
whole mark would clobber bits outside FIREWALL_MASK that other components use.
So each gateway slot (a mark in use) has one plain set per family and one rule
per family in ``fwmark`` with its mark as the constant; sources move between
slots as set elements. There is no verdict map: adding a ``jump`` element to a
verdict map makes nf_tables validate the whole table, looping over every element
of every verdict map, so a change cost more the more sources the table held (nft
1.0.6, 10,000 sources per family: 1.25 ms per added element against 0.14 ms for a
plain set element and its map entry). Plain set and data map elements trigger no
validation.

Which sources are marked at all, one lookup: the aggregate maps ``mark4`` /
``mark6`` (source -> mark, kept alongside the slot sets in the same transaction),
rather than per-slot rules in ``forward`` and ``egress``. ``forward`` sees every
forwarded packet and ``egress`` every outgoing one; per-slot rules there would
cost up to two lookups per slot and family for each packet and would make those
chains change with the slots. With the aggregate, they stay static, and
prerouting sends only marked sources' packets through ``fwmark``; everything
else pays one lookup per family whatever the number of slots. A map rather than
a plain set: it lists which mark each source gets in one place (``nft list map
inet metaleg mark4``), for one more element change per moved source. Rules that
refer to the aggregate are never rewritten incrementally: adding a rule that
refers to a map costs time in its number of elements (0.4 ms at 10,000), while
``fwmark``'s rules refer only to slot sets.

Every rule carries a comment ``metaleg:<hash of chain and rule text>``
(:func:`rule_comment`), so that a re-sync can tell our rules (in order) from
edited, removed or foreign ones.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from typing import NamedTuple

from metaleg.model import Family

FAMILY = "inet"
TABLE = "metaleg"
QUALIFIED_TABLE = f"{FAMILY} {TABLE}"

REJECT_WITH = (
    "icmpx admin-prohibited",
    "icmpx port-unreachable",
    "icmpx host-unreachable",
    "icmpx no-route",
)
"""Allowed ``reject with`` arguments (icmpx works for both families in an inet table)."""

SUFFIX = {Family.IPV4: "4", Family.IPV6: "6"}
"""The suffix of a family's sets and maps (``snat4``, ``snat6``)."""
FAMILY_OF_SUFFIX = {"4": Family.IPV4, "6": Family.IPV6}
IP_KEYWORD = {Family.IPV4: "ip", Family.IPV6: "ip6"}
"""nft's protocol keyword for a family's addresses (``ip saddr``, ``ip6 saddr``)."""
ADDRESS_TYPE = {Family.IPV4: "ipv4_addr", Family.IPV6: "ipv6_addr"}
"""nft's element type for a family's addresses."""
SLOT_SET_NAME = re.compile(r"^mark([46])_([0-9a-f]{8})$")
"""The name of a gateway slot's set (:func:`slot_set_name`): family suffix, mark."""
PORT_KEY = "inet_proto . inet_service"
"""The protocol and port part of a ``port<f>`` element's type (``tcp . 25``)."""
MARK_CHAIN = "fwmark"
"""The regular chain that sets the mark, one rule per gateway slot and family ("mark" is an
nft keyword)."""


class SetSpec(NamedTuple):
    """A set or map of the table as nft lists it."""

    kind: str  # "set" or "map"
    type: str
    map: str | None
    flags: tuple[str, ...]
    counter: bool = False
    """Every element has a counter (counting the packets a lookup finds it for)."""

    def declaration(self, name: str) -> str:
        type_ = f"{self.type} : {self.map}" if self.map else self.type
        flags = f" flags {', '.join(self.flags)};" if self.flags else ""
        counter = " counter;" if self.counter else ""
        return f"add {self.kind} {QUALIFIED_TABLE} {name} {{ type {type_};{flags}{counter} }}"


STATIC_SETS: dict[str, SetSpec] = {}
for _family in Family:
    _s, _a = SUFFIX[_family], ADDRESS_TYPE[_family]
    STATIC_SETS[f"exclude{_s}"] = SetSpec("set", _a, None, ("interval",))
    STATIC_SETS[f"snat{_s}"] = SetSpec("map", _a, _a, ())
    STATIC_SETS[f"mark{_s}"] = SetSpec("map", _a, "mark", ())
    STATIC_SETS[f"reject{_s}"] = SetSpec("set", _a, None, ())
    STATIC_SETS[f"transit{_s}"] = SetSpec("set", _a, None, ("interval",))
    STATIC_SETS[f"policed_dst{_s}"] = SetSpec("set", _a, None, ())
    STATIC_SETS[f"dst{_s}"] = SetSpec("set", f"{_a} . {_a}", None, ("interval",))
    STATIC_SETS[f"policed_port{_s}"] = SetSpec("set", _a, None, ())
    STATIC_SETS[f"port{_s}"] = SetSpec("set", f"{_a} . {PORT_KEY}", None, ("interval",))
    STATIC_SETS[f"count{_s}"] = SetSpec("set", _a, None, (), counter=True)


class ChainSpec(NamedTuple):
    """A chain of the table: a base chain (with hook) or a regular one, and its rules."""

    name: str
    type: str | None
    hook: str | None
    priority: str | None
    """The priority as written (nft syntax)."""
    listed_priority: int | None
    """The priority as nft lists it (numeric)."""
    rules: tuple[str, ...]

    def declaration(self) -> str:
        if self.hook is None:
            return f"add chain {QUALIFIED_TABLE} {self.name}"
        return (
            f"add chain {QUALIFIED_TABLE} {self.name} {{ type {self.type} hook {self.hook} "
            f"priority {self.priority}; policy accept; }}"
        )

    def rule_commands(self) -> list[str]:
        return [
            f'add rule {QUALIFIED_TABLE} {self.name} {rule} comment "{rule_comment(self.name, rule)}"'
            for rule in self.rules
        ]

    def rule_comments(self) -> list[str]:
        return [rule_comment(self.name, rule) for rule in self.rules]


def rule_comment(chain: str, rule: str) -> str:
    """The tag of a rule: changes whenever the rule's text (or its chain) does."""
    digest = hashlib.sha256(f"{chain}\n{rule}".encode()).hexdigest()[:16]
    return f"metaleg:{digest}"


@functools.lru_cache(maxsize=1024)
def slot_set_name(family: Family, fwmark: int) -> str:
    """``mark4_00100000``: the plain set of one gateway slot's sources of one family."""
    return f"mark{SUFFIX[family]}_{fwmark:08x}"


def slot_sets(fwmarks: Iterable[int]) -> dict[str, SetSpec]:
    """The per-slot sets of ``fwmarks`` (both families each, in :func:`set_order`)."""
    return {
        slot_set_name(f, m): SetSpec("set", ADDRESS_TYPE[f], None, ())
        for m in sorted(fwmarks)
        for f in Family
    }


def expected_sets(fwmarks: Iterable[int]) -> dict[str, SetSpec]:
    """Every set and map of the table when ``fwmarks`` are the gateway slots in use."""
    return {**STATIC_SETS, **slot_sets(fwmarks)}


def set_order(fwmarks: Iterable[int]) -> list[str]:
    """The order in which scripts touch the sets' elements (the full and the incremental
    path write the same transaction, command for command)."""
    plain = ("exclude", "reject", "transit", "policed_dst", "dst", "policed_port", "port", "count")
    order = [f"{kind}{SUFFIX[f]}" for f in Family for kind in plain]
    order += [f"{kind}{SUFFIX[f]}" for f in Family for kind in ("snat", "mark")]
    order += [slot_set_name(f, m) for m in sorted(fwmarks) for f in Family]
    return order


def mark_chain(fwmarks: Iterable[int], fwmask: int) -> ChainSpec:
    """The chain ``fwmark``: per gateway slot and family, sources of the slot's set get the
    slot's mark; bits outside ``fwmask`` are kept (nft 1.0.6 cannot take the right hand
    side of ``|`` from a map, hence one rule and one set per slot)."""
    keep = ~fwmask & 0xFFFFFFFF
    rules = tuple(
        f"{IP_KEYWORD[f]} saddr @{slot_set_name(f, m)} meta mark set meta mark & {keep:#010x} | {m:#010x}"
        for m in sorted(fwmarks)
        for f in Family
    )
    return ChainSpec(MARK_CHAIN, None, None, None, None, rules)


def table_chains(fwmask: int, reject_with: str, fwmarks: Iterable[int]) -> tuple[ChainSpec, ...]:
    """Every chain of the table, jump targets first (the order of :func:`full_script`)."""
    return (mark_chain(fwmarks, fwmask), _stray_reply(), *base_chains(fwmask, reject_with))


def base_chains(fwmask: int, reject_with: str) -> tuple[ChainSpec, ...]:
    """The four static base chains; their rules depend only on the mask and reject type."""
    mask = f"{fwmask:#010x}"
    excludes = tuple(f"{IP_KEYWORD[f]} daddr @exclude{SUFFIX[f]} return" for f in Family)
    uncovered = tuple(rule for f in Family for rule in uncovered_returns(f))
    return (
        _prerouting(excludes, uncovered),
        _postrouting(excludes, uncovered, mask),
        _forward(excludes, uncovered, mask, reject_with),
        _egress(excludes, uncovered, mask),
    )


def uncovered_returns(family: Family, *, reply: bool = False) -> tuple[str, str]:
    """The destination policy: a packet of a source whose Service names destination CIDRs
    (ports) leaves metaleg's chain when its destination (protocol and port) is not one of
    them for that source. ``reply``: the packet is addressed *to* the source (the
    stray-reply check), so the source is its destination and the peer's port its source
    port."""
    k, s = IP_KEYWORD[family], SUFFIX[family]
    source, peer, port = ("daddr", "saddr", "sport") if reply else ("saddr", "daddr", "dport")
    return (
        f"{k} {source} @policed_dst{s} {k} {source} . {k} {peer} != @dst{s} return",
        f"{k} {source} @policed_port{s} {k} {source} . meta l4proto . th {port} != @port{s} return",
    )


def _prerouting(excludes: tuple[str, ...], uncovered: tuple[str, ...]) -> ChainSpec:
    """Marks the sources of other nodes' gateways (through ``fwmark``)."""
    # Only sources of the aggregate map go through the per-slot rules: other
    # packets pay one lookup per family, whatever the number of slots.
    jumps = tuple(f"{IP_KEYWORD[f]} saddr @mark{SUFFIX[f]} jump {MARK_CHAIN}" for f in Family)
    return ChainSpec(
        "prerouting", "filter", "prerouting", "mangle - 10", -160, (*excludes, *uncovered, *jumps)
    )


def _postrouting(excludes: tuple[str, ...], uncovered: tuple[str, ...], mask: str) -> ChainSpec:
    """SNATs this node's gateway sources to their LB IP, and null-binds marked packets."""
    # The null binding: marked packets keep their source, and no later NAT chain
    # (the node's masquerade) gets to bind them. Before the destination policy: what
    # prerouting marked (it saw the destination before any DNAT) is bound alike.
    null_bindings = tuple(
        f"meta nfproto ipv{int(f)} meta mark & {mask} != 0 "
        f"snat {IP_KEYWORD[f]} to {IP_KEYWORD[f]} saddr"
        for f in Family
    )
    snat = tuple(
        f"snat {IP_KEYWORD[f]} to {IP_KEYWORD[f]} saddr map @snat{SUFFIX[f]}" for f in Family
    )
    return ChainSpec(
        "postrouting",
        "nat",
        "postrouting",
        "srcnat - 10",
        90,
        (*excludes, *null_bindings, *uncovered, *snat),
    )


STRAY_CHAIN = "stray_reply"
"""The regular chain of the stray-reply check (see the module doc, "Stray replies")."""


def _stray_reply() -> ChainSpec:
    """Drops a new, not DNATed connection *to* one of our sources from outside the excluded
    networks, unless the destination policy leaves that peer (port) untreated: the
    source's own traffic to it follows the node's path, so its answers may too."""
    reply_uncovered = tuple(rule for f in Family for rule in uncovered_returns(f, reply=True))
    drops = tuple(
        f"{IP_KEYWORD[f]} daddr @{name}{SUFFIX[f]} {IP_KEYWORD[f]} saddr != @exclude{SUFFIX[f]} drop"
        for f in Family
        for name in ("snat", "mark", "reject")
    )
    return ChainSpec(STRAY_CHAIN, None, None, None, None, (*reply_uncovered, *drops))


def _forward(
    excludes: tuple[str, ...], uncovered: tuple[str, ...], mask: str, reject_with: str
) -> ChainSpec:
    """Drops stray replies, guards transit, counts the treated traffic per Service and
    rejects sources without a gateway."""
    # Stray replies: only new connections that were not DNATed go through the check
    # (a regular chain, so that its returns come back here).
    stray = (f"ct state new ct status ! dnat jump {STRAY_CHAIN}",)
    # The transit guard, before the destination policy (other nodes' pods that reach
    # this node unmarked are never ours to let pass): cheapest tests first (most
    # forwarded packets are not new; the SNAT map is looked up as a set of its keys).
    guard = tuple(
        f"ct state new {IP_KEYWORD[f]} saddr @transit{SUFFIX[f]} meta mark & {mask} == 0 "
        f"{IP_KEYWORD[f]} saddr != @snat{SUFFIX[f]} reject with {reject_with}"
        for f in Family
    )
    # Every treated packet, once: the lookup counts it in its source's element (the set
    # has per-element counters; the rule has no statement).
    count = tuple(f"{IP_KEYWORD[f]} saddr @count{SUFFIX[f]}" for f in Family)
    reject = tuple(
        f"{IP_KEYWORD[f]} saddr @reject{SUFFIX[f]} reject with {reject_with}" for f in Family
    )
    return ChainSpec(
        "forward",
        "filter",
        "forward",
        "filter - 10",
        -10,
        (*stray, *excludes, *guard, *uncovered, *count, *reject),
    )


def _egress(excludes: tuple[str, ...], uncovered: tuple[str, ...], mask: str) -> ChainSpec:
    """The egress check, after every NAT chain has run: what leaves here with a pod IP of
    ours (or another node's) and no mark did not get the translation it should have.

    That happens when a flow's conntrack entry still carries the binding of its old
    treatment (a null binding from when the source was marked, say) in the moment
    between a transaction and the conntrack flush that follows it. Drop: fail closed,
    never out with a pod IP. Replies are checked too: a reply leaves with the pod IP
    only if the connection was opened *to* the pod IP from outside the excluded
    networks, which the forward chain refuses (stray replies) and metaleg must not let
    out. Traffic the destination policy leaves untreated is not checked (it follows
    the node's path), except other nodes' pods (the transit sources), checked first.
    """
    transit, ours = (
        tuple(
            f"meta mark & {mask} == 0 {IP_KEYWORD[f]} saddr @{name}{SUFFIX[f]} drop"
            for name in names
            for f in Family
        )
        for names in (("transit",), ("snat", "mark"))
    )
    return ChainSpec(
        "egress",
        "filter",
        "postrouting",
        "srcnat + 10",
        110,
        (*excludes, *transit, *uncovered, *ours),
    )
