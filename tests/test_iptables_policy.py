"""Destination policies in the iptables backend (:mod:`metaleg.firewall.iptables.policy`).

Pure tests check the rendered layout, the rule count and that every incremental step
equals the full render; kernel tests send traffic through a dual-stack namespace
topology (pod -- node with the backend -- two internet hosts) and look at the source
address the hosts see: the LB IP (SNATed here), the pod IP (marked: routed by policy
straight to the host), the node's IP (its masquerade: the normal path) or a refusal.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import subprocess
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaleg.backend import BackendError
from metaleg.firewall.iptables.backend import IptablesBackend
from metaleg.firewall.iptables.drift import IptablesDriftCheck
from metaleg.firewall.iptables.incremental import AppliedRendering
from metaleg.firewall.iptables.ipsets import HASH_IP_PORT_KIND, SetPlan, SetSpec, plan_sets
from metaleg.firewall.iptables.render import render
from metaleg.firewall.iptables.rules import (
    STRAY_CHAIN,
    UNCOVERED_CHAIN,
    policy_set_names,
    port_set_name,
    port_source_set_name,
)
from metaleg.firewall.wire.ipset_ports import parse_port_member, port_member, port_runs
from metaleg.model import Family, FamilyEgress, NodeDesiredState, ServiceEgress
from metaleg.watcher.destinations import parse_ports
from tests.netns import namespace, run_in_netns, sh
from tests.packet_harness import (
    WHO_AM_I_SERVER,
    forward,
    link,
    masquerade,
    route,
    route_marked,
    script_in,
    udp_probe,
)
from tests.test_firewall_iptables import (
    LOST,
    MAIL,
    WEB,
    apply_state,
    dump_sets,
    dump_tables,
    expected_tables,
    mark,
    node_state,
    reject,
    rules_by_chain,
    run,
    service,
    snat,
)
from tests.test_nft_incremental import random_walk

LISTED4, LISTED6 = "203.0.113.10", "2001:db8:113::10"
OTHER4, OTHER6 = "203.0.113.20", "2001:db8:113::20"
NODE4, NODE6 = "203.0.113.1", "2001:db8:113::1"
POD4, POD6 = "10.244.2.10", "fd00:244:2::10"
LB4, LB6 = "192.0.2.10", "2001:db8:2::10"


def policed(
    svc: ServiceEgress, destinations: dict[Family, tuple[str, ...]], ports: str = ""
) -> ServiceEgress:
    """``svc`` with destination networks per family and ``metaleg.de/destinationPorts``."""
    families = tuple(
        msgspec.structs.replace(entry, destinations=destinations.get(entry.family, ()))
        for entry in svc.families
    )
    return msgspec.structs.replace(
        svc, families=families, destination_ports=parse_ports(ports) if ports else ()
    )


# --------------------------------------------------------------------------
# Pure: layout, rule count, claims
# --------------------------------------------------------------------------


def test_uncovered_traffic_leaves_every_chain_right_after_the_exclusion() -> None:
    mail = policed(MAIL, {Family.IPV4: ("198.51.100.0/24",)}, "tcp/25")
    web = policed(WEB, {Family.IPV4: ("198.51.100.0/24",)})
    state = node_state(mail, web, LOST, transit4=("10.244.9.0/24",))
    dst_sources, dst_networks = policy_set_names(Family.IPV4, ("198.51.100.0/24",))
    by_class = f"-m set --match-set {dst_sources} src -m set ! --match-set {dst_networks} dst"
    by_port = (
        "-m set --match-set METALEG-PORTSRC-4 src -m set ! --match-set METALEG-PORTS-4 src,dst"
    )
    v4 = rules_by_chain(render(state), Family.IPV4)
    exclude = "-m set --match-set METALEG-EXCLUDE-DST-4 dst -j RETURN"
    assert v4["mangle"]["METALEG-RT-MARK"][:3] == [
        exclude,
        f"{by_class} -j RETURN",
        f"{by_port} -j RETURN",
    ]
    assert v4["nat"]["METALEG-SNAT"][:3] == [
        exclude,
        f"{by_class} -j RETURN",
        f"{by_port} -j RETURN",
    ]
    reject_chain = v4["filter"]["METALEG-REJECT"]
    at = reject_chain.index(exclude)
    assert all(rule.endswith(f"-j {STRAY_CHAIN}") for rule in reject_chain[:at])
    assert reject_chain[at + 1 : at + 3] == [
        f"{by_class} -g {UNCOVERED_CHAIN}",
        f"{by_port} -g {UNCOVERED_CHAIN}",
    ]
    # Uncovered traffic of another node's pod is guarded as an unlabelled pod's is.
    assert v4["filter"][UNCOVERED_CHAIN] == [
        "-m conntrack --ctstate NEW -m set --match-set METALEG-TRANSIT-4 src "
        "-j REJECT --reject-with icmp-port-unreachable"
    ]
    # A stray reply is dropped only from a peer the policy covers.
    assert v4["filter"][STRAY_CHAIN] == [
        f"-m set --match-set {dst_sources} dst -m set ! --match-set {dst_networks} src -j RETURN",
        "-m set --match-set METALEG-PORTSRC-4 dst -m set ! --match-set METALEG-PORTS-4 dst,src "
        "-j RETURN",
        "-j DROP",
    ]
    sets = render(state).sets
    assert sets[dst_sources].members == {"10.244.1.5", "10.244.1.6", "10.244.1.7"}
    assert sets[dst_networks].members == {"198.51.100.0/24"}
    assert sets["METALEG-PORTSRC-4"].members == {"10.244.1.5"}
    assert sets["METALEG-PORTS-4"].members == {"10.244.1.5,tcp:25"}
    # IPv6: MAIL's ports apply to every family; no destinations there, so no class.
    v6 = rules_by_chain(render(state), Family.IPV6)
    assert not any("DSTSRC" in rule for chain in v6["filter"].values() for rule in chain)
    assert sets["METALEG-PORTS-6"].members == {"fd00:244::5,tcp:25"}


def test_without_policies_the_layout_is_unchanged() -> None:
    state = node_state(MAIL, WEB, LOST)
    for family in Family:
        filter_chains = rules_by_chain(render(state), family)["filter"]
        assert set(filter_chains) == {"FORWARD", "METALEG-REJECT"}
        assert all(rule.endswith("-j DROP") for rule in filter_chains["METALEG-REJECT"][:3])


def rule_count(state: NodeDesiredState) -> int:
    desired = render(state)
    return sum(
        len(rules)
        for family in Family
        for spec in desired.tables[family].values()
        for rules in (*spec.chains.values(), *spec.heads.values())
    )


def many(count: int, destinations: dict[Family, tuple[str, ...]], ports: str) -> NodeDesiredState:
    """``count`` MARK and REJECT Services of one source each, all with the given policy."""
    services = []
    for index in range(count):
        entries = (
            mark(Family.IPV4, (f"10.244.{index // 200}.{index % 200 + 1}",)),
            mark(Family.IPV6, (f"fd00:244::{index + 1:x}",)),
        )
        if index % 2:
            entries = (
                reject(Family.IPV4, (f"10.244.{index // 200}.{index % 200 + 1}",)),
                reject(Family.IPV6, (f"fd00:244::{index + 1:x}",)),
            )
        services.append(policed(service("ns", f"s{index:04}", *entries), destinations, ports))
    return node_state(*services, transit4=("10.250.0.0/16",))


def test_rule_count_does_not_grow_with_the_services_that_carry_policies() -> None:
    destinations = {
        Family.IPV4: ("198.51.100.0/24", "203.0.113.25/32"),
        Family.IPV6: ("2001:db8::/32",),
    }
    one = rule_count(many(2, destinations, "tcp/25, udp/53"))  # one MARK, one REJECT Service
    assert rule_count(many(10, destinations, "tcp/25, udp/53")) == one
    assert rule_count(many(400, destinations, "tcp/25, tcp/8000-8100")) == one
    # Per family, policies add one rule per chain for ports and one per distinct list of
    # destination networks (a class), shared by every Service with that list; here (no SNAT
    # Service, so nothing in nat) in mangle, METALEG-REJECT and METALEG-STRAY (with its
    # DROP), and IPv4's METALEG-UNCOVERED holds the transit guard's REJECT.
    unpoliced = rule_count(many(400, {}, ""))
    assert one - unpoliced == 2 * (2 + 2 + 2 + 1) + 1
    other = {Family.IPV4: ("198.51.100.0/24",)}
    mixed = many(400, destinations, "tcp/25")
    half = msgspec.structs.replace(
        mixed,
        services=tuple(
            policed(s, other, "tcp/25") if i % 4 else s for i, s in enumerate(mixed.services)
        ),
    )
    assert rule_count(half) == one + 3  # IPv4's second class: one rule in each of 3 chains
    assert render(many(400, destinations, "tcp/8000-8100")).sets["METALEG-PORTS-4"].members >= {
        "10.244.0.1,tcp:8000-8100"
    }


def test_a_source_of_several_services_is_policed_only_as_far_as_all_of_them() -> None:
    def state(*services: ServiceEgress) -> NodeDesiredState:
        return node_state(*services)

    a = policed(
        service("ns", "a", mark(Family.IPV4, ("10.244.1.1",))),
        {Family.IPV4: ("198.51.100.0/25",)},
        "tcp/25",
    )
    b = policed(
        service("ns", "b", reject(Family.IPV4, ("10.244.1.1",))),
        {Family.IPV4: ("198.51.100.128/25",)},
        "tcp/26",
    )
    c = service("ns", "c", reject(Family.IPV4, ("10.244.1.1",)))
    both = render(state(a, b)).sets
    union_sources, union_networks = policy_set_names(Family.IPV4, ("198.51.100.0/24",))
    assert both[union_networks].members == {"198.51.100.0/24"}  # collapsed
    assert both[union_sources].members == {"10.244.1.1"}
    assert both["METALEG-PORTS-4"].members == {"10.244.1.1,tcp:25-26"}
    # One Service without a policy: every destination and port of the source is treated.
    assert not [
        name for name in render(state(a, b, c)).sets if "DST" in name and "EXCLUDE" not in name
    ]
    assert "METALEG-PORTS-4" not in render(state(a, c)).sets


def test_invalid_policy_data_names_the_service() -> None:
    bad = policed(MAIL, {Family.IPV4: ("2001:db8::/32",)})
    with pytest.raises(BackendError, match="service default/mail IPv4: destination 2001:db8::/32"):
        render(node_state(bad))


# --------------------------------------------------------------------------
# Pure: every step equals the full render
# --------------------------------------------------------------------------

DESTINATIONS = {
    Family.IPV4: ["198.51.100.0/24", "198.51.100.7/32", "203.0.113.0/25", "0.0.0.0/0"],
    Family.IPV6: ["2001:db8:9::/48", "2001:db8:9::1/128", "::/0"],
}
PORTS = ["tcp/25", "tcp/8000-8003", "udp/53", "tcp/24-26", "sctp/9"]


def draw_policy(rng: random.Random, svc: ServiceEgress) -> ServiceEgress:
    destinations = {
        family: tuple(sorted(rng.sample(pool, rng.randint(1, 2))))
        for family, pool in DESTINATIONS.items()
        if rng.random() < 0.5
    }
    ports = ", ".join(rng.sample(PORTS, rng.randint(1, 3))) if rng.random() < 0.4 else ""
    return policed(svc, destinations, ports)


def with_policies(rng: random.Random, states: list[NodeDesiredState]) -> list[NodeDesiredState]:
    """The states with a policy drawn for each Service whenever it changes (an unchanged
    Service stays the same object, as in a change applied to the state before)."""
    seen: dict[int, tuple[ServiceEgress, ServiceEgress]] = {}
    result = []
    for state in states:
        services = []
        for svc in state.services:
            known = seen.get(id(svc))
            if known is None or known[0] is not svc:
                known = seen[id(svc)] = (svc, draw_policy(rng, svc))
            services.append(known[1])
        result.append(msgspec.structs.replace(state, services=tuple(services)))
    return result


def expanded(sets: dict[str, SetSpec]) -> dict[str, SetSpec]:
    """The sets with every port run as its single ports (what the kernel holds)."""
    return {
        name: msgspec.structs.replace(spec, members=frozenset(single_ports(spec.members)))
        if spec.kind == HASH_IP_PORT_KIND
        else spec
        for name, spec in sets.items()
    }


def single_ports(members: frozenset[str]) -> Iterator[str]:
    for member in members:
        address, protocol, first, last = parse_port_member(member)
        for port in range(first, last + 1):
            yield port_member(address, protocol, port, port)


def carried_out(sets: dict[str, SetSpec], plan: SetPlan) -> dict[str, SetSpec]:
    """What the kernel's sets become when ``plan`` runs (ports expanded, as the kernel does)."""
    result = {name: set(spec.members) for name, spec in expanded(sets).items()}
    layouts = {
        name: msgspec.structs.replace(spec, members=frozenset()) for name, spec in sets.items()
    }
    for spec in (*plan.recreate, *plan.create):
        result[spec.name], layouts[spec.name] = set(), spec
    for spec, members in plan.add:
        if spec.kind == "hash:ip skbinfo":
            addresses = {member.partition(" ")[0] for member in members}
            result[spec.name] = {
                m for m in result[spec.name] if m.partition(" ")[0] not in addresses
            }
        result[spec.name] |= (
            set(single_ports(members)) if spec.kind == HASH_IP_PORT_KIND else members
        )
    for spec, members in plan.remove:
        result[spec.name] -= (
            set(single_ports(members)) if spec.kind == HASH_IP_PORT_KIND else members
        )
    for name in plan.destroy:
        del result[name]
    return {
        name: msgspec.structs.replace(layouts[name], members=frozenset(members))
        for name, members in result.items()
    }


