"""Conntrack scoping: which sources a change affects (pure), and deleting only their entries."""

from __future__ import annotations

import contextlib
import errno
import socket
import subprocess
from collections.abc import Iterable, Iterator, Mapping

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metaleg.firewall import conntrack
from metaleg.firewall.claims import SourceClaims
from metaleg.firewall.conntrack import (
    EVERY_DESTINATION,
    MAX_MERGED_STEPS,
    AllFlowsOf,
    DestinationPolicy,
    EgressView,
    FlushPlan,
    MergedPlan,
    Treatment,
    TreatmentError,
    changed_sources,
    delete_outdated_entries,
    source_treatments,
)
from metaleg.firewall.wire import conntrack as conntrack_netlink
from metaleg.firewall.wire.conntrack import Entry
from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    NodeDesiredState,
    PortRange,
    Protocol,
    Role,
    ServiceEgress,
)
from tests.netns import namespace, run_in_netns, sh

MASK = 0x00F00000


def affected_sources(old: NodeDesiredState | None, new: NodeDesiredState) -> dict[Family, set[str]]:
    """Sources whose conntrack entries may be outdated by going from ``old`` to ``new``
    (``old`` None: nothing installed before)."""
    return changed_sources(EgressView.of(old), EgressView.of(new))


def flush_sources(
    sources: Mapping[Family, Iterable[str]],
    old: EgressView | None = None,
    new: EgressView | None = None,
) -> int:
    """Delete the entries whose ORIGINAL source is one of ``sources``: with the ``old``
    and ``new`` views, only those whose flow changes treatment; without, every one."""
    selected = {
        family: {conntrack.canonical_ip(s, family) or s for s in sources.get(family, ())}
        for family in Family
    }
    if old is None or new is None:
        return delete_outdated_entries(AllFlowsOf(selected, EgressView(), EgressView()))
    return delete_outdated_entries(FlushPlan(selected, old, new))


def egress(
    family: Family, action: Action, *sources: str, snat: str | None = None, mark: int | None = None
) -> FamilyEgress:
    return FamilyEgress(family, action, tuple(sorted(sources)), snat_ip=snat, fwmark=mark)


def state(
    *services: tuple[str, tuple[FamilyEgress, ...]],
    exclude4: tuple[str, ...] = ("10.0.0.0/8",),
    exclude6: tuple[str, ...] = ("fc00::/7",),
) -> NodeDesiredState:
    return NodeDesiredState(
        "node-a",
        MASK,
        exclude4,
        exclude6,
        tuple(
            ServiceEgress("ns", name, Role.GATEWAY, "node-a", (), families)
            for name, families in sorted(services)
        ),
    )


SNAT = ("snat", (egress(Family.IPV4, Action.SNAT, "10.244.1.10", "10.244.1.11", snat="192.0.2.1"),))
MARK = ("mark", (egress(Family.IPV4, Action.MARK, "10.244.1.20", mark=0x100000),))
REJECT = ("reject", (egress(Family.IPV6, Action.REJECT, "fd00::30"),))


# --- pure ---------------------------------------------------------------------------------


def test_treatments_are_canonical_and_resolved() -> None:
    treatments = source_treatments(
        state(
            ("a", (egress(Family.IPV6, Action.REJECT, "FD00:0::1"),)),
            ("b", (egress(Family.IPV6, Action.SNAT, "fd00::1", "fd00::2", snat="2001:DB8::1"),)),
            MARK,
        )
    )
    assert treatments == {
        Family.IPV4: {"10.244.1.20": Treatment(Action.MARK, fwmark=0x100000)},
        Family.IPV6: {
            "fd00::1": Treatment(Action.REJECT),
            "fd00::2": Treatment(Action.SNAT, snat_ip="2001:db8::1"),
        },
    }


def test_entry_memo_keeps_only_the_entries_of_the_last_two_states() -> None:
    """Under churn (every state a new pod IP), the memo does not keep old states' entries."""
    for step in range(50):
        source_treatments(
            state(SNAT, ("churn", (egress(Family.IPV4, Action.REJECT, f"10.244.9.{step}"),)))
        )
    cache = conntrack._ENTRY_CACHE
    kept = {entry.source_ips for _, entry, _, _ in (*cache.current, *cache.previous)}
    assert kept <= {SNAT[1][0].source_ips, ("10.244.9.48",), ("10.244.9.49",)}
    # The entry every state uses is carried from one generation to the next.
    assert any(key[1] == SNAT[1][0] for key in cache.previous)


def test_incremental_steps_leave_no_old_entries_in_the_memo() -> None:
    """Steps do not walk the whole state: what they replace leaves the memo at once (it
    would keep the old snapshot's entries alive until the next walk, minutes later)."""
    first = state(SNAT, MARK, ("churn", (egress(Family.IPV4, Action.REJECT, "10.244.9.0"),)))
    claims, _ = SourceClaims.build(first)
    current = first
    for step in range(1, 20):
        churn = ("churn", (egress(Family.IPV4, Action.REJECT, f"10.244.9.{step}"),))
        new = state(SNAT, MARK, churn)
        change = claims.step(new)
        assert change is not None
        claims.commit(change)
        current = new
    cache = conntrack._ENTRY_CACHE
    live = {entry for service in current.services for entry in service.families}
    assert {entry for _, entry, _, _ in (*cache.current, *cache.previous)} <= live
    # The unchanged Services' entries stay for the next walk.
    assert any(key[1] == SNAT[1][0] for key in cache.previous)


