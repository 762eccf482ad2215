"""Conntrack scoping: delete exactly the connection-tracking entries a firewall change outdates.

NAT is decided once per connection, on its first packet; the conntrack entry
then carries the binding for the connection's lifetime. When metaleg changes
how a pod IP's traffic is treated (its Service gets labelled while the pod has
long-running flows, the gateway moves, the LoadBalancer IP changes, ...), the
existing entries keep their old binding and bypass the new rules: a flow that
was masqueraded with the node IP keeps the node IP, a flow SNATed to the old LB
IP keeps it, a flow that got the null binding of a marked packet keeps the pod
IP even after the mark rule is gone (and then leaks the private address).
Deleting such an entry makes the flow's next packet create a new one that goes
through the current rules (TCP is picked up mid-stream, ``nf_conntrack_tcp_loose``).

Which entries (decisions, applied per flow ``(source, destination)``):

- A flow's *treatment* is the treatment of its original source (``Action``,
  ``snat_ip``, ``fwmark``), or none when the destination is excluded
  (``FIREWALL_EXCLUDE_DST_CIDRS``: metaleg never marks or NATs those) or the
  source is not metaleg's. An entry is deleted exactly when its flow's
  treatment differs between the old and the new state.
- So sources that *appear* are flushed (their flows were masqueraded by the
  node), and so are sources that *disappear* after being SNATed or marked
  (their SNAT to the LB IP, or their null binding, would otherwise outlive the
  rule). Any change of action, SNAT IP or mark counts, even mark to mark (the
  null binding would survive, but the brief of the project is "changed ->
  flushed", and a deleted entry costs the flow nothing).
- A Service's destination policy (``metaleg.de/destinationCIDRs`` and
  ``metaleg.de/destinationPorts``, :class:`DestinationPolicy`) is part of the
  treatment: a narrowing or widening outdates every flow of the Service's
  sources (but those to excluded destinations), whichever side of the policy
  a flow's destination is on. Deciding per flow would need the ports of every
  entry and gains little: a policy changes rarely, and a deleted entry costs
  the flow nothing.
- Transitions between no treatment and REJECT count as changes too, although
  REJECT is enforced per packet in the forward hook and a rejected flow never
  gets a confirmed entry: flushing them is harmless and keeps the rule simple.
- Flows to excluded destinations (pod-to-pod, pod-to-service traffic) are left
  alone unless the exclusion itself changed for them: metaleg never touched
  them, and deleting entries of in-cluster flows (often DNATed by kube-proxy)
  would only disturb them.
- Entries are matched on the ORIGINAL direction's source only: that is the pod
  for every flow metaleg treats. Flows that a remote host opened towards a pod
  (original source = remote host) are never touched.

Only the current network namespace is touched, over netlink; the ``conntrack``
binary is not needed. The entries are found with pyroute2's ``Conntrack`` dumps
(filtered in the kernel where that pays off, see :func:`_matching_tuples`) and
deleted in batches of hand-encoded requests, many per ``send``
(:mod:`metaleg.firewall.wire.conntrack`; one pyroute2 request per entry cost
~0.5 ms). Entries in a non-default conntrack zone are skipped (see
:func:`delete_outdated_entries`).

When the deletions run, and what happens when they fail, is decided in one place
for both firewall backends: :mod:`metaleg.firewall.flows`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from metaleg.firewall.wire.conntrack import ConntrackSocket, Entry
from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    NodeDesiredState,
    PortRange,
    ServiceEgress,
)

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Up to this many sources per family, the kernel filters the dump by source
# address (CTA_FILTER, Linux >= 5.8): one cheap dump per source (~15 ms with 20k
# entries, where decoding a full dump in Python takes over a second). Above it,
# one full dump filtered here is cheaper than many kernel table walks.
PER_SOURCE_DUMP_LIMIT = 64

# Every dump walks the kernel's whole conntrack hash, which is global to all
# namespaces (~10 ms even when this namespace holds nothing), and decoding one
# entry in Python costs roughly 1/100 of such a walk. So while the namespace
# holds at most this many entries per source that a per-source dump would look
# up, ONE unfiltered dump of both families (filtered here) is the cheaper way.
FULL_DUMP_ENTRIES_PER_SOURCE = 100

COUNT_PATH = "/proc/sys/net/netfilter/nf_conntrack_count"
"""Entries of the current network namespace (a per-namespace sysctl; the kernel counts an
entry from its allocation, before it is confirmed, until it is freed)."""

_SOCKET_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}


class DestinationPolicy(NamedTuple):
    """The destinations a Service's egress treatment applies to in one family; the empty
    policy (:data:`EVERY_DESTINATION`) covers every one."""

    cidrs: tuple[str, ...] = ()
    """``FamilyEgress.destinations``: canonical CIDRs of the family, sorted (empty: all)."""
    ports: tuple[PortRange, ...] = ()
    """``ServiceEgress.destination_ports``: sorted, merged (empty: every protocol and port)."""


EVERY_DESTINATION = DestinationPolicy()


class Treatment(NamedTuple):
    """How metaleg treats one source IP's egress in one family."""

    action: Action
    snat_ip: str | None = None
    fwmark: int | None = None
    policy: DestinationPolicy = EVERY_DESTINATION
    """Which destinations the action applies to (traffic to others takes the node's path)."""

    def without_policy(self) -> Treatment:
        """This treatment for every destination (what a source's elements in the
        backends' SNAT, mark and reject sets and maps stand for)."""
        if self.policy == EVERY_DESTINATION:
            return self
        return self._replace(policy=EVERY_DESTINATION)


