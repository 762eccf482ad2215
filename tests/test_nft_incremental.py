"""The nftables backend's incremental path: a change costs what it changes, and its result
is exactly the full render's (table content, transaction and conntrack scoping)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaleg.backend import BackendError
from metaleg.firewall import claims as source_claims
from metaleg.firewall import conntrack
from metaleg.firewall.conntrack import FlushPlan, TreatmentError
from metaleg.firewall.nftables.backend import NftablesBackend
from metaleg.firewall.nftables.content import (
    CountKey,
    TableContent,
    canonical_policy,
    exclude_prefixes,
    transit_prefixes,
)
from metaleg.firewall.nftables.incremental import AppliedTable
from metaleg.firewall.nftables.kernel import ActualTable
from metaleg.firewall.nftables.scripts import diff_script
from metaleg.firewall.selection import ManagedFirewall
from metaleg.model import Action, Family, FamilyEgress, NodeDesiredState, Role, ServiceEgress
from tests.netns import namespace, run_in_netns
from tests.test_conntrack import flows_in, insert_flows

MASK = 0x00F00000
EXCLUDE4 = ("10.0.0.0/8",)
EXCLUDE6 = ("fc00::/7",)
# "a-b" sorts before "a/" as a string but after "a" as a (namespace, name) tuple.
KEYS = [(ns, name) for ns in ("a", "a-b", "b") for name in ("x", "y", "z")]
SOURCES = {
    Family.IPV4: ["10.244.1.1", "10.244.1.2", "10.244.1.3", "10.244.2.1", "10.244.2.2"],
    # Two spellings of one address: canonicalisation makes them one source.
    Family.IPV6: ["fd00:1::1", "fd00:1:0::1", "fd00:1::2", "fd00:1::3"],
}
SNAT_IPS = {Family.IPV4: ["192.0.2.1", "192.0.2.2"], Family.IPV6: ["2001:db8::1"]}
TRANSIT = {
    Family.IPV4: ["10.250.0.0/24", "10.250.1.0/24", "10.250.0.7/32", "10.251.0.0/16"],
    Family.IPV6: ["fd00:9::/64", "fd00:9:0:1::/64", "fd00:9::5/128"],
}
DESTINATIONS = {
    Family.IPV4: ["198.51.100.1", "10.1.1.1"],
    Family.IPV6: ["2001:db8:9::1", "fd00:5::1"],
}


def reference_content(state: NodeDesiredState) -> TableContent:
    """The table content of ``state`` rendered independently of :class:`AppliedTable`: the
    sources resolved by :func:`conntrack.source_treatments` (as the conntrack scoping and
    the iptables backend resolve them). Raises :class:`BackendError` like the backend."""
    try:
        treatments = conntrack.source_treatments(state)
    except TreatmentError as error:
        raise BackendError(f"nftables: {error}") from error
    content = TableContent(
        exclude=exclude_prefixes(state),
        transit={f: prefixes for f, prefixes in transit_prefixes(state).items()},
    )
    # The Service that owns each source: the first in the state's order that names it.
    owners: dict[Family, dict[str, tuple[str, str]]] = {f: {} for f in Family}
    for service in state.services:
        for entry in service.families:
            for raw in entry.source_ips:
                source = conntrack.canonical_ip(raw, entry.family)
                assert source is not None  # validated by source_treatments
                owners[entry.family].setdefault(source, (service.namespace, service.name))
    for family, table in treatments.items():
        reject: set[str] = set()
        for source, treatment in table.items():
            namespace, name = owners[family][source]
            content.count[family][source] = CountKey(namespace, name, family, treatment.action)
            if treatment.policy != conntrack.EVERY_DESTINATION:
                content.policy[family][source] = canonical_policy(treatment.policy, family)
            if treatment.action == Action.SNAT:
                assert treatment.snat_ip is not None  # validated by source_treatments
                content.snat[family][source] = treatment.snat_ip
            elif treatment.action == Action.MARK:
                assert treatment.fwmark is not None
                content.mark[family][source] = treatment.fwmark
            else:
                reject.add(source)
        content.reject[family] = frozenset(reject)
    return content


def random_entry(rng: random.Random, family: Family) -> FamilyEgress:
    action = rng.choice(list(Action))
    sources = tuple(sorted(rng.sample(SOURCES[family], rng.randint(1, 3))))
    if action == Action.SNAT:
        return FamilyEgress(family, action, sources, snat_ip=rng.choice(SNAT_IPS[family]))
    if action == Action.MARK:
        return FamilyEgress(family, action, sources, fwmark=rng.randint(1, 3) << 20)
    return FamilyEgress(family, action, sources, reason=rng.choice(["no gateway", "no LB IP"]))


def random_service(rng: random.Random, key: tuple[str, str], valid: bool) -> ServiceEgress:
    families = [random_entry(rng, f) for f in Family if rng.random() < 0.7]
    if rng.random() < 0.1:  # a second entry of one family: the first one wins
        families.append(random_entry(rng, rng.choice(list(Family))))
    if not valid:  # MARK without a mark
        families.append(FamilyEgress(Family.IPV4, Action.MARK, ("10.244.1.1",)))
    role = rng.choice(list(Role))
    return ServiceEgress(key[0], key[1], role, rng.choice([None, "node-b"]), (), tuple(families))


def random_state(rng: random.Random, previous: NodeDesiredState | None) -> NodeDesiredState:
    """A state near ``previous``: a few Services changed, added or removed; sometimes
    another guard, exclusion, or an order the incremental path must refuse."""
    services = {(s.namespace, s.name): s for s in previous.services} if previous else {}
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(KEYS)
        if key in services and rng.random() < 0.3:
            del services[key]
        else:
            services[key] = random_service(rng, key, valid=rng.random() > 0.02)
    ordered = [services[k] for k in sorted(services)]
    if len(ordered) > 1 and rng.random() < 0.05:
        rng.shuffle(ordered)
    if ordered and rng.random() < 0.03:
        ordered.append(ordered[0])  # a duplicate key
    transit4 = previous.transit_guard_ipv4 if previous else ()
    transit6 = previous.transit_guard_ipv6 if previous else ()
    if rng.random() < 0.2:
        transit4 = tuple(sorted(rng.sample(TRANSIT[Family.IPV4], rng.randint(0, 3))))
        transit6 = tuple(sorted(rng.sample(TRANSIT[Family.IPV6], rng.randint(0, 2))))
    exclude4 = EXCLUDE4 if rng.random() < 0.9 else ("10.0.0.0/8", "198.51.100.0/24")
    return NodeDesiredState(
        "node-a",
        MASK,
        exclude4,
        EXCLUDE6,
        tuple(ordered),
        transit_guard_ipv4=transit4,
        transit_guard_ipv6=transit6,
    )


def random_walk(
    rng: random.Random, count: int, valid: Callable[[NodeDesiredState], bool]
) -> list[NodeDesiredState]:
    """``count`` nearby states (:func:`random_state`), without the invalid ones at the start
    (a walk must begin from something applied; later invalid ones test refusals)."""
    states: list[NodeDesiredState] = []
    for _ in range(count):
        states.append(random_state(rng, states[-1] if states else None))
    while states and not valid(states[0]):
        states.pop(0)
    return states


def random_states(
    seed: int, count: int, valid: Callable[[NodeDesiredState], bool] | None = None
) -> list[NodeDesiredState]:
    """Valid states only (for the kernel; by default valid for the nftables backend)."""
    rng = random.Random(seed)
    states: list[NodeDesiredState] = []
    while len(states) < count:
        state = random_state(rng, states[-1] if states else None)
        if (valid or _valid)(state):
            states.append(state)
    return states


def assert_same_index(live: AppliedTable, state: NodeDesiredState) -> None:
    rebuilt = AppliedTable(state)
    assert live.content == rebuilt.content
    assert live.claims.owner == rebuilt.claims.owner
    assert live.claims.shared_sources == rebuilt.claims.shared_sources
    assert +live.sources_per_mark == +rebuilt.sources_per_mark
    assert live.claims.services == rebuilt.claims.services


def assert_same_plan(plan: FlushPlan, reference: FlushPlan) -> None:
    assert {f: plan.sources.get(f, set()) for f in Family} == {
        f: reference.sources.get(f, set()) for f in Family
    }
    for family, sources in reference.sources.items():
        for source in sources:
            for destination in DESTINATIONS[family]:
                assert plan.wants(family, source, destination) == reference.wants(
                    family, source, destination
                )


def step(live: AppliedTable, old: NodeDesiredState, new: NodeDesiredState) -> AppliedTable | None:
    """One step, checked against the full render; returns the live table after it (None:
    ``new`` is refused, and nothing changed)."""
    before = reference_content(old)
    try:
        reference = reference_content(new)
    except BackendError:
        # Refused by the step, or (full path) by the full render.
        with pytest.raises(BackendError, match="service "):
            if live.step_to(new) is None:
                AppliedTable(new)
        assert_same_index(live, old)
        return None
    change = live.step_to(new)
    if change is None:
        # Only an exclusion change or an order the index cannot follow takes the full path.
        keys = [(s.namespace, s.name) for s in new.services]
        assert (
            new.exclude_dst_ipv4 != old.exclude_dst_ipv4
            or keys != sorted(set(keys))
            or not live.claims.ordered
        )
        return AppliedTable(new)
    assert change.script == diff_script(before, reference, MASK)
    assert_same_plan(change.flush, FlushPlan.between(before.view, reference.view))
    live.commit(change)
    assert live.content == reference
    assert live.content.count == reference.count  # not part of the comparison above
    assert live.content.view == reference.view
    assert_same_index(live, new)
    return live


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(2, 12))
def test_incremental_steps_equal_the_full_render(rng: random.Random, count: int) -> None:
    states = random_walk(rng, count, _valid)
    if not states:
        return
    live, applied = AppliedTable(states[0]), states[0]
    assert live.content == reference_content(applied)
    for new in states[1:]:
        after = step(live, applied, new)
        if after is not None:
            live, applied = after, new


def _valid(state: NodeDesiredState) -> bool:
    try:
        reference_content(state)
    except BackendError:
        return False
    return True


def test_conflicting_sources_follow_the_first_service_through_changes() -> None:
    def svc(name: str, action: Action, *sources: str, mark: int = 1 << 20) -> ServiceEgress:
        entry = FamilyEgress(
            Family.IPV4,
            action,
            tuple(sorted(sources)),
            snat_ip="192.0.2.1" if action == Action.SNAT else None,
            fwmark=mark if action == Action.MARK else None,
        )
        return ServiceEgress("ns", name, Role.GATEWAY, None, (), (entry,))

    def state(*services: ServiceEgress) -> NodeDesiredState:
        return NodeDesiredState("node-a", MASK, EXCLUDE4, EXCLUDE6, services)

    states = [
        state(svc("b", Action.MARK, "10.244.1.1"), svc("c", Action.REJECT, "10.244.1.1")),
        # A new first Service takes the source over; the others keep their claims.
        state(
            svc("a", Action.SNAT, "10.244.1.1"),
            svc("b", Action.MARK, "10.244.1.1"),
            svc("c", Action.REJECT, "10.244.1.1"),
        ),
        # It leaves again: back to b, whose claim never changed.
        state(svc("b", Action.MARK, "10.244.1.1"), svc("c", Action.REJECT, "10.244.1.1")),
        # b moves (its own treatment changes while it owns the source).
        state(
            svc("b", Action.MARK, "10.244.1.1", mark=2 << 20), svc("c", Action.REJECT, "10.244.1.1")
        ),
        # b drops it: c's claim takes effect.
        state(svc("b", Action.MARK, "10.244.1.2"), svc("c", Action.REJECT, "10.244.1.1")),
    ]
    live: AppliedTable | None = AppliedTable(states[0])
    for old, new in itertools.pairwise(states):
        assert live is not None and live.step_to(new) is not None
        live = step(live, old, new)
    assert live is not None
    assert live.content.reject[Family.IPV4] == {"10.244.1.1"}
    assert live.content.mark[Family.IPV4] == {"10.244.1.2": 1 << 20}


def test_a_bad_service_is_refused_before_anything_changes() -> None:
    good = NodeDesiredState(
        "node-a",
        MASK,
        EXCLUDE4,
        EXCLUDE6,
        (random_service(random.Random(7), ("a", "x"), valid=True),),
        transit_guard_ipv4=("10.250.0.0/24",),
    )
    bad = NodeDesiredState(
        good.node,
        MASK,
        good.exclude_dst_ipv4,
        good.exclude_dst_ipv6,
        (
            *good.services,
            ServiceEgress(
                "zz",
                "bad",
                Role.FORWARDER,
                None,
                (),
                (FamilyEgress(Family.IPV4, Action.MARK, ("10.244.9.9",)),),
            ),
        ),
    )
    live = AppliedTable(good)
    with pytest.raises(BackendError, match="service zz/bad"):
        live.step_to(bad)
    assert_same_index(live, good)


def test_a_change_touches_only_the_changed_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-source work for unchanged Services (what makes the cost independent of N)."""
    services = tuple(
        ServiceEgress(
            "ns",
            f"svc{i:04d}",
            Role.FORWARDER,
            "node-b",
            (),
            (
                FamilyEgress(
                    Family.IPV4,
                    Action.MARK,
                    tuple(f"10.128.{i // 25}.{(i % 25) * 10 + j}" for j in range(10)),
                    fwmark=1 << 20,
                ),
            ),
        )
        for i in range(500)
    )
    old = NodeDesiredState("node-a", MASK, EXCLUDE4, EXCLUDE6, services)
    moved = ServiceEgress(
        "ns",
        "svc0250",
        Role.FORWARDER,
        "node-c",
        (),
        (
            FamilyEgress(
                Family.IPV4, Action.MARK, services[250].families[0].source_ips, fwmark=2 << 20
            ),
        ),
    )
    # Decoded afresh like a snapshot from the supervisor: equal, not identical objects.
    new = msgspec.msgpack.decode(
        msgspec.msgpack.encode(
            NodeDesiredState(
                "node-a", MASK, EXCLUDE4, EXCLUDE6, (*services[:250], moved, *services[251:])
            )
        ),
        type=NodeDesiredState,
    )
    live = AppliedTable(old)
    calls: list[str] = []
    claims = source_claims.service_claims
    monkeypatch.setattr(
        source_claims, "service_claims", lambda s, m: calls.append(s.name) or claims(s, m)
    )
    change = live.step_to(new)
    assert change is not None
    assert calls == ["svc0250", "svc0250"]  # old and new claims of the one changed Service
    assert len(change.sources) == 10
    assert change.flush.sources == {
        Family.IPV4: set(moved.families[0].source_ips),
        Family.IPV6: set(),
    }
    assert change.script.splitlines()[:2] == [
        "add set inet metaleg mark4_00200000 { type ipv4_addr; }",
        "add set inet metaleg mark6_00200000 { type ipv6_addr; }",
    ]
    assert change.new_marks == [2 << 20]
    live.commit(change)
    assert live.content == reference_content(new)