def test_bad_state_names_the_service() -> None:
    bad = ("bad", (egress(Family.IPV4, Action.MARK, "10.1.0.1", mark=0x1000000),))
    with pytest.raises(TreatmentError, match=r"service ns/bad .*0x1000000"):
        source_treatments(state(bad))


def test_first_state_affects_every_treated_source() -> None:
    assert affected_sources(None, state(SNAT, MARK, REJECT)) == {
        Family.IPV4: {"10.244.1.10", "10.244.1.11", "10.244.1.20"},
        Family.IPV6: {"fd00::30"},
    }


def test_unchanged_state_affects_nothing() -> None:
    assert affected_sources(state(SNAT, MARK), state(MARK, SNAT)) == {
        Family.IPV4: set(),
        Family.IPV6: set(),
    }


@pytest.mark.parametrize(
    ("new", "affected"),
    [
        # The LB IP changes: both SNAT sources.
        (
            (("snat", (egress(Family.IPV4, Action.SNAT, "10.244.1.10", "10.244.1.11", snat="192.0.2.2"),)), MARK),
            {"10.244.1.10", "10.244.1.11"},
        ),
        # The gateway moves away (SNAT -> MARK) for one source; the other disappears.
        (
            (("snat", (egress(Family.IPV4, Action.MARK, "10.244.1.10", mark=0x200000),)), MARK),
            {"10.244.1.10", "10.244.1.11"},
        ),
        # Another gateway slot for the marked source.
        ((SNAT, ("mark", (egress(Family.IPV4, Action.MARK, "10.244.1.20", mark=0x200000),))), {"10.244.1.20"}),
        # Gateway lost: MARK -> REJECT.
        ((SNAT, ("mark", (egress(Family.IPV4, Action.REJECT, "10.244.1.20"),))), {"10.244.1.20"}),
        # A new pod appears in a labelled Service.
        ((SNAT, ("mark", (egress(Family.IPV4, Action.MARK, "10.244.1.20", "10.244.1.21", mark=0x100000),))), {"10.244.1.21"}),
        # The Service loses its label: its flows must not keep the LB IP.
        ((MARK,), {"10.244.1.10", "10.244.1.11"}),
    ],
)  # fmt: skip
def test_changes_affect_exactly_the_changed_sources(
    new: tuple[tuple[str, tuple[FamilyEgress, ...]], ...], affected: set[str]
) -> None:
    assert affected_sources(state(SNAT, MARK), state(*new)) == {
        Family.IPV4: affected,
        Family.IPV6: set(),
    }


def test_changed_exclusions_affect_every_treated_source_of_that_family() -> None:
    old, new = state(SNAT, MARK, REJECT), state(SNAT, MARK, REJECT, exclude4=("10.0.0.0/9",))
    assert affected_sources(old, new) == {
        Family.IPV4: {"10.244.1.10", "10.244.1.11", "10.244.1.20"},
        Family.IPV6: set(),
    }
    plan = FlushPlan.between(EgressView.of(old), EgressView.of(new))
    # Excluded before and after: left alone. Excluded only before: now NATed, so flushed.
    assert not plan.wants(Family.IPV4, "10.244.1.10", "10.1.2.3")
    assert plan.wants(Family.IPV4, "10.244.1.10", "10.200.0.1")
    assert not plan.wants(Family.IPV4, "10.244.1.10", "8.8.8.8")  # treatment unchanged


def test_flows_to_excluded_destinations_are_kept() -> None:
    plan = FlushPlan.between(EgressView.of(None), EgressView.of(state(SNAT, REJECT)))
    assert plan.wants(Family.IPV4, "10.244.1.10", "8.8.8.8")
    assert not plan.wants(Family.IPV4, "10.244.1.10", "10.96.0.1")
    assert not plan.wants(Family.IPV4, "10.244.1.99", "8.8.8.8")  # not ours
    assert plan.wants(Family.IPV6, "fd00::30", "2001:db8::1")
    assert not plan.wants(Family.IPV6, "fd00::30", "fd00::1")


def test_a_merged_plan_keeps_an_undone_change() -> None:
    """SNAT IP A -> B (flush failed) -> A: entries made meanwhile hold B and must go."""
    a = EgressView.of(state(SNAT))
    b_state = (
        "snat",
        (egress(Family.IPV4, Action.SNAT, "10.244.1.10", "10.244.1.11", snat="192.0.2.9"),),
    )
    b = EgressView.of(state(b_state))
    merged = FlushPlan.between(a, b).merged(FlushPlan.between(b, a))
    assert merged
    assert merged.wants(Family.IPV4, "10.244.1.10", "8.8.8.8")
    assert not merged.wants(Family.IPV4, "10.244.1.10", "10.1.1.1")