def equal_but_for_policy(before: Treatment | None, after: Treatment | None) -> bool:
    """Whether two treatments (None: untreated) differ at most in their destination policy."""
    if before is None or after is None:
        return before is after
    return before.without_policy() == after.without_policy()


Treatments = dict[Family, dict[str, Treatment]]


class TreatmentError(ValueError):
    """A desired state that cannot be rendered; the message names the Service and field."""


def canonical_ip(value: object, family: Family) -> str | None:
    """``value`` in the kernel's canonical text form (``inet_ntop``), or None if it is not an
    address of ``family``.

    The C functions are ~50 times faster than ``ipaddress`` (this runs for every
    source of every snapshot), and their output is what nft's JSON listing and
    the conntrack dump print, so strings from all three compare directly. The
    result is interned: the backends keep an address in several indexes, built at
    different times, and would otherwise hold one copy of its text per index and
    per change that touched it.
    """
    if not isinstance(value, str):
        return None
    af = _SOCKET_FAMILY[family]
    try:
        return sys.intern(socket.inet_ntop(af, socket.inet_pton(af, value)))
    except (OSError, ValueError):
        return None


def _canonical_ip(value: str, family: Family, what: str) -> str:
    canonical = canonical_ip(value, family)
    if canonical is None:
        raise TreatmentError(f"{what}: {value!r} is not an IPv{int(family)} address")
    return canonical


def source_treatments(state: NodeDesiredState) -> Treatments:
    """The effective treatment of every source IP, per family (validated, canonical).

    The watcher already gives each source IP to one Service only (the first by
    namespace/name, see ``metaleg.watcher.desired``); should a state still
    hold one twice, the same rule applies here (the kernel can do only one
    thing with it). The firewall backend and the conntrack scoping use this
    one resolution.

    Raises :class:`TreatmentError` naming the Service when an entry is
    inconsistent (SNAT without an IP of its family, MARK without a mark inside
    ``fwmask``, a source or SNAT IP that is not an address of the family).
    """
    result: Treatments = {Family.IPV4: {}, Family.IPV6: {}}
    for service in state.services:
        for entry in service.families:
            table = result[entry.family]
            treatments = entry_treatments(
                service.key, entry, service.destination_ports, state.fwmask
            )
            for source, treatment in treatments:
                table.setdefault(source, treatment)
    walked_whole_state()
    return result