# --- in a namespace -----------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace("mlni") as name:
        yield name


def _apply_sequence(states: list[NodeDesiredState]) -> list[int]:
    """Resync the first state, apply the rest; after each, the kernel must hold the
    full render and a no-op resync must find nothing to repair."""
    backend = NftablesBackend()  # alone: its conntrack plans are not carried out
    transactions = []
    try:
        backend.resync(states[0])
        for state in states[1:]:
            before = backend.transactions
            backend.apply(state)
            listed = ActualTable.parse(backend.nft.json("list table inet metaleg")).content()
            assert listed == reference_content(state)
            transactions.append(backend.transactions - before)
        before = backend.transactions
        backend.resync(states[-1])
        assert backend.transactions == before, "the incremental table differs from the full one"
    finally:
        backend.close()
    return transactions


@pytest.mark.netns
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sequence_in_the_kernel(ns: str, seed: int) -> None:
    states = random_states(seed, 40)
    transactions = run_in_netns(ns, _apply_sequence, states)
    assert all(n in (0, 1) for n in transactions)  # one transaction per change at most
    assert sum(transactions) > 10


def _flows(ns: str) -> set[tuple[str, str]]:
    return {(source, destination) for source, destination, _ in flows_in(ns)}


def _resync_then_apply(first: NodeDesiredState, second: NodeDesiredState) -> None:
    """A fresh firewall worker's first re-sync, then a change (conntrack deletions too)."""
    firewall = ManagedFirewall(NftablesBackend(), None, None)
    try:
        firewall.resync(first)
        firewall.apply(second)
    finally:
        firewall.close()