def test_a_merged_plan_stays_flat_and_becomes_every_flow_when_deletions_keep_failing() -> None:
    a = EgressView.of(state(SNAT))
    b = EgressView.of(state(MARK))
    there, back = FlushPlan.between(a, b), FlushPlan.between(b, a)
    merged = there
    for step in range(MAX_MERGED_STEPS - 1):
        merged = merged.merged(back if step % 2 == 0 else there)
    assert isinstance(merged, MergedPlan)
    assert merged.steps() == tuple(there if i % 2 == 0 else back for i in range(MAX_MERGED_STEPS))
    assert not merged.wants(Family.IPV4, "10.244.1.10", "10.1.1.1")  # excluded throughout
    # One failure more: every flow of the sources, whatever the views (bounded in size).
    collapsed = merged.merged(back)
    assert isinstance(collapsed, AllFlowsOf)
    assert collapsed.sources[Family.IPV4] == {"10.244.1.10", "10.244.1.11", "10.244.1.20"}
    assert collapsed.wants(Family.IPV4, "10.244.1.10", "10.1.1.1")
    assert isinstance(collapsed.merged(there), AllFlowsOf)


def policed(
    name: str, entry: FamilyEgress, ports: tuple[PortRange, ...] = ()
) -> tuple[str, tuple[FamilyEgress, ...], tuple[PortRange, ...]]:
    return name, (entry,), ports


def policed_state(
    *services: tuple[str, tuple[FamilyEgress, ...], tuple[PortRange, ...]],
) -> NodeDesiredState:
    """Like :func:`state`, each Service with its destination ports."""
    return NodeDesiredState(
        "node-a",
        MASK,
        ("10.0.0.0/8",),
        ("fc00::/7",),
        tuple(
            ServiceEgress("ns", name, Role.GATEWAY, "node-a", (), families, destination_ports=ports)
            for name, families, ports in sorted(services, key=lambda service: service[0])
        ),
    )


SMTP = (PortRange(Protocol.TCP, 25, 25),)
RELAY_CIDRS = ("198.51.100.0/24",)


def test_the_destination_policy_is_part_of_the_treatment() -> None:
    entry = egress(Family.IPV4, Action.SNAT, "10.244.1.10", snat="192.0.2.1")
    treatments = source_treatments(
        policed_state(
            policed("mail", msgspec.structs.replace(entry, destinations=RELAY_CIDRS), SMTP)
        )
    )
    assert treatments[Family.IPV4]["10.244.1.10"] == Treatment(
        Action.SNAT, "192.0.2.1", policy=DestinationPolicy(RELAY_CIDRS, SMTP)
    )
    everywhere = source_treatments(policed_state(policed("mail", entry)))
    assert everywhere[Family.IPV4]["10.244.1.10"].policy == EVERY_DESTINATION


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((), RELAY_CIDRS),  # narrowed to the relay's network
        (RELAY_CIDRS, ()),  # widened to every destination
        (RELAY_CIDRS, ("198.51.100.0/25",)),  # narrowed further
    ],
)
@pytest.mark.parametrize("ports", [False, True])
def test_a_narrowed_or_widened_policy_outdates_every_flow_of_its_sources(
    before: tuple[str, ...], after: tuple[str, ...], ports: bool
) -> None:
    def relay(cidrs: tuple[str, ...], port_ranges: tuple[PortRange, ...]) -> NodeDesiredState:
        entry = egress(Family.IPV4, Action.SNAT, "10.244.1.10", "10.244.1.11", snat="192.0.2.1")
        other = egress(Family.IPV4, Action.MARK, "10.244.1.20", mark=0x100000)
        return policed_state(
            policed("mail", msgspec.structs.replace(entry, destinations=cidrs), port_ranges),
            policed("web", other),
        )

    old = relay(before, ())
    new = relay(after, SMTP if ports else ())
    assert affected_sources(old, new) == {
        Family.IPV4: {"10.244.1.10", "10.244.1.11"},
        Family.IPV6: set(),
    }
    plan = FlushPlan.between(EgressView.of(old), EgressView.of(new))
    for destination in ("198.51.100.1", "198.51.100.200", "8.8.8.8"):  # inside or not
        assert plan.wants(Family.IPV4, "10.244.1.10", destination)
    assert not plan.wants(Family.IPV4, "10.244.1.10", "10.96.0.10")  # excluded: never ours
    assert not plan.wants(Family.IPV4, "10.244.1.20", "8.8.8.8")  # another Service
    # The same policy (ports only, then unchanged): nothing outdated.
    assert affected_sources(new, new) == {Family.IPV4: set(), Family.IPV6: set()}


addresses = st.sampled_from([f"10.244.0.{i}" for i in range(1, 9)])
treatment_entries = st.one_of(
    st.builds(
        lambda s, ip: egress(Family.IPV4, Action.SNAT, *s, snat=ip),
        st.sets(addresses, min_size=1, max_size=4),
        st.sampled_from(["192.0.2.1", "192.0.2.2"]),
    ),
    st.builds(
        lambda s, m: egress(Family.IPV4, Action.MARK, *s, mark=m << 20),
        st.sets(addresses, min_size=1, max_size=4),
        st.integers(1, 3),
    ),
    st.builds(
        lambda s: egress(Family.IPV4, Action.REJECT, *s), st.sets(addresses, min_size=1, max_size=4)
    ),
)
destination_cidrs = st.sampled_from(
    [(), RELAY_CIDRS, ("198.51.100.0/25",), ("8.8.8.0/24", "198.51.100.0/24")]
)
destination_ports = st.sampled_from([(), SMTP, (PortRange(Protocol.UDP, 53, 53), *SMTP)])
policed_entries = st.builds(
    lambda entry, cidrs, ports: (msgspec.structs.replace(entry, destinations=cidrs), ports),
    treatment_entries,
    destination_cidrs,
    destination_ports,
)
states = st.lists(policed_entries, max_size=5).map(
    lambda entries: policed_state(
        *(policed(f"s{i}", entry, ports) for i, (entry, ports) in enumerate(entries))
    )
)
"""Up to five Services, each with one IPv4 entry and a destination policy (or none)."""