def walked_whole_state() -> None:
    """Tell the entry memo that every entry of the current state was just looked up.

    Entries that only older states used are dropped with the next call (see
    :class:`_EntryCache`); callers that walk a whole state through
    :func:`entry_treatments` themselves call this at the end.
    """
    _ENTRY_CACHE.rotate()


_EntryKey = tuple[str, FamilyEgress, tuple[PortRange, ...], int]
_EntryValue = tuple[tuple[str, Treatment], ...]


class _EntryCache:
    """Memo of :func:`compute_entry_treatments`, holding two generations.

    A snapshot repeats almost every entry of the previous one, and validating
    10,000 sources again for every one-IP change would make the cost of a change
    grow with the number of Services. An LRU cache of fixed size would either be
    too small for large clusters or, under churn, keep thousands of entries of
    states long gone (measured: the firewall process growing for minutes). So:
    a lookup moves an entry into the current generation; :func:`source_treatments`,
    after walking a whole state, drops the previous generation.
    """

    def __init__(self) -> None:
        self.current: dict[_EntryKey, _EntryValue] = {}
        self.previous: dict[_EntryKey, _EntryValue] = {}

    def get(
        self, key: str, entry: FamilyEgress, ports: tuple[PortRange, ...], fwmask: int
    ) -> _EntryValue:
        cache_key = (key, entry, ports, fwmask)
        value = self.current.get(cache_key)
        if value is None:
            value = self.previous.pop(cache_key, None)
            if value is None:
                value = compute_entry_treatments(key, entry, ports, fwmask)
            self.current[cache_key] = value
        return value

    def rotate(self) -> None:
        self.previous = self.current
        self.current = {}

    def forget(
        self, key: str, entry: FamilyEgress, ports: tuple[PortRange, ...], fwmask: int
    ) -> None:
        cache_key = (key, entry, ports, fwmask)
        self.current.pop(cache_key, None)
        self.previous.pop(cache_key, None)


_ENTRY_CACHE = _EntryCache()


def forget_entries(service: ServiceEgress, fwmask: int) -> None:
    """Drop a Service's entries from the entry memo: it changed (or went) in a step that
    did not walk the whole state. Until the next walk the memo would otherwise keep the
    old entries, and through them the old snapshot's objects, for every Service that
    changed (measured: the firewall process growing by ~2 MiB in the first minutes
    of churn at N=1000). The next walk computes what it needs again."""
    for entry in service.families:
        _ENTRY_CACHE.forget(service.key, entry, service.destination_ports, fwmask)


def entry_treatments(
    key: str, entry: FamilyEgress, ports: tuple[PortRange, ...], fwmask: int
) -> _EntryValue:
    """One Service entry's (source, treatment) pairs, validated and canonical (memoised,
    for walks over a whole state; see :func:`compute_entry_treatments` for single ones)."""
    return _ENTRY_CACHE.get(key, entry, ports, fwmask)


def compute_entry_treatments(
    key: str, entry: FamilyEgress, ports: tuple[PortRange, ...], fwmask: int
) -> _EntryValue:
    """One Service entry's (source, treatment) pairs, validated and canonical: service
    ``key``'s ``entry``, with the Service's destination ``ports`` (its
    ``destination_ports``) and the state's ``fwmask``. Raises :class:`TreatmentError`
    naming the Service and the field."""
    what = f"service {key} ({entry.action} IPv{int(entry.family)})"
    snat_ip: str | None = None
    fwmark: int | None = None
    if entry.action == Action.SNAT:
        if entry.snat_ip is None:
            raise TreatmentError(f"{what}: SNAT without snat_ip")
        snat_ip = _canonical_ip(entry.snat_ip, entry.family, f"{what} snat_ip")
    elif entry.action == Action.MARK:
        if entry.fwmark is None:
            raise TreatmentError(f"{what}: MARK without fwmark")
        if entry.fwmark & ~fwmask or not entry.fwmark & fwmask:
            raise TreatmentError(
                f"{what}: fwmark {entry.fwmark:#x} is not a non-zero value "
                f"inside FIREWALL_MASK {fwmask:#x}"
            )
        fwmark = entry.fwmark
    policy = EVERY_DESTINATION
    if entry.destinations or ports:
        policy = DestinationPolicy(entry.destinations, ports)
    treatment = Treatment(entry.action, snat_ip, fwmark, policy)
    return tuple(
        (_canonical_ip(raw, entry.family, f"{what} source"), treatment) for raw in entry.source_ips
    )