def policy_step(live: AppliedRendering, new: NodeDesiredState) -> AppliedRendering:
    """One step, checked against the full render; returns the rendering after it."""
    before = live.desired()
    try:
        reference = render(new)
    except BackendError:
        with pytest.raises(BackendError):
            if live.step(new) is None:
                AppliedRendering(new)
        assert live.desired() == before
        return live
    change = live.step(new)
    if change is None:
        return AppliedRendering(new, live)
    assert carried_out(before.sets, change.plan) == expanded(reference.sets)
    full = plan_sets(before.sets, reference.sets)
    assert set(change.plan.destroy) == set(full.destroy)
    assert {s.name for s in change.plan.create} == {s.name for s in full.create}
    # A source is never policed before its policy's members are there, nor after they go.
    narrowing = [spec.narrows for spec, _ in change.plan.add]
    assert narrowing == sorted(narrowing)
    widening = [not spec.narrows for spec, _ in change.plan.remove]
    assert widening == sorted(widening)
    assert (change.tables or before.tables) == reference.tables
    live.commit(change)
    assert live.desired() == reference
    rebuilt = AppliedRendering(new)
    for family in Family:
        mine, theirs = live.policies.families[family], rebuilt.policies.families[family]
        assert mine.claims == theirs.claims
        assert mine.policed == theirs.policed
        assert mine.effective == theirs.effective
        assert mine.class_sizes == theirs.class_sizes
        assert mine.port_sources == theirs.port_sources
    return live