@given(states, states)
def test_affected_is_exactly_the_sources_whose_treatment_differs(
    old: NodeDesiredState, new: NodeDesiredState
) -> None:
    before, after = source_treatments(old)[Family.IPV4], source_treatments(new)[Family.IPV4]
    affected = affected_sources(old, new)
    assert affected[Family.IPV4] == {
        s for s in before.keys() | after.keys() if before.get(s) != after.get(s)
    }
    assert affected == affected_sources(new, old)
    assert affected_sources(new, new) == {Family.IPV4: set(), Family.IPV6: set()}
    plan = FlushPlan.between(EgressView.of(old), EgressView.of(new))
    for source in affected[Family.IPV4]:
        assert plan.wants(Family.IPV4, source, "198.51.100.1")
        assert not plan.wants(Family.IPV4, source, "10.1.1.1")  # excluded in both


@given(states, states)
def test_a_step_of_the_claims_outdates_what_the_views_of_both_states_do(
    old: NodeDesiredState, new: NodeDesiredState
) -> None:
    """The incremental path (both backends) against the whole states, policies included."""
    claims = SourceClaims.build(old)[0]
    step = claims.step(new)
    assert step is not None  # sorted Services, the same exclusions: never the full way
    reference = FlushPlan.between(EgressView.of(old), EgressView.of(new))
    assert {f: step.flush.sources.get(f, set()) for f in Family} == reference.sources
    for source in reference.sources[Family.IPV4]:
        for destination in ("198.51.100.1", "8.8.8.8", "10.1.1.1"):
            assert step.flush.wants(Family.IPV4, source, destination) == reference.wants(
                Family.IPV4, source, destination
            )


@given(states, states, states)
def test_changed_sources_of_two_steps_cover_the_direct_change(
    a: NodeDesiredState, b: NodeDesiredState, c: NodeDesiredState
) -> None:
    va, vb, vc = EgressView.of(a), EgressView.of(b), EgressView.of(c)
    direct = changed_sources(va, vc)[Family.IPV4]
    steps = changed_sources(va, vb)[Family.IPV4] | changed_sources(vb, vc)[Family.IPV4]
    assert direct <= steps


# --- kernel -------------------------------------------------------------------------------

FLOWS = [
    # (source, destination, protocol, sport, dport)
    ("10.244.1.10", "8.8.8.8", "udp", 1000, 53),
    ("10.244.1.10", "1.1.1.1", "tcp", 1001, 443),
    ("10.244.1.10", "10.96.0.10", "udp", 1002, 53),  # to an excluded destination
    ("10.244.1.11", "8.8.8.8", "udp", 1003, 53),
    ("10.244.1.20", "8.8.8.8", "udp", 1004, 53),
    ("8.8.8.8", "10.244.1.10", "udp", 53, 1005),  # opened towards the pod: not its flow
    ("fd00::10", "2001:db8::1", "udp", 1006, 53),
    ("fd00::10", "fd00::99", "udp", 1007, 53),  # excluded
    ("fd00::11", "2001:db8::1", "tcp", 1008, 443),
]


def insert_flows(ns: str, flows: list[tuple[str, str, str, int, int]]) -> None:
    for source, destination, protocol, sport, dport in flows:
        extra = ["--state", "ESTABLISHED"] if protocol == "tcp" else []
        sh(
            "conntrack", "-I", "-s", source, "-d", destination, "-p", protocol,
            "--sport", str(sport), "--dport", str(dport), *extra, "-t", "300",
            netns=ns,
        )  # fmt: skip


def flows_in(ns: str) -> set[tuple[str, str, int]]:
    """(source, destination, sport) of every entry, read by the conntrack binary."""
    output = subprocess.run(
        ["ip", "netns", "exec", ns, "conntrack", "-L"], capture_output=True, text=True, check=True
    ).stdout
    result = set()
    for line in output.splitlines():
        fields: dict[str, str] = {}
        for word in line.split():
            key, _, value = word.partition("=")
            # The first src/dst/sport of a line are the ORIGINAL direction's.
            fields.setdefault(key, value)
        result.add((fields["src"], fields["dst"], int(fields["sport"])))
    return result


def all_flows() -> set[tuple[str, str, int]]:
    return {(s, d, sport) for s, d, _, sport, _ in FLOWS}


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace("mlnf") as name:
        insert_flows(name, FLOWS)
        assert flows_in(name) == all_flows()
        yield name


@pytest.mark.netns
def test_flush_sources_deletes_only_their_entries(ns: str) -> None:
    deleted = run_in_netns(
        ns, flush_sources, {Family.IPV4: ["10.244.1.10"], Family.IPV6: ["fd00:0::11"]}
    )
    assert deleted == 4
    gone = {("10.244.1.10", "8.8.8.8", 1000), ("10.244.1.10", "1.1.1.1", 1001)}
    gone |= {("10.244.1.10", "10.96.0.10", 1002), ("fd00::11", "2001:db8::1", 1008)}
    assert flows_in(ns) == all_flows() - gone
    # Nothing left to delete: idempotent.
    assert run_in_netns(ns, flush_sources, {Family.IPV4: ["10.244.1.10"]}) == 0