def collapse_cidrs(cidrs: Iterable[str], family: Family) -> tuple[IPNetwork, ...]:
    networks: list[Any] = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr, strict=False)
        if network.version == family:
            networks.append(network)
    return tuple(ipaddress.collapse_addresses(networks))


@dataclass(frozen=True)
class EgressView:
    """What conntrack scoping needs of one state: treatments and excluded destinations."""

    treatments: Treatments = field(default_factory=lambda: {Family.IPV4: {}, Family.IPV6: {}})
    exclude: Mapping[Family, tuple[IPNetwork, ...]] = field(
        default_factory=lambda: {Family.IPV4: (), Family.IPV6: ()}
    )

    @classmethod
    def of(cls, state: NodeDesiredState | None) -> EgressView:
        """The view of a desired state; ``None`` (nothing installed) treats nothing."""
        if state is None:
            return cls()
        return cls(
            source_treatments(state),
            {
                Family.IPV4: collapse_cidrs(state.exclude_dst_ipv4, Family.IPV4),
                Family.IPV6: collapse_cidrs(state.exclude_dst_ipv6, Family.IPV6),
            },
        )

    def flow_treatment(self, family: Family, source: str, destination: str) -> Treatment | None:
        """The treatment of a flow (``None``: metaleg leaves it alone), with its source's
        destination policy whether or not ``destination`` is inside it (see the module doc)."""
        treatment = self.treatments.get(family, {}).get(source)
        if treatment is None:
            return None
        address = ipaddress.ip_address(destination)
        if any(address in network for network in self.exclude.get(family, ())):
            return None
        return treatment


def changed_sources(old: EgressView, new: EgressView) -> dict[Family, set[str]]:
    """Sources some of whose flows change treatment between ``old`` and ``new``.

    A source qualifies when its own treatment changed, or, if the excluded
    destinations of its family changed, when it is treated in either state.
    """
    result: dict[Family, set[str]] = {}
    for family in Family:
        before = old.treatments.get(family, {})
        after = new.treatments.get(family, {})
        if old.exclude.get(family, ()) != new.exclude.get(family, ()):
            sources = set(before) | set(after)
        else:
            # Items (source, treatment) in one view only: set operations in C, not a
            # Python loop over every source of every snapshot.
            sources = {source for source, _ in before.items() ^ after.items()}
        result[family] = sources
    return result