def valid(state: NodeDesiredState) -> bool:
    try:
        render(state)
    except BackendError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(2, 12))
def test_steps_with_policies_equal_the_full_render(rng: random.Random, count: int) -> None:
    states = with_policies(rng, random_walk(rng, count, lambda state: True))
    while states and not valid(states[0]):
        states.pop(0)
    if not states:
        return
    live = AppliedRendering(states[0])
    for new in states[1:]:
        live = policy_step(live, new)


def test_a_policy_change_of_one_source_changes_members_only() -> None:
    old = node_state(policed(WEB, {Family.IPV4: ("198.51.100.0/24",)}, "tcp/25"), LOST)
    new = node_state(policed(WEB, {Family.IPV4: ("198.51.100.0/24",)}, "tcp/25-27"), LOST)
    change = AppliedRendering(old).step(new)
    assert change is not None and change.tables is None
    ports = port_set_name(Family.IPV4)
    assert [(spec.name, sorted(members)) for spec, members in change.plan.add] == [
        (ports, ["10.244.1.6,tcp:26-27", "10.244.1.7,tcp:26-27"]),
        (port_set_name(Family.IPV6), ["fd00:244::6,tcp:26-27"]),
    ]
    assert change.plan.remove == ()
    assert port_source_set_name(Family.IPV4) not in {spec.name for spec, _ in change.plan.add}


