"""The iptables backend's incremental path (:class:`AppliedRendering`) and the conntrack
scoping that goes with it (:class:`SourceClaims`): a change costs what it changes, and its result
is exactly the full render's (sets, tables, conntrack plan)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaleg.backend import BackendError
from metaleg.firewall.claims import SourceClaims
from metaleg.firewall.conntrack import EgressView, FlushPlan, TreatmentError
from metaleg.firewall.iptables.backend import changed_tables, without_departing_stale_bindings
from metaleg.firewall.iptables.chain_diff import opcodes
from metaleg.firewall.iptables.incremental import AppliedRendering, PendingStep
from metaleg.firewall.iptables.ipsets import SetPlan, SetSpec, plan_sets
from metaleg.firewall.iptables.render import render
from metaleg.model import Action, Family, FamilyEgress, NodeDesiredState, Role, ServiceEgress
from tests.netns import namespace
from tests.test_firewall_iptables import expected_sets, expected_tables, kernel_view, run
from tests.test_nft_incremental import MASK, assert_same_plan, random_states, random_walk


def apply_plan(sets: dict[str, SetSpec], plan: SetPlan) -> dict[str, SetSpec]:
    """What the kernel's sets become when ``plan`` runs (members only: how ipset acts)."""
    result = {name: set(spec.members) for name, spec in sets.items()}
    kinds = {
        name: msgspec.structs.replace(spec, members=frozenset()) for name, spec in sets.items()
    }
    for spec in (*plan.recreate, *plan.create):
        result[spec.name] = set()
        kinds[spec.name] = spec
    for spec, members in plan.add:
        if spec.kind == "hash:ip skbinfo":  # adding an address again replaces its mark
            addresses = {member.partition(" ")[0] for member in members}
            result[spec.name] = {
                m for m in result[spec.name] if m.partition(" ")[0] not in addresses
            }
        result[spec.name] |= members
    for spec, members in plan.remove:
        result[spec.name] -= members
    for name in plan.destroy:
        del result[name]
    return {
        name: msgspec.structs.replace(kinds[name], members=frozenset(members))
        for name, members in result.items()
    }


def iptables_step(
    live: AppliedRendering, old: NodeDesiredState, new: NodeDesiredState
) -> AppliedRendering:
    """One step, checked against the full render; returns the index after it."""
    before = render(old)
    try:
        reference = render(new)
    except BackendError:
        with pytest.raises(BackendError, match="service "):
            if live.step(new) is None:
                AppliedRendering(new)
        assert live.desired() == before  # refused: nothing changed
        return live
    change = live.step(new)
    if change is None:
        keys = [(s.namespace, s.name) for s in new.services]
        assert (
            new.exclude_dst_ipv4 != old.exclude_dst_ipv4
            or keys != sorted(set(keys))
            or not live.ordered
        )
        return AppliedRendering(new, live)
    assert isinstance(change, PendingStep)
    # The plan takes the old sets exactly to the new ones ...
    assert apply_plan(before.sets, change.plan) == reference.sets
    # ... and touches no more than the full plan does.
    full = plan_sets(before.sets, reference.sets)
    assert {s.name for s, _ in change.plan.add} <= {s.name for s, _ in full.add}
    assert {s.name for s, _ in change.plan.remove} <= {s.name for s, _ in full.remove}
    assert set(change.plan.destroy) == set(full.destroy)
    assert {s.name for s in change.plan.create} == {s.name for s in full.create}
    if change.tables is None:
        assert reference.tables == before.tables
    else:
        assert change.tables == reference.tables
    if not change.unbinds:  # the backend then skips step 1 without looking
        changed = changed_tables(before.tables, reference.tables)
        assert all(
            not without_departing_stale_bindings(before.tables[f], changed[f]) for f in Family
        )
    live.commit(change)
    assert live.desired() == reference
    rebuilt = AppliedRendering(new)
    assert live.mark_owner == rebuilt.mark_owner
    assert live.mark_contenders == rebuilt.mark_contenders
    assert live.shared == rebuilt.shared  # how many Services claim each shared member
    assert live.snat_keys == rebuilt.snat_keys  # the Services the tables are built from
    assert live.services == rebuilt.services
    return live


def claims_step(claims: SourceClaims, old: NodeDesiredState, new: NodeDesiredState) -> SourceClaims:
    """One step of the conntrack scoping, checked against the views of the whole states."""
    try:
        reference = FlushPlan.between(EgressView.of(old), EgressView.of(new))
    except TreatmentError:
        with pytest.raises(TreatmentError, match="service "):
            if claims.step(new) is None:
                SourceClaims.build(new)
        return claims
    change = claims.step(new)
    if change is None:
        return SourceClaims.build(new)[0]
    assert_same_plan(change.flush, reference)
    claims.commit(change)
    rebuilt, _ = SourceClaims.build(new)
    assert claims.owner == rebuilt.owner
    assert claims.shared_sources == rebuilt.shared_sources
    assert claims.services == rebuilt.services
    return claims


def _valid(state: NodeDesiredState) -> bool:
    try:
        render(state)
        EgressView.of(state)
    except (BackendError, TreatmentError):
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(2, 12))
def test_iptables_steps_equal_the_full_render(rng: random.Random, count: int) -> None:
    states = random_walk(rng, count, _valid)
    if not states:
        return
    live = AppliedRendering(states[0])
    claims = SourceClaims.build(states[0])[0]
    for new in states[1:]:
        live = iptables_step(live, live.state, new)
        claims = claims_step(claims, claims.state, new)