@dataclass
class FlushPlan:
    """Sources to look at and the two views that decide, per entry, whether it goes."""

    sources: dict[Family, set[str]]
    old: EgressView
    new: EgressView

    @classmethod
    def between(cls, old: EgressView, new: EgressView) -> FlushPlan:
        return cls(changed_sources(old, new), old, new)

    def __bool__(self) -> bool:
        return any(self.sources.values())

    def wants(self, family: Family, source: str, destination: str) -> bool:
        """Whether an entry ``source -> destination`` (ORIGINAL direction) must be deleted."""
        if source not in self.sources.get(family, ()):
            return False
        return self.old.flow_treatment(family, source, destination) != self.new.flow_treatment(
            family, source, destination
        )

    def merged(self, later: FlushPlan) -> FlushPlan:
        """One plan covering a pending (failed) deletion and a newer one.

        The pending plan's views are from before; the later one's end state is
        what the kernel now holds. Going from ``self.old`` straight to
        ``later.new`` is not enough (a change and its undo would cancel out
        while entries created in between keep the intermediate binding), so
        every source of both plans is looked at, and an entry goes if either
        step changes its flow's treatment. Past :data:`MAX_MERGED_STEPS` steps
        (deletions failing again and again) the plan becomes every flow of its
        sources (:class:`AllFlowsOf`): it stays the size of its sources, and
        deleting more than needed costs the flows nothing.
        """
        sources = {
            family: self.sources.get(family, set()) | later.sources.get(family, set())
            for family in Family
        }
        steps = (*self.steps(), *later.steps())
        if len(steps) > MAX_MERGED_STEPS or any(isinstance(s, AllFlowsOf) for s in steps):
            return AllFlowsOf(sources, EgressView(), EgressView())
        return MergedPlan(sources, self.old, later.new, steps)

    def steps(self) -> tuple[FlushPlan, ...]:
        """The single steps this plan covers (itself, unless merged)."""
        return (self,)


MAX_MERGED_STEPS = 16
"""Steps a merged plan keeps apart before it becomes every flow of its sources."""


@dataclass
class MergedPlan(FlushPlan):
    """Successive steps' plans in one (see :meth:`FlushPlan.merged`): an entry goes when
    one of the steps changes its flow's treatment."""

    merged_steps: tuple[FlushPlan, ...] = ()

    def wants(self, family: Family, source: str, destination: str) -> bool:
        return any(step.wants(family, source, destination) for step in self.merged_steps)

    def steps(self) -> tuple[FlushPlan, ...]:
        return self.merged_steps


@dataclass
class AllFlowsOf(FlushPlan):
    """A plan that deletes every entry of its sources, whatever the destination (its
    views are not looked at)."""

    def wants(self, family: Family, source: str, destination: str) -> bool:
        return source in self.sources.get(family, ())


def _canonical(address: str, family: Family) -> str:
    return canonical_ip(address, family) or address


RACE_GRACE = 0.02
"""Seconds between the two passes of a deletion (see :func:`delete_outdated_entries`)."""

_SOURCE_ATTR = {Family.IPV4: "CTA_IP_V4_SRC", Family.IPV6: "CTA_IP_V6_SRC"}
_DESTINATION_ATTR = {Family.IPV4: "CTA_IP_V4_DST", Family.IPV6: "CTA_IP_V6_DST"}
_ICMP_ATTRS = {
    Family.IPV4: ("CTA_PROTO_ICMP_ID", "CTA_PROTO_ICMP_TYPE", "CTA_PROTO_ICMP_CODE"),
    Family.IPV6: ("CTA_PROTO_ICMPV6_ID", "CTA_PROTO_ICMPV6_TYPE", "CTA_PROTO_ICMPV6_CODE"),
}

_sockets: dict[Family, Any] = {}
_batcher = ConntrackSocket()
_sockets_pid = os.getpid()
_filter_broken: set[Family] = set()
_FAMILY_OF: dict[int, Family] = {socket.AF_INET: Family.IPV4, socket.AF_INET6: Family.IPV6}


def _socket(family: Family) -> Any:
    """This process's pyroute2 conntrack socket for ``family``, opened once (for the
    per-source filtered dumps; whole-table dumps go through :func:`_batch_socket`).

    Opening a pyroute2 socket costs far more than a dump of a few entries (it
    sets up an event loop and the netlink transport); a flush after every
    change must stay in the milliseconds.

    pyroute2 0.9's synchronous sockets run every call in an event loop; the
    conntrack socket (unlike ``IPRoute``, which sets the same flag in its
    constructor) creates and closes a new loop and transport per call unless
    told to keep them, and each round leaves ~150 bytes behind in the socket
    (the loop's id in a set, an ECONNRESET message queued by the closing
    transport, a banned sequence number): measured at N=1000 under churn, the
    firewall process grew ~1 MiB in 5 minutes. Kept, a dump leaves nothing.
    """
    _check_fork()
    ct = _sockets.get(family)
    if ct is None:
        from pyroute2 import Conntrack

        ct = _sockets[family] = Conntrack(nfgen_family=_SOCKET_FAMILY[family])
        ct.asyncore.local.keep_event_loop = True
    return ct