# --------------------------------------------------------------------------
# Kernel: sets and rules
# --------------------------------------------------------------------------


def kernel_sets(ns: str) -> dict[str, tuple[str, str, set[str]]]:
    """The kernel's sets as :func:`expected_sets` writes them (port elements as runs)."""
    sets = run_in_netns(ns, dump_sets)
    return {
        name: (kind, family, set(port_runs(members)) if kind == HASH_IP_PORT_KIND else members)
        for name, (kind, family, members, _) in sets.items()
    }


def expected(state: NodeDesiredState) -> dict[str, tuple[str, str, set[str]]]:
    return {
        name: (spec.kind, "inet" if spec.family is Family.IPV4 else "inet6", set(spec.members))
        for name, spec in render(state).sets.items()
    }


@pytest.mark.netns
def test_random_steps_with_policies_in_the_kernel_end_as_the_full_render() -> None:
    rng = random.Random(20261205)
    states = [s for s in with_policies(rng, random_walk(rng, 40, lambda state: True)) if valid(s)]
    # Then every policy goes (their sets, rules and chains with them), and comes back.
    unpoliced = msgspec.structs.replace(
        states[19], services=tuple(policed(svc, {}) for svc in states[19].services)
    )
    states = [*states[:20], unpoliced, states[19]]
    with namespace("mlippol") as ns:
        records = run(ns, *(("apply", state) for state in states))
        final = kernel_sets(ns)
    for record, state in zip(records, states, strict=True):
        assert record["error"] == ""
        assert record["v4"] == expected_tables(state, Family.IPV4)
        assert record["v6"] == expected_tables(state, Family.IPV6)
    assert final == expected(states[-1])
    assert set(records[-2]["v4"]["filter"]) == {"FORWARD", "METALEG-REJECT"}
    assert not [name for name in records[-2]["sets"] if "DSTSRC" in name or "PORT" in name]


