"""Change tracking: after any sequence of object events, the incrementally kept state equals
the whole computation (the oracle, :func:`compute_node_state`) on the same objects."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaleg.model import Action, Role
from metaleg.watcher.cluster import ClusterState, ObjectError
from metaleg.watcher.desired import NodeSettings, compute_node_state
from metaleg.watcher.feeds import PARSERS, object_key
from metaleg.watcher.tracker import EgressTracker
from tests import cluster_objects as k
from tests.test_desired import (
    NODES,
    SETTINGS,
    _settings_dict,
    mail_service,
    node_names,
    raw_clusters,
)

KINDS = {
    "Service": "services",
    "EndpointSlice": "endpointslices",
    "Node": "nodes",
    "Pod": "pods",
    "ServiceL2Status": "servicel2statuses",
}
Item = tuple[str, str, Any]
"""(resource, key, parsed object) as the watcher hands them to the tracker."""


def parsed(objects: list[dict[str, Any]]) -> list[Item]:
    """Parse raw objects with the watcher's parsers (``feeds.PARSERS``); nameless ones skipped."""
    items: list[Item] = []
    for obj in objects:
        kind = KINDS.get(str(obj.get("kind")))
        if kind is None:
            continue
        parse, resource = PARSERS[kind]
        try:
            info = parse(obj, [])
        except ObjectError:
            continue
        items.append((resource, str(object_key(obj)), info))
    return items


def check_against_oracle(tracker: EgressTracker, previous_allocation: dict[str, int]) -> None:
    result = tracker.compute()
    cluster = ClusterState(
        services=dict(tracker.cluster.services),
        slices=dict(tracker.cluster.slices),
        nodes=dict(tracker.cluster.nodes),
        l2_statuses=dict(tracker.cluster.l2_statuses),
        pods=dict(tracker.cluster.pods),
    )
    oracle = compute_node_state(cluster, tracker.settings, previous_allocation)
    assert result.state == oracle.state
    assert result.allocation == oracle.allocation
    assert {str(p) for p in result.problems} == {str(p) for p in oracle.problems}
    assert not tracker.dirty


POD_IPS = ["10.244.1.10", "10.244.2.10", "10.244.2.11", "fd00:10:244:1::10", "198.51.100.12"]
NODE_NAMES = ["node-a", "node-b", "node-c", "ghost"]
POLICIES: list[dict[str, Any] | None] = [
    None,
    None,
    {"metaleg.de/destinationCIDRs": "192.0.2.0/24"},  # IPv6 sources take no part
    {
        "metaleg.de/destinationCIDRs": "192.0.2.1, 2001:db8::/64",
        "metaleg.de/destinationPorts": "tcp/25",
    },
    {"metaleg.de/destinationCIDRs": "not-a-cidr"},  # invalid: as if absent, with a Problem
    {"metaleg.de/destinationPorts": "udp/53,udp/54"},
]


@st.composite
def object_versions(draw: Any) -> list[dict[str, Any]]:
    """Objects with few keys and few values, so that events often modify the same object and
    Services often share sources, gateways and slots: what the tracker's indexes are for."""
    node = st.sampled_from(NODE_NAMES)
    kind = draw(st.sampled_from(["node", "service", "slice", "pod", "status"]))
    namespace = draw(st.sampled_from(["x", "x", "y"]))
    name = draw(st.sampled_from(["a", "b"]))
    if kind == "node":
        ipv4 = draw(st.sampled_from([None, "198.51.100.11", "198.51.100.12"]))
        cidrs = draw(st.sampled_from([(), ("10.244.1.0/24",), ("10.244.2.0/24", "fd00::/8")]))
        return [k.node(draw(node), ipv4, draw(st.sampled_from([None, "2001:db8::1"])), cidrs)]
    if kind == "service":
        lb = draw(st.sampled_from([(), ("198.51.100.200",), ("198.51.100.200", "2001:db8::2")]))
        policy = draw(st.sampled_from(POLICIES))
        labelled = draw(st.sampled_from([True, True, False]))
        return [k.service(namespace, name, lb, labelled, annotations=policy)]
    if kind == "slice":
        family = draw(st.sampled_from(["IPv4", "IPv6"]))
        endpoints = draw(
            st.lists(st.tuples(st.sampled_from(POD_IPS), st.one_of(st.none(), node)), max_size=3)
        )
        return [
            k.endpoint_slice(
                namespace, f"{name}-{draw(st.integers(0, 1))}", name, family, endpoints
            )
        ]
    if kind == "pod":
        ips = tuple(draw(st.lists(st.sampled_from(POD_IPS), max_size=2, unique=True)))
        return [
            k.pod(
                namespace,
                f"pod-{draw(st.integers(0, 3))}",
                draw(node),
                ips,
                {"app": name},
                host_network=draw(st.sampled_from([False, False, True])),
                phase=draw(st.sampled_from(["Running", "Running", "Succeeded"])),
                host_ips=draw(st.sampled_from([(), ("198.51.100.11",), ("10.244.2.11",)])),
            )
        ]
    status_namespace = draw(st.sampled_from(["metallb-system", "metallb-system", "other"]))
    return [
        k.l2_status(
            status_namespace,
            f"l2-{namespace}-{name}-{draw(st.integers(0, 1))}",
            namespace,
            name,
            draw(st.one_of(st.none(), node)),
        )
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(object_versions(), min_size=8, max_size=40).map(lambda x: [o for os in x for o in os]),
    st.lists(object_versions(), min_size=8, max_size=40).map(lambda x: [o for os in x for o in os]),
    st.sampled_from(NODE_NAMES),
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 200), st.booleans(), st.booleans()), max_size=60),
)
def test_random_event_sequences_equal_the_whole_computation(
    first: list[dict[str, Any]],
    second: list[dict[str, Any]],
    this_node: str,
    filter_endpoints: bool,
    operations: list[tuple[int, bool, bool]],
) -> None:
    run_sequence(first, second, this_node, filter_endpoints, operations)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw_clusters(),
    raw_clusters(),
    node_names,
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 200), st.booleans(), st.booleans()), max_size=40),
)
def test_random_events_of_broken_objects_equal_the_whole_computation(
    first: list[dict[str, Any]],
    second: list[dict[str, Any]],
    this_node: str,
    filter_endpoints: bool,
    operations: list[tuple[int, bool, bool]],
) -> None:
    run_sequence(first, second, this_node, filter_endpoints, operations)