def _service(name: str, family: Family, action: Action, source: str, **kw: object) -> ServiceEgress:
    entry = FamilyEgress(family, action, (source,), **kw)  # type: ignore[arg-type]
    return ServiceEgress("ns", name, Role.FORWARDER, None, (), (entry,))


@pytest.mark.netns
def test_a_move_flushes_only_the_moved_sources_flows(ns: str) -> None:
    first = NodeDesiredState(
        "node-a",
        MASK,
        EXCLUDE4,
        EXCLUDE6,
        (
            _service("a", Family.IPV4, Action.MARK, "10.244.1.1", fwmark=1 << 20),
            _service("b", Family.IPV4, Action.MARK, "10.244.1.2", fwmark=1 << 20),
            _service("c", Family.IPV6, Action.MARK, "fd00:1::1", fwmark=1 << 20),
        ),
    )
    second = NodeDesiredState(
        "node-a",
        MASK,
        EXCLUDE4,
        EXCLUDE6,
        (
            _service("a", Family.IPV4, Action.SNAT, "10.244.1.1", snat_ip="192.0.2.1"),
            first.services[1],
            _service("c", Family.IPV6, Action.MARK, "fd00:1::1", fwmark=2 << 20),
        ),
    )
    run_in_netns(ns, _resync_then_apply, first, first)  # the table, no flows yet
    flows = [
        ("10.244.1.1", "8.8.8.8"),
        ("10.244.1.1", "10.96.0.10"),  # excluded destination: kept
        ("10.244.1.2", "8.8.8.8"),  # unchanged Service: kept
        ("fd00:1::1", "2001:db8::53"),
        ("fd00:1::1", "fd00:5::53"),  # excluded: kept
    ]
    insert_flows(
        ns, [(source, dest, "udp", 2000 + i, 53) for i, (source, dest) in enumerate(flows)]
    )
    assert _flows(ns) == set(flows)
    run_in_netns(ns, _resync_then_apply, first, second)
    assert _flows(ns) == set(flows) - {("10.244.1.1", "8.8.8.8"), ("fd00:1::1", "2001:db8::53")}