def delete_policy_members_and_check_drift(state: NodeDesiredState) -> list[str]:
    """Apply, then delete a policy member and a policy rule as someone else would: what the
    drift check finds, and what a re-sync repairs."""
    backend = IptablesBackend()
    check = IptablesDriftCheck()
    try:
        backend.apply(state)
        check.rebaseline()
        sources, _ = policy_set_names(Family.IPV4, ("203.0.113.10/32",))
        subprocess.run(["ipset", "del", sources, POD4], check=True)
        subprocess.run(["ipset", "del", "METALEG-PORTS-6", f"{POD6},tcp:8081"], check=True)
        found = [drift.detail for drift in check.check()]
        subprocess.run(["iptables-legacy", "-t", "filter", "-F", UNCOVERED_CHAIN], check=True)
        found += [drift.detail for drift in check.check()]
        backend.resync(state)
        return [*found, *backend.last_changes]
    finally:
        check.close()
        backend.close()


@pytest.mark.netns
def test_a_resync_repairs_deleted_policy_members_and_rules() -> None:
    state = dual_state("snat", {Family.IPV4: (LISTED4,)}, "tcp/8080-8081", transit=True)
    with namespace("mlippol") as ns:
        found = run_in_netns(ns, delete_policy_members_and_check_drift, state)
        assert kernel_sets(ns) == expected(state)
        tables = run_in_netns(ns, dump_tables, 4)
    sources, _ = policy_set_names(Family.IPV4, (f"{LISTED4}/32",))
    assert f"ipset {sources}: +1" in found
    assert "ipset METALEG-PORTS-6: +1" in found
    assert any(sources in detail for detail in found)  # the drift check saw the member go
    assert any(UNCOVERED_CHAIN in detail for detail in found)
    assert tables == expected_tables(state, Family.IPV4)