@pytest.mark.netns
def test_flush_with_views_keeps_flows_to_excluded_destinations(ns: str) -> None:
    old = EgressView.of(None)
    new = EgressView.of(
        state(
            SNAT,
            ("v6", (egress(Family.IPV6, Action.SNAT, "fd00::10", snat="2001:db8::100"),)),
        )
    )
    sources = changed_sources(old, new)
    assert run_in_netns(ns, flush_sources, sources, old, new) == 4
    assert flows_in(ns) == all_flows() - {
        ("10.244.1.10", "8.8.8.8", 1000),
        ("10.244.1.10", "1.1.1.1", 1001),
        ("10.244.1.11", "8.8.8.8", 1003),
        ("fd00::10", "2001:db8::1", 1006),
    }


def _flush_with_full_dump(sources: dict[Family, list[str]]) -> int:
    conntrack.PER_SOURCE_DUMP_LIMIT = 0  # in the child process only
    return flush_sources(sources)


@pytest.mark.netns
def test_many_sources_use_one_filtered_dump(ns: str) -> None:
    many = [f"10.244.2.{i}" for i in range(100)] + ["10.244.1.11"]
    assert run_in_netns(ns, _flush_with_full_dump, {Family.IPV4: many}) == 1
    assert flows_in(ns) == all_flows() - {("10.244.1.11", "8.8.8.8", 1003)}


# --- the dump strategy (see conntrack._matching_tuples) -------------------------------------


def _count_and_flush_without_sockets(sources: dict[Family, list[str]]) -> tuple[int | None, int]:
    def no_socket(family: object) -> None:
        raise AssertionError("an empty namespace needs no conntrack dump")

    # Neither pyroute2's per-source sockets nor the whole-table dump's (in the child only).
    conntrack._socket = no_socket  # type: ignore[assignment]
    conntrack._batch_socket = lambda: no_socket(None)  # type: ignore[assignment]
    return conntrack.entry_count(), flush_sources(sources)


@pytest.mark.netns
def test_an_empty_namespace_costs_no_dump() -> None:
    with namespace("mlnf") as name:
        count, deleted = run_in_netns(
            name,
            _count_and_flush_without_sockets,
            {Family.IPV4: ["10.244.1.10"], Family.IPV6: ["fd00::10"]},
        )
    assert (count, deleted) == (0, 0)


def _entry_count() -> int | None:
    return conntrack.entry_count()


@pytest.mark.netns
def test_the_entry_count_is_the_namespaces_own(ns: str) -> None:
    assert run_in_netns(ns, _entry_count) == len(FLOWS)


def _flush_with_strategy(
    strategy: str, sources: dict[Family, set[str]], old: EgressView, new: EgressView
) -> int:
    # Module settings, changed in the child process only.
    if strategy == "per source":
        conntrack.FULL_DUMP_ENTRIES_PER_SOURCE = 0
    elif strategy == "count unknown":
        conntrack.COUNT_PATH = "/nonexistent/nf_conntrack_count"
    return flush_sources(sources, old, new)


@pytest.mark.netns
@pytest.mark.parametrize("strategy", ["one dump", "per source", "count unknown"])
def test_every_dump_strategy_deletes_exactly_the_changed_flows(ns: str, strategy: str) -> None:
    old = EgressView.of(None)
    new = EgressView.of(
        state(
            SNAT,
            ("v6", (egress(Family.IPV6, Action.SNAT, "fd00::10", snat="2001:db8::100"),)),
        )
    )
    sources = changed_sources(old, new)
    assert run_in_netns(ns, _flush_with_strategy, strategy, sources, old, new) == 4
    assert flows_in(ns) == all_flows() - {
        ("10.244.1.10", "8.8.8.8", 1000),
        ("10.244.1.10", "1.1.1.1", 1001),
        ("10.244.1.11", "8.8.8.8", 1003),
        ("fd00::10", "2001:db8::1", 1006),
    }


def _matching_with_counted_dumps(sources: dict[Family, set[str]]) -> dict[str, int]:
    """Which whole-table dumps ran how often, for the namespace's few entries (per-source
    dumps go through pyroute2's sockets, which must not be opened here)."""
    dumps: dict[str, int] = {}
    real = conntrack._batch_socket()
    names = {socket.AF_UNSPEC: "both", socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}

    class Counting:
        def dump(self, family: int) -> object:
            dumps[names[family]] = dumps.get(names[family], 0) + 1
            return real.dump(family)

    def no_socket(family: object) -> None:
        raise AssertionError("a per-source dump")

    conntrack._batch_socket = Counting  # type: ignore[assignment]  # in the child process only
    conntrack._socket = no_socket  # type: ignore[assignment]
    conntrack._matching_tuples(sources, conntrack.entry_count())
    return dumps