def _check_fork() -> None:
    global _sockets_pid, _batcher
    if _sockets_pid != os.getpid():
        # Forked: the inherited sockets belong to the parent (maybe another namespace).
        _sockets.clear()
        _batcher = ConntrackSocket()
        _sockets_pid = os.getpid()


def _batch_socket() -> ConntrackSocket:
    """This process's socket for whole-table dumps and batched deletions (opened on first
    use)."""
    _check_fork()
    return _batcher


def _forget_socket(family: Family) -> None:
    ct = _sockets.pop(family, None)
    if ct is not None:
        with contextlib.suppress(Exception):
            ct.close()


def entry_count() -> int | None:
    """How many conntrack entries the current namespace holds (None: cannot tell).

    Reading the sysctl costs microseconds where a dump costs a walk of the
    kernel's whole hash. The count includes entries not yet confirmed (the
    kernel counts an entry from its allocation), so 0 means nothing to find.
    """
    try:
        with open(COUNT_PATH, "rb") as file:
            return int(file.read())
    except (OSError, ValueError):
        return None


def _matching_tuples(
    sources: Mapping[Family, set[str]], count: int | None = None
) -> dict[Family, list[Entry]]:
    """ORIGINAL tuples of the entries whose source is in ``sources``, per family (addresses
    canonical); ``count`` is :func:`entry_count` (it picks the cheaper dumps).

    Entries in a non-default zone (``CTA_ZONE``) are left out: a delete request
    without a zone looks the tuple up in the default zone, so deleting them
    never worked (and an entry of the default zone with the same tuple is dumped,
    and deleted, on its own). An entry whose zone applies to its ORIGINAL
    direction only (``CTA_TUPLE_ZONE``, not decoded) is not found by
    its delete request either, which counts as "gone already".
    """
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    wanted = {family: members for family, members in sources.items() if members}
    result: dict[Family, list[Entry]] = {family: [] for family in wanted}

    def keep(family: Family, message: Any) -> None:
        orig = message.get_attr("CTA_TUPLE_ORIG")
        ip = orig.get_attr("CTA_TUPLE_IP")
        source = _canonical(ip.get_attr(_SOURCE_ATTR[family]), family)
        if source not in wanted[family] or message.get_attr("CTA_ZONE"):
            return
        proto = orig.get_attr("CTA_TUPLE_PROTO")
        icmp_id, icmp_type, icmp_code = _ICMP_ATTRS[family]
        result[family].append(
            Entry(
                _SOCKET_FAMILY[family],
                source,
                _canonical(ip.get_attr(_DESTINATION_ATTR[family]), family),
                proto.get_attr("CTA_PROTO_NUM"),
                proto.get_attr("CTA_PROTO_SRC_PORT"),
                proto.get_attr("CTA_PROTO_DST_PORT"),
                proto.get_attr(icmp_id),
                proto.get_attr(icmp_type),
                proto.get_attr(icmp_code),
            )
        )

    # Each dump is read to the end before anything is deleted: deleting on a
    # socket that is still streaming a dump would interleave the replies.
    # Every dump walks the kernel's whole conntrack hash (~10 ms even when empty), so
    # the fewer dumps the better. IPv4 source filters work (Linux >= 5.8; an older
    # kernel ignores them and returns the whole table, which keep() filters just the
    # same); they pay off only when the namespace holds many entries (see
    # FULL_DUMP_ENTRIES_PER_SOURCE; an unknown count counts as many). IPv6 filters
    # were measured to match the *opposite* set on Linux 6.18, so IPv6 always takes an
    # unfiltered dump. A filter seen returning a foreign source is distrusted from then on.
    v4 = wanted.get(Family.IPV4, set())
    per_source = (
        0 < len(v4) <= PER_SOURCE_DUMP_LIMIT
        and Family.IPV4 not in _filter_broken
        and (count is None or count > FULL_DUMP_ENTRIES_PER_SOURCE * len(v4))
    )
    unfiltered = [family for family in wanted if not (per_source and family == Family.IPV4)]
    if per_source:
        ct = _socket(Family.IPV4)
        af = _SOCKET_FAMILY[Family.IPV4]
        for source in sorted(v4):
            for message in ct.dump(tuple_orig=NFCTAttrTuple(family=af, saddr=source)):
                orig = message.get_attr("CTA_TUPLE_ORIG")
                seen = orig.get_attr("CTA_TUPLE_IP").get_attr(_SOURCE_ATTR[Family.IPV4])
                if _canonical(seen, Family.IPV4) != source:
                    _filter_broken.add(Family.IPV4)
                keep(Family.IPV4, message)  # checked here too: the filter is the kernel's
    # Whole-table dumps are decoded by metaleg.firewall.wire.conntrack (the ORIGINAL tuple and the
    # zone only; pyroute2 decoded every attribute of every entry, ~0.1 ms each); both
    # families take one walk of the kernel's table (AF_UNSPEC dumps every family).
    if unfiltered:
        af = _SOCKET_FAMILY[unfiltered[0]] if len(unfiltered) == 1 else socket.AF_UNSPEC
        for dumped in _batch_socket().dump(af):
            of = _FAMILY_OF.get(dumped.entry.family)
            if of in unfiltered and not dumped.zoned and dumped.entry.source in wanted[of]:
                result[of].append(dumped.entry)
    return result