def old_sets_then_apply(state: NodeDesiredState) -> tuple[str, dict[str, Any]]:
    """Sets of an older metaleg (no counters), used by its rules; then this version applies."""
    for command in (
        "ipset create METALEG-REJECTED-4 hash:ip",
        "ipset add METALEG-REJECTED-4 10.244.1.8",
        "ipset add METALEG-REJECTED-4 10.244.1.99",
        "iptables-legacy -N METALEG-REJECT",
        "iptables-legacy -A FORWARD -j METALEG-REJECT",
        "iptables-legacy -A METALEG-REJECT -m set --match-set METALEG-REJECTED-4 src -j REJECT",
    ):
        subprocess.run(command.split(), check=True)
    backend = IptablesBackend()
    try:
        backend.apply(state)
        return " ".join(backend.last_changes), dump_sets()
    finally:
        backend.close()


@pytest.mark.netns
def test_sets_of_an_older_version_get_their_counters_in_place() -> None:
    state = node_state(MAIL, WEB, LOST)
    with namespace("mlippol") as ns:
        changes, sets = run_in_netns(ns, old_sets_then_apply, state)
        header = sh("ipset", "list", "-t", "METALEG-REJECTED-4", netns=ns)
    assert "ipset METALEG-REJECTED-4: recreate" in changes
    assert "counters" in header
    assert sets["METALEG-REJECTED-4"][2] == {"10.244.1.8"}
    assert not [name for name in sets if name.startswith("METALEG-TMP-")]


# --------------------------------------------------------------------------
# Kernel: packets
# --------------------------------------------------------------------------


def wire_dual_stack(node: str, pod: str, hosts: str) -> None:
    """pod 10.244.2.10, fd00:244:2::10 -- node (forwarding, the backend; its masquerade is
    the normal path) -- hosts 203.0.113.10/.20, 2001:db8:113::10/::20.

    The hosts route the pod networks and the LB IPs back via the node; the node routes
    marked packets (gateway slot 0x100000, as towards a gateway) straight to the first
    host, so that a marked packet arrives there with the pod's address.
    """
    link(node, "to-pod", ("10.244.2.1/24", "fd00:244:2::1/64"), pod, (f"{POD4}/24", f"{POD6}/64"))
    hosts_cidrs = (f"{LISTED4}/24", f"{OTHER4}/24", f"{LISTED6}/64", f"{OTHER6}/64")
    link(node, "to-hosts", (f"{NODE4}/24", f"{NODE6}/64"), hosts, hosts_cidrs)
    route(pod, "default", "10.244.2.1")
    route(pod, "default", "fd00:244:2::1")
    for network in ("10.244.2.0/24", f"{LB4}/32"):
        route(hosts, network, NODE4)
    for network in ("fd00:244:2::/64", f"{LB6}/128"):
        route(hosts, network, NODE6)
    forward(node)
    masquerade(node, "10.244.0.0/16", "10.244.0.0/16", "legacy")
    masquerade(node, "fd00:244::/32", "fd00:244::/32", "legacy")
    route_marked(node, "default", "via", LISTED4)
    sh("ip", "-n", node, "-6", "rule", "add", "fwmark", "0x100000/0xf00000", "lookup", "100")
    route(node, "default", LISTED6, "table", "100")


def dual_state(
    action: str, destinations: dict[Family, tuple[str, ...]], ports: str = "", transit: bool = False
) -> NodeDesiredState:
    """The pod as the one source of a Service with ``action`` in both families."""
    entries: tuple[FamilyEgress, ...]
    if action == "snat":
        entries = (snat(Family.IPV4, (POD4,), LB4), snat(Family.IPV6, (POD6,), LB6))
    elif action == "mark":
        entries = (mark(Family.IPV4, (POD4,)), mark(Family.IPV6, (POD6,)))
    else:
        entries = (reject(Family.IPV4, (POD4,)), reject(Family.IPV6, (POD6,)))
    svc = policed(service("mail", "relay", *entries), destinations, ports)
    return node_state(svc, transit4=("10.250.0.0/16",) if transit else ())