@pytest.mark.netns
def test_few_entries_take_one_walk_for_both_families(ns: str) -> None:
    sources = {Family.IPV4: {f"10.244.1.{i}" for i in range(10)}, Family.IPV6: {"fd00::10"}}
    assert run_in_netns(ns, _matching_with_counted_dumps, sources) == {"both": 1}
    only4 = {Family.IPV4: {"10.244.1.10"}}
    assert run_in_netns(ns, _matching_with_counted_dumps, only4) == {"IPv4": 1}


def _event_loops_of_three_flushes(sources: dict[Family, list[str]]) -> list[tuple[int, bool]]:
    """The event loop each pyroute2 socket holds after each of three flushes with per-source
    dumps (id, still open)."""
    conntrack.FULL_DUMP_ENTRIES_PER_SOURCE = 0  # in the child process only
    loops = []
    for _ in range(3):
        flush_sources(sources)
        for ct in conntrack._sockets.values():
            loop = getattr(ct.asyncore.local, "event_loop", None)
            loops.append((id(loop), loop is not None and not loop.is_closed()))
    return loops


@pytest.mark.netns
def test_the_conntrack_socket_keeps_its_event_loop(ns: str) -> None:
    """pyroute2 would set up and close an event loop per dump, leaking a little each time
    (see conntrack._socket): the socket must keep one loop for all its dumps."""
    loops = run_in_netns(ns, _event_loops_of_three_flushes, {Family.IPV4: ["10.244.9.9"]})
    assert len(loops) == 3
    assert all(is_open for _, is_open in loops), loops
    assert len({loop for loop, _ in loops}) == 1, loops


# --- dumps decoded by conntrack_netlink -------------------------------------------------------


def _dumped() -> list[tuple[str, str, int, int | None, int | None, bool]]:
    with contextlib.closing(conntrack_netlink.ConntrackSocket()) as ct:
        return sorted(
            (d.entry.source, d.entry.destination, d.entry.protocol, d.entry.source_port,
             d.entry.destination_port, d.zoned)
            for d in ct.dump()
        )  # fmt: skip


@pytest.mark.netns
def test_a_dump_lists_every_entry_as_the_conntrack_tool_does(ns: str) -> None:
    numbers = {"udp": 17, "tcp": 6}
    expected = sorted(
        (conntrack.canonical_ip(src, Family.IPV6 if ":" in src else Family.IPV4) or src,
         conntrack.canonical_ip(dst, Family.IPV6 if ":" in dst else Family.IPV4) or dst,
         numbers[proto], sport, dport, False)
        for src, dst, proto, sport, dport in FLOWS
    )  # fmt: skip
    assert run_in_netns(ns, _dumped) == expected


ports = st.integers(0, 0xFFFF)
octets = st.integers(0, 0xFF)
addresses4 = st.ip_addresses(v=4).map(str)
addresses6 = st.ip_addresses(v=6).map(str)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    address = addresses4 if family == socket.AF_INET else addresses6
    source, destination = draw(address), draw(address)
    if draw(st.booleans()):
        icmp = 1 if family == socket.AF_INET else 58
        return Entry(family, source, destination, icmp, None, None, draw(ports), draw(octets),
                     draw(octets))  # fmt: skip
    return Entry(family, source, destination, draw(st.sampled_from([6, 17, 132])), draw(ports),
                 draw(ports))  # fmt: skip


@given(entry=entries(), zone=st.integers(0, 0xFFFF))
def test_a_dumped_entry_decodes_to_the_tuple_a_delete_sends(entry: Entry, zone: int) -> None:
    """The dump decoder reads what the delete encoder writes (the same attributes the kernel
    puts in a dump answer), with canonical addresses; a non-zero CTA_ZONE marks it zoned."""
    payload = (
        conntrack_netlink.NFGEN.pack(entry.family, 0, 0)
        + conntrack_netlink.tuple_attribute(entry)
        + conntrack_netlink.attr(conntrack_netlink.CTA_ZONE, zone.to_bytes(2, "big"))
    )
    canonical = entry._replace(
        source=socket.inet_ntop(entry.family, socket.inet_pton(entry.family, entry.source)),
        destination=socket.inet_ntop(
            entry.family, socket.inet_pton(entry.family, entry.destination)
        ),
    )
    assert conntrack_netlink.parse_entry(payload) == (canonical, zone != 0)


def test_answers_without_a_tuple_are_skipped() -> None:
    nfgen = conntrack_netlink.NFGEN.pack(socket.AF_INET, 0, 0)
    assert conntrack_netlink.parse_entry(nfgen) is None
    assert conntrack_netlink.parse_entry(b"") is None
    bridge = conntrack_netlink.NFGEN.pack(7, 0, 0)  # AF_BRIDGE
    udp = Entry(socket.AF_INET, "10.0.0.1", "10.0.0.2", 17, 1, 2)
    assert conntrack_netlink.parse_entry(bridge + conntrack_netlink.tuple_attribute(udp)) is None


# --- batched deletion (see conntrack_netlink) ------------------------------------------------