def _delete_once(plan: FlushPlan) -> int:
    if not plan:
        return 0
    # Read at every pass (never carried over from an earlier one): 0 means the
    # namespace holds no entry at all, not even an unconfirmed one.
    count = entry_count()
    if count == 0:
        return 0
    sources = {
        family: {_canonical(s, family) for s in plan.sources.get(family, ())} for family in Family
    }
    try:
        matching = _matching_tuples(sources, count)
        wants = plan.wants
        doomed = [
            entry
            for family, entries in matching.items()
            for entry in entries
            if wants(family, entry.source, entry.destination)
        ]
        # Both families in one batch (each request names its family); ENOENT (gone
        # meanwhile) counts as not deleted, any other refusal raises OSError.
        return _batch_socket().delete(doomed)
    except Exception:
        # Fresh sockets next time, whatever state these are in.
        for family in Family:
            _forget_socket(family)
        _batch_socket().close()
        raise


def delete_outdated_entries(plan: FlushPlan) -> int:
    """Delete the entries ``plan`` wants deleted in the current namespace; return how many.

    Entries that vanish meanwhile (expired, deleted by someone else) are
    skipped, and so are entries in a non-default conntrack zone (not pod
    traffic; deleting them would need the zone). The deletions go in batches
    (:mod:`metaleg.firewall.wire.conntrack`). Raises ``OSError`` (naming the
    entry when the kernel refuses one) when the conntrack interface fails
    otherwise; nothing outside the plan is ever deleted.
    """
    deleted = _delete_once(plan)
    if deleted:
        # A flow whose packet was still on its way through the hooks while we
        # deleted gets its conntrack entry confirmed just after, with the old
        # binding; a busy UDP flow would keep it alive (and dropped by the egress
        # check) for ever. One more pass a moment later catches such entries.
        time.sleep(RACE_GRACE)
        deleted += _delete_once(plan)
    if deleted:
        log.info("deleted conntrack entries of changed sources", extra={"entries": deleted})
    return deleted