class Topology(NamedTuple):
    node: str
    pod: str
    hosts: str

    def seen(self, destination: str) -> str:
        """The source the host at ``destination`` sees for a new flow of the pod (UDP to
        port 9999, from a port not used before), ``rejected:ECONNREFUSED`` when rejected."""
        source = POD6 if ":" in destination else POD4
        return run_in_netns(self.pod, udp_probe, source, destination, next(SOURCE_PORTS))


SOURCE_PORTS = itertools.count(20000)


@contextlib.contextmanager
def dual_stack_topology(prefix: str) -> Iterator[Topology]:
    """Node, pod and hosts namespaces (``<prefix>n``, ``<prefix>p``, ``<prefix>h``) wired by
    :func:`wire_dual_stack`, the hosts answering who-am-I on every address."""
    with (
        namespace(f"{prefix}n") as node,
        namespace(f"{prefix}p") as pod,
        namespace(f"{prefix}h") as hosts,
    ):
        wire_dual_stack(node, pod, hosts)
        addresses = (LISTED4, OTHER4, LISTED6, OTHER6)
        with script_in(hosts, WHO_AM_I_SERVER, *addresses, ready_line=True):
            yield Topology(node, pod, hosts)


@pytest.fixture
def topology() -> Iterator[Topology]:
    with dual_stack_topology("mlp") as topology:
        yield topology


LISTED = {Family.IPV4: (LISTED4,), Family.IPV6: (LISTED6,)}


@pytest.mark.netns
def test_packets_only_the_listed_destinations_take_the_lb_ip(topology: Topology) -> None:
    node, seen = topology.node, topology.seen
    refused = "rejected:ECONNREFUSED"
    # Gateway: SNAT to the LB IP for the listed hosts; the node's masquerade for the others.
    run_in_netns(node, apply_state, dual_state("snat", LISTED))
    assert [seen(LISTED4), seen(OTHER4), seen(LISTED6), seen(OTHER6)] == [LB4, NODE4, LB6, NODE6]
    # With ports: the listed port of a listed host is treated, another port is not.
    run_in_netns(node, apply_state, dual_state("snat", LISTED, "udp/9999, tcp/25"))
    assert [seen(LISTED4), seen(OTHER4), seen(LISTED6)] == [LB4, NODE4, LB6]
    run_in_netns(node, apply_state, dual_state("snat", LISTED, "udp/9998, tcp/9999"))
    assert [seen(LISTED4), seen(LISTED6)] == [NODE4, NODE6]
    # Forwarder: marked (routed by policy, with the pod's own address) for the listed only.
    run_in_netns(node, apply_state, dual_state("mark", LISTED))
    assert [seen(LISTED4), seen(OTHER4), seen(LISTED6), seen(OTHER6)] == [POD4, NODE4, POD6, NODE6]
    # No usable gateway: only the listed hosts (and ports) are rejected.
    run_in_netns(node, apply_state, dual_state("reject", LISTED, "udp/9999", transit=True))
    assert [seen(LISTED4), seen(OTHER4), seen(LISTED6), seen(OTHER6)] == [
        refused,
        NODE4,
        refused,
        NODE6,
    ]
    run_in_netns(node, apply_state, dual_state("reject", LISTED, "udp/1-9998", transit=True))
    assert [seen(LISTED4), seen(LISTED6)] == [NODE4, NODE6]
    # The policy removed: everything takes the LB IP again.
    run_in_netns(node, apply_state, dual_state("snat", {}))
    assert [seen(LISTED4), seen(OTHER4), seen(LISTED6), seen(OTHER6)] == [LB4, LB4, LB6, LB6]


@pytest.mark.netns
def test_packets_excluded_destinations_still_win(topology: Topology) -> None:
    state = dual_state("reject", LISTED)
    excluded = msgspec.structs.replace(state, exclude_dst_ipv4=(f"{LISTED4}/32",))
    run_in_netns(topology.node, apply_state, excluded)
    assert topology.seen(LISTED4) == NODE4  # neither rejected nor treated: excluded
    assert topology.seen(LISTED6) == "rejected:ECONNREFUSED"