def test_a_delete_request_is_encoded_as_the_kernel_defines_it() -> None:
    udp = Entry(socket.AF_INET, "10.244.1.10", "8.8.8.8", 17, 1000, 53)
    assert conntrack_netlink.delete_message(udp, 7) == bytes.fromhex(
        "48000000" "0201" "0100" "07000000" "00000000"  # nlmsghdr: CT_DELETE, NLM_F_REQUEST, seq 7
        "02000000"  # nfgenmsg: AF_INET, version 0, res_id 0
        "34000180"  # CTA_TUPLE_ORIG (nested)
        "14000180" "08000100" "0af4010a" "08000200" "08080808"  # CTA_TUPLE_IP {V4_SRC, V4_DST}
        "1c000280" "0500010011000000"  # CTA_TUPLE_PROTO {CTA_PROTO_NUM 17,
        "0600020003e80000" "0600030000350000"  # SRC_PORT 1000, DST_PORT 53 (big-endian)}
    )  # fmt: skip
    ping6 = Entry(socket.AF_INET6, "fd00::10", "2001:db8::1", 58, None, None, 0x1234, 128, 0)
    assert conntrack_netlink.tuple_attribute(ping6) == bytes.fromhex(
        "54000180"
        "2c000180" "14000300" + "fd00" + "00" * 12 + "0010" "14000400" "20010db8" + "00" * 10 + "0001"
        + "24000280" "050001003a000000"  # CTA_PROTO_NUM 58
        "0600070012340000" "0500080080000000" "0500090000000000"  # ICMPV6_ID, _TYPE, _CODE
    )  # fmt: skip
    assert str(udp) == "udp 10.244.1.10:1000 -> 8.8.8.8:53"
    assert str(ping6) == "icmpv6 [fd00::10] -> [2001:db8::1] (id 4660 type 128 code 0)"


LIVE_ADDRESSES = [
    "10.244.1.10", "10.244.1.11", "10.244.1.20", "8.8.8.8", "1.1.1.1", "10.96.0.10",
    "fd00::10", "fd00::11", "2001:db8::1", "fd00::99",
]  # fmt: skip
TRACK_NEW = (
    "add table inet t; add chain inet t c { type filter hook output priority 0; }; "
    "add rule inet t c ct state new counter"
)


@pytest.fixture
def live() -> Iterator[str]:
    """A namespace whose own addresses stand in for pods and remote hosts (traffic on lo),
    with a ``ct`` rule so that the kernel tracks its connections."""
    with namespace("mlct") as name:
        for address in LIVE_ADDRESSES:
            sh("ip", "addr", "add", address, "dev", "lo", netns=name)
        sh("nft", TRACK_NEW, netns=name)
        yield name


def entries_in(ns: str) -> list[tuple[str, str, str, str]]:
    """(protocol, source, destination, source port or ICMP id) of every entry (ORIGINAL
    direction), read by the conntrack binary."""
    output = sh("conntrack", "-L", netns=ns)
    result = []
    for line in output.splitlines():
        words = line.split()
        fields: dict[str, str] = {}
        for word in words[1:]:
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        result.append(
            (words[0], fields["src"], fields["dst"], fields.get("sport", fields.get("id", "")))
        )
    return result


def _open_flows(udp: list[tuple[str, str, int, int]], tcp: list[tuple[str, str, int, int]]) -> None:
    """Real flows: UDP datagrams (to closed ports), TCP connections (open, then closed:
    their entries stay in TIME_WAIT)."""
    sockets = []
    for source, destination, sport, dport in udp:
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((source, sport))
            sock.sendto(b"x", (destination, dport))
    for source, destination, sport, dport in tcp:
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.bind((destination, dport))
        server.listen()
        client = socket.socket(family, socket.SOCK_STREAM)
        client.bind((source, sport))
        client.connect((destination, dport))
        sockets += [server, client, server.accept()[0]]
    for sock in sockets:
        sock.close()