def mark_service(name: str, fwmark: int, *sources: str) -> ServiceEgress:
    entry = FamilyEgress(Family.IPV4, Action.MARK, tuple(sorted(sources)), fwmark=fwmark)
    return ServiceEgress("ns", name, Role.FORWARDER, "node-b", (), (entry,))


def test_the_later_mark_service_keeps_a_shared_address_through_changes() -> None:
    def state(*services: ServiceEgress) -> NodeDesiredState:
        return NodeDesiredState("node-a", MASK, ("10.0.0.0/8",), (), services)

    states = [
        state(mark_service("a", 1 << 20, "10.244.1.1"), mark_service("c", 2 << 20, "10.244.1.1")),
        # A Service between them: c, the last, still sets the mark.
        state(
            mark_service("a", 1 << 20, "10.244.1.1"),
            mark_service("b", 3 << 20, "10.244.1.1"),
            mark_service("c", 2 << 20, "10.244.1.1"),
        ),
        # c lets go: b's mark takes over, then a's once b goes.
        state(
            mark_service("a", 1 << 20, "10.244.1.1"),
            mark_service("b", 3 << 20, "10.244.1.1"),
            mark_service("c", 2 << 20, "10.244.1.2"),
        ),
        state(mark_service("a", 1 << 20, "10.244.1.1"), mark_service("c", 2 << 20, "10.244.1.2")),
        state(),
    ]
    live = AppliedRendering(states[0])
    marks = []
    for old, new in itertools.pairwise(states):
        assert live.step(new) is not None
        live = iptables_step(live, old, new)
        marks.append(dict(live.marked[Family.IPV4]))
    assert marks == [
        {"10.244.1.1": "10.244.1.1 skbmark 0x200000/0xf00000"},
        {
            "10.244.1.1": "10.244.1.1 skbmark 0x300000/0xf00000",
            "10.244.1.2": "10.244.1.2 skbmark 0x200000/0xf00000",
        },
        {
            "10.244.1.1": "10.244.1.1 skbmark 0x100000/0xf00000",
            "10.244.1.2": "10.244.1.2 skbmark 0x200000/0xf00000",
        },
        {},
    ]


def test_a_member_change_commits_no_table() -> None:
    old = NodeDesiredState(
        "node-a", MASK, ("10.0.0.0/8",), (), (mark_service("a", 1 << 20, "10.244.1.1"),)
    )
    new = NodeDesiredState(
        "node-a",
        MASK,
        ("10.0.0.0/8",),
        (),
        (mark_service("a", 2 << 20, "10.244.1.1", "10.244.1.2"),),
    )
    change = AppliedRendering(old).step(new)
    assert change is not None
    assert change.tables is None
    # Members of the mark set only: a MARK Service has no source set of its own.
    assert [(spec.name, sorted(members)) for spec, members in change.plan.add] == [
        (
            "METALEG-MARK-4",
            ["10.244.1.1 skbmark 0x200000/0xf00000", "10.244.1.2 skbmark 0x200000/0xf00000"],
        ),
    ]
    assert change.plan.remove == ()


# --- in a namespace -----------------------------------------------------------------------


def kernel_matches(record: dict[str, Any], state: NodeDesiredState) -> None:
    assert record["error"] == ""
    assert record["v4"] == expected_tables(state, Family.IPV4)
    assert record["v6"] == expected_tables(state, Family.IPV6)
    assert kernel_view(record["sets"]) == expected_sets(state)


@pytest.mark.netns
def test_random_steps_in_the_kernel_end_as_the_full_render() -> None:
    """Applies through the incremental path leave the kernel exactly where a fresh
    render says, step after step (sets, members, marks and rules)."""
    states = random_states(20261124, 25, valid=_valid)
    with namespace("mlipinc") as ns:
        records = run(ns, *(("apply", state) for state in states))
    for record, state in zip(records, states, strict=True):
        kernel_matches(record, state)


def edit(old: list[int], new: list[int], script: list[tuple[str, int, int, int, int]]) -> list[int]:
    """Carry out opcodes, checking that they cover both sequences in order."""
    result: list[int] = []
    i = j = 0
    for tag, i1, i2, j1, j2 in script:
        assert (i1, j1) == (i, j)
        if tag == "equal":
            assert old[i1:i2] == new[j1:j2]
            result += old[i1:i2]
        else:
            result += new[j1:j2]
        i, j = i2, j2
    assert (i, j) == (len(old), len(new))
    return result


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=25), st.lists(st.integers(0, 30), max_size=25))
def test_chain_edits_turn_the_old_rules_into_the_new(old: list[int], new: list[int]) -> None:
    assert edit(old, new, opcodes(old, new)) == new


def test_inserted_rules_keep_every_other_rule_in_place() -> None:
    old = list(range(0, 300, 3))
    new = sorted({*old, 4, 151, 298})
    script = opcodes(old, new)
    assert [tag for tag, *_ in script].count("insert") == 3
    assert all(tag in ("equal", "insert") for tag, *_ in script)
    assert edit(old, new, script) == new