def run_sequence(
    first: list[dict[str, Any]],
    second: list[dict[str, Any]],
    this_node: str,
    filter_endpoints: bool,
    operations: list[tuple[int, bool, bool]],
) -> None:
    settings_ = NodeSettings(
        **{
            **_settings_dict(),
            "node_name": this_node,
            "filter_endpoints_for_node": filter_endpoints,
        }
    )
    # Two versions of a small cluster: objects of the same key in both are modifications.
    pool = parsed(first) + parsed(second)
    tracker = EgressTracker(settings_)
    previous: dict[str, int] = {}
    for resource, key, info in parsed(first):
        tracker.upsert(resource, key, info)
    check_against_oracle(tracker, previous)
    previous = tracker.compute().allocation
    for index, delete, compute in operations:
        if not pool:
            break
        resource, key, info = pool[index % len(pool)]
        if delete:
            tracker.delete(resource, key)
        else:
            tracker.upsert(resource, key, info)
        if compute:  # several events between computations: a coalesced burst
            check_against_oracle(tracker, previous)
            previous = tracker.compute().allocation
    check_against_oracle(tracker, previous)


def test_an_equal_object_causes_no_work_and_unchanged_services_are_shared() -> None:
    tracker = EgressTracker(SETTINGS)
    for resource, key, info in parsed([*NODES, *mail_service("node-a")]):
        tracker.upsert(resource, key, info)
    other = [
        k.service("web", "front", ("198.51.100.201",)),
        k.endpoint_slice("web", "front-1", "front", "IPv4", [("10.244.1.50", "node-a")]),
        k.l2_status("metallb-system", "l2-front", "web", "front", "node-b"),
    ]
    for resource, key, info in parsed(other):
        tracker.upsert(resource, key, info)
    before = tracker.compute()
    assert before.changed == ("mail/relay", "web/front")
    # The same object again (a relist, a resync of the informer): nothing to do.
    for resource, key, info in parsed([copy.deepcopy(other[1])]):
        assert not tracker.upsert(resource, key, info)
    assert not tracker.dirty
    # A change of one Service's endpoints recomputes that Service only.
    for resource, key, info in parsed(
        [k.endpoint_slice("web", "front-1", "front", "IPv4", [("10.244.1.51", "node-a")])]
    ):
        assert tracker.upsert(resource, key, info)
    after = tracker.compute()
    assert after.changed == ("web/front",)
    assert after.state.services[0] is before.state.services[0]
    assert after.state.services[1].families[0].source_ips == ("10.244.1.51",)
    assert after.state.services[1].families[0].action == Action.MARK


def test_a_gateway_move_and_a_removed_label() -> None:
    tracker = EgressTracker(SETTINGS)
    for resource, key, info in parsed([*NODES, *mail_service("node-b")]):
        tracker.upsert(resource, key, info)
    assert tracker.compute().state.services[0].role == Role.FORWARDER
    for resource, key, info in parsed(
        [k.l2_status("metallb-system", "l2-relay", "mail", "relay", "node-a")]
    ):
        tracker.upsert(resource, key, info)
    result = tracker.compute()
    assert result.state.services[0].role == Role.GATEWAY and result.state.routes == ()
    for resource, key, info in parsed(
        [k.service("mail", "relay", ("198.51.100.200",), labelled=False)]
    ):
        tracker.upsert(resource, key, info)
    result = tracker.compute()
    assert result.state.services == () and result.changed == ("mail/relay",)


def test_a_freed_slot_goes_to_the_gateway_that_had_none() -> None:
    settings_ = NodeSettings(**{**_settings_dict(), "fwmask": 0x00100000})  # one slot
    tracker = EgressTracker(settings_)
    objects: list[dict[str, Any]] = [*NODES]
    for name, gateway, ip in (("s1", "node-b", "10.244.1.10"), ("s2", "node-c", "10.244.1.11")):
        objects.append(k.service("ns", name, ("198.51.100.200",)))
        objects.append(k.endpoint_slice("ns", name, name, "IPv4", [(ip, "node-a")]))
        objects.append(k.l2_status("metallb-system", f"l2-{name}", "ns", name, gateway))
    for resource, key, info in parsed(objects):
        tracker.upsert(resource, key, info)
    first = tracker.compute()
    actions = sorted(s.families[0].action for s in first.state.services)
    assert actions == [Action.MARK, Action.REJECT]
    holder = next(s for s in first.state.services if s.families[0].action == Action.MARK)
    tracker.delete("services", holder.key)
    second = tracker.compute()
    (remaining,) = second.state.services
    assert remaining.families[0].action == Action.MARK
    check_against_oracle(tracker, first.allocation)