def _udp_burst(source: str, destination: str, sport: int, ports: range) -> None:
    """One UDP datagram to each of ``ports``: one entry each."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((source, sport))
        for port in ports:
            sock.sendto(b"x", (destination, port))


def ping(ns: str, source: str, destination: str) -> None:
    sh("ping", "-c1", "-W2", "-I", source, destination, netns=ns)


@pytest.mark.netns
def test_real_flows_of_both_families_are_deleted_exactly(live: str) -> None:
    udp = [
        ("10.244.1.10", "8.8.8.8", 1000, 53),
        ("10.244.1.10", "10.96.0.10", 1002, 53),  # to an excluded destination
        ("10.244.1.11", "8.8.8.8", 1003, 53),
        ("10.244.1.20", "8.8.8.8", 1004, 53),  # not metaleg's
        ("fd00::10", "2001:db8::1", 1006, 53),
        ("fd00::10", "fd00::99", 1007, 53),  # excluded
    ]
    tcp = [("10.244.1.10", "1.1.1.1", 1001, 443), ("fd00::11", "2001:db8::1", 1008, 443)]
    run_in_netns(live, _open_flows, udp, tcp)
    for source, destination in [
        ("10.244.1.10", "8.8.8.8"), ("10.244.1.20", "1.1.1.1"), ("fd00::10", "2001:db8::1"),
        ("fd00::10", "fd00::99"),
    ]:  # fmt: skip
        ping(live, source, destination)
    before = entries_in(live)
    assert len(before) == len(udp) + len(tcp) + 4
    old = EgressView.of(None)
    new = EgressView.of(
        state(
            SNAT,
            (
                "v6",
                (egress(Family.IPV6, Action.SNAT, "fd00::10", "fd00::11", snat="2001:db8::100"),),
            ),
        )
    )
    gone = [
        entry
        for entry in before
        if entry[1] in {"10.244.1.10", "10.244.1.11", "fd00::10", "fd00::11"}
        and entry[2] not in {"10.96.0.10", "fd00::99"}
    ]
    assert {(protocol, source) for protocol, source, _, _ in gone} == {
        ("udp", "10.244.1.10"), ("tcp", "10.244.1.10"), ("icmp", "10.244.1.10"),
        ("udp", "10.244.1.11"), ("udp", "fd00::10"), ("icmpv6", "fd00::10"), ("tcp", "fd00::11"),
    }  # fmt: skip
    assert len(gone) == 7
    assert run_in_netns(live, flush_sources, changed_sources(old, new), old, new) == 7
    assert sorted(entries_in(live)) == sorted(set(before) - set(gone))


def _flush_after_some_vanish(sources: dict[Family, list[str]], vanish: list[str]) -> int:
    """A flush where, between the dump and the deletion, the conntrack binary deletes
    the entries of ``vanish`` (conntrack -D arguments) first."""
    real = conntrack._matching_tuples

    def matching_then_vanish(*args: object) -> object:
        result = real(*args)  # type: ignore[arg-type]
        subprocess.run(["conntrack", "-D", *vanish], capture_output=True, check=True)
        return result

    conntrack._matching_tuples = matching_then_vanish  # type: ignore[assignment]  # child only
    return conntrack._delete_once(AllFlowsOf(
        {family: set(members) for family, members in sources.items()}, EgressView(), EgressView()
    ))  # fmt: skip


@pytest.mark.netns
def test_thousands_of_entries_in_one_flush(live: str) -> None:
    run_in_netns(live, _udp_burst, "10.244.1.10", "8.8.8.8", 2000, range(1, 3001))
    run_in_netns(live, _udp_burst, "10.244.1.20", "8.8.8.8", 2000, range(1, 501))
    run_in_netns(live, _udp_burst, "10.244.1.10", "10.96.0.10", 2000, range(1, 201))
    run_in_netns(live, _udp_burst, "fd00::10", "2001:db8::1", 2000, range(1, 1001))
    assert len(entries_in(live)) == 4700
    old = EgressView.of(None)
    new = EgressView.of(
        state(SNAT, ("v6", (egress(Family.IPV6, Action.SNAT, "fd00::10", snat="2001:db8::100"),)))
    )
    assert run_in_netns(live, flush_sources, changed_sources(old, new), old, new) == 4000
    left = entries_in(live)
    assert len(left) == 700
    assert {(source, destination) for _, source, destination, _ in left} == {
        ("10.244.1.20", "8.8.8.8"),
        ("10.244.1.10", "10.96.0.10"),
    }


@pytest.mark.netns
def test_entries_gone_in_between_count_as_not_deleted(live: str) -> None:
    # 300 of 1300 entries vanish between the dump and the deletion: spread over the
    # datagrams, hundreds of ENOENT answers.
    run_in_netns(live, _udp_burst, "10.244.1.10", "8.8.8.8", 2000, range(1, 1001))
    run_in_netns(live, _udp_burst, "10.244.1.10", "1.1.1.1", 2000, range(1, 301))
    deleted = run_in_netns(
        live,
        _flush_after_some_vanish,
        {Family.IPV4: ["10.244.1.10"]},
        ["-s", "10.244.1.10", "-d", "1.1.1.1"],
    )
    assert deleted == 1000
    assert entries_in(live) == []


@pytest.mark.netns
def test_entries_of_other_zones_are_skipped(live: str) -> None:
    for zone, sport in [("5", "1"), ("0", "2")]:
        sh(
            "conntrack", "-I", "-s", "10.244.1.10", "-d", "8.8.8.8", "-p", "udp",
            "--sport", sport, "--dport", "53", "-t", "300", "-w", zone,
            netns=live,
        )  # fmt: skip
    assert run_in_netns(live, flush_sources, {Family.IPV4: ["10.244.1.10"]}) == 1
    assert entries_in(live) == [("udp", "10.244.1.10", "8.8.8.8", "1")]


def _delete_directly(entries: list[Entry]) -> tuple[str, int | None, int]:
    """Delete ``entries`` with a fresh socket; the error, then a second try of the valid ones."""
    deleter = conntrack_netlink.ConntrackSocket()
    try:
        deleter.delete(entries)
    except OSError as error:
        failure, code = str(error), error.errno
    else:
        failure, code = "", None
    # The socket is still usable after an entry was refused.
    return failure, code, deleter.delete([entry for entry in entries if entry.source_port])


@pytest.mark.netns
def test_a_refused_entry_raises_naming_it(live: str) -> None:
    run_in_netns(live, _udp_burst, "10.244.1.10", "8.8.8.8", 2000, range(1, 3))
    good = [Entry(socket.AF_INET, "10.244.1.10", "8.8.8.8", 17, 2000, port) for port in (1, 2)]
    bad = Entry(socket.AF_INET, "10.244.1.10", "1.1.1.1", 6)  # TCP without ports: EINVAL
    failure, code, again = run_in_netns(live, _delete_directly, [good[0], bad, good[1]])
    assert code == errno.EINVAL
    assert "tcp 10.244.1.10 -> 1.1.1.1" in failure
    # The messages around the refused one were processed (the second try finds nothing).
    assert again == 0
    assert entries_in(live) == []
