"""The pure desired-state function: reference semantics by example and by generated clusters."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from metaleg.model import Action, Family, Role, fwmask_capacity
from metaleg.watcher.allocation import allocate_slots, preferred_slot
from metaleg.watcher.cluster import (
    ClusterState,
    ObjectError,
    Problem,
    parse_endpoint_slice,
    parse_l2_status,
    parse_node,
    parse_pod,
    parse_service,
)
from metaleg.watcher.desired import NodeSettings, compute_node_state
from tests import cluster_objects as k

MASK = 0x00F00000
SETTINGS = NodeSettings(
    node_name="node-a",
    metallb_namespace="metallb-system",
    filter_endpoints_for_node=True,
    fwmask=MASK,
    route_table_id_offset=100000,
    exclude_dst_ipv4=("10.0.0.0/8",),
    exclude_dst_ipv6=("fc00::/7",),
)


def cluster_of(*objects: dict[str, Any]) -> ClusterState:
    """Parse raw objects into a ClusterState the way the watcher does (bad objects skipped)."""
    state = ClusterState()
    problems: list[Problem] = []
    for obj in objects:
        kind = obj.get("kind")
        try:
            if kind == "Service":
                info = parse_service(obj, problems)
                state.services[f"{info.namespace}/{info.name}"] = info
            elif kind == "EndpointSlice":
                sl = parse_endpoint_slice(obj, problems)
                state.slices[f"{sl.namespace}/{sl.name}"] = sl
            elif kind == "Node":
                n = parse_node(obj, problems)
                state.nodes[n.name] = n
            elif kind == "Pod":
                pod = parse_pod(obj, problems)
                state.pods[f"{pod.namespace}/{pod.name}"] = pod
            elif kind == "ServiceL2Status":
                st_ = parse_l2_status(obj, problems)
                state.l2_statuses[f"{st_.namespace}/{st_.name}"] = st_
        except ObjectError:
            continue
    return state


NODES = (
    k.node("node-a", "198.51.100.11", "2001:db8:1::11"),
    k.node("node-b", "198.51.100.12", "2001:db8:1::12"),
    k.node("node-c", "198.51.100.13"),
)


def mail_service(
    gateway: str | None, lb: tuple[str, ...] = ("198.51.100.200", "2001:db8:1::200")
) -> list[dict[str, Any]]:
    return [
        k.service("mail", "relay", lb),
        k.endpoint_slice(
            "mail",
            "relay-v4",
            "relay",
            "IPv4",
            [("10.244.1.10", "node-a"), ("10.244.2.10", "node-b"), ("10.244.3.10", "node-c")],
        ),
        k.endpoint_slice(
            "mail", "relay-v6", "relay", "IPv6", [("fd00:10:244:1::10", "node-a")], ready=False
        ),
        k.l2_status("metallb-system", "l2-relay", "mail", "relay", gateway),
    ]


def test_gateway_node_snats_all_endpoints_to_the_lb_ip_per_family() -> None:
    result = compute_node_state(cluster_of(*NODES, *mail_service("node-a")), SETTINGS)
    (service,) = result.state.services
    assert service.role == Role.GATEWAY
    assert service.gateway_node == "node-a"
    v4, v6 = service.families
    assert (v4.action, v4.snat_ip) == (Action.SNAT, "198.51.100.200")
    assert v4.source_ips == ("10.244.1.10", "10.244.2.10", "10.244.3.10")
    assert (v6.action, v6.snat_ip) == (Action.SNAT, "2001:db8:1::200")
    assert v6.source_ips == ("fd00:10:244:1::10",)  # not ready still counts
    assert result.state.routes == ()


def test_forwarder_marks_only_local_endpoints_and_routes_via_the_gateway() -> None:
    result = compute_node_state(cluster_of(*NODES, *mail_service("node-b")), SETTINGS)
    (service,) = result.state.services
    assert service.role == Role.FORWARDER
    v4, v6 = service.families
    assert v4.action == Action.MARK and v4.source_ips == ("10.244.1.10",)
    assert v6.action == Action.MARK and v6.source_ips == ("fd00:10:244:1::10",)
    (route,) = result.state.routes
    assert route.node == "node-b"
    assert route.fwmark == v4.fwmark == v6.fwmark
    assert route.fwmark & MASK == route.fwmark and route.fwmark != 0
    assert route.table == 100000 + route.slot
    assert (route.next_hop_ipv4, route.next_hop_ipv6) == ("198.51.100.12", "2001:db8:1::12")


def test_gateway_without_ipv6_rejects_ipv6_sources_only() -> None:
    result = compute_node_state(cluster_of(*NODES, *mail_service("node-c")), SETTINGS)
    (service,) = result.state.services
    v4, v6 = service.families
    assert v4.action == Action.MARK
    assert v6.action == Action.REJECT and "no IPv6 InternalIP" in v6.reason
    assert service.role == Role.FORWARDER


def test_unknown_or_missing_gateway_rejects() -> None:
    for gateway in (None, "node-gone"):
        result = compute_node_state(cluster_of(*NODES, *mail_service(gateway)), SETTINGS)
        (service,) = result.state.services
        assert service.role == Role.REJECT
        assert {f.action for f in service.families} == {Action.REJECT}
        assert result.state.routes == ()
    no_status = [o for o in mail_service("node-b") if o["kind"] != "ServiceL2Status"]
    (service,) = compute_node_state(cluster_of(*NODES, *no_status), SETTINGS).state.services
    assert service.role == Role.REJECT


def test_label_must_be_exactly_true() -> None:
    objects = mail_service("node-a")
    for value in ("True", "yes", "", "1"):
        objects[0] = k.service("mail", "relay", ("198.51.100.200",), labelled=value)
        assert compute_node_state(cluster_of(*NODES, *objects), SETTINGS).state.services == ()


def test_status_in_another_namespace_is_ignored() -> None:
    objects = [*mail_service(None), k.l2_status("other", "l2-x", "mail", "relay", "node-a")]
    (service,) = compute_node_state(cluster_of(*NODES, *objects), SETTINGS).state.services
    assert service.role == Role.REJECT


def test_no_local_endpoints_means_role_none_and_nothing_to_do() -> None:
    settings = NodeSettings(**{**_settings_dict(), "node_name": "node-c"})
    objects = mail_service("node-b")
    objects[2] = k.endpoint_slice("mail", "relay-v6", "relay", "IPv6", [])
    objects[1] = k.endpoint_slice("mail", "relay-v4", "relay", "IPv4", [("10.244.1.10", "node-a")])
    result = compute_node_state(cluster_of(*NODES, *objects), settings)
    (service,) = result.state.services
    assert service.role == Role.NONE and service.families == ()
    assert result.state.routes == ()


def test_filter_disabled_takes_every_endpoint_on_forwarders() -> None:
    settings = NodeSettings(**{**_settings_dict(), "filter_endpoints_for_node": False})
    result = compute_node_state(cluster_of(*NODES, *mail_service("node-b")), settings)
    v4 = result.state.services[0].families[0]
    assert v4.source_ips == ("10.244.1.10", "10.244.2.10", "10.244.3.10")


def test_shared_source_goes_to_the_first_service_and_is_reported() -> None:
    objects = [
        *mail_service("node-a"),
        k.service("a-first", "svc", ("198.51.100.201",)),
        k.endpoint_slice("a-first", "svc-1", "svc", "IPv4", [("10.244.1.10", "node-a")]),
        k.l2_status("metallb-system", "l2-first", "a-first", "svc", "node-a"),
    ]
    result = compute_node_state(cluster_of(*NODES, *objects), SETTINGS)
    first, relay = result.state.services
    assert first.key == "a-first/svc" and first.families[0].source_ips == ("10.244.1.10",)
    assert "10.244.1.10" not in relay.families[0].source_ips
    assert any("takes precedence" in p.message for p in result.problems)


def test_invalid_ips_are_skipped_and_reported() -> None:
    objects = [
        k.service("mail", "relay", ("not-an-ip", "198.51.100.200")),
        k.endpoint_slice(
            "mail",
            "s",
            "relay",
            "IPv4",
            [("10.244.1.999", "node-a"), ("fd00::1", "node-a"), ("10.244.1.10", "node-a")],
        ),
        k.l2_status("metallb-system", "l2", "mail", "relay", "node-a"),
    ]
    result = compute_node_state(cluster_of(*NODES, *objects), SETTINGS)
    (service,) = result.state.services
    assert service.lb_ips == ("198.51.100.200",)
    assert service.families[0].source_ips == ("10.244.1.10",)
    problems: list[Problem] = []
    parse_endpoint_slice(objects[1], problems)
    assert [p.field for p in problems] == ["endpoints[0].addresses[0]", "endpoints[1].addresses[0]"]


def test_allocation_is_sticky_and_prefers_the_hash_slot() -> None:
    first = allocate_slots(["node-b", "node-c"], {}, 15)
    assert first["node-b"] == preferred_slot("node-b", 15)
    again = allocate_slots(["node-a", "node-b", "node-c"], first, 15)
    assert {n: again[n] for n in first} == first
    assert len(set(again.values())) == 3
    full = allocate_slots([f"n{i}" for i in range(20)], {}, 15)
    assert len(full) == 15 and set(full.values()) == set(range(1, 16))


def test_full_mask_rejects_the_overflow_with_a_reason() -> None:
    settings = NodeSettings(**{**_settings_dict(), "fwmask": 0x00300000})  # 3 slots
    objects: list[dict[str, Any]] = [*NODES]
    for i in range(5):
        objects.append(k.node(f"gw{i}", f"198.51.100.{20 + i}"))
        objects.append(k.service("ns", f"s{i}", (f"198.51.100.{200 + i}",)))
        objects.append(
            k.endpoint_slice("ns", f"s{i}", f"s{i}", "IPv4", [(f"10.244.1.{10 + i}", "node-a")])
        )
        objects.append(k.l2_status("metallb-system", f"l2-{i}", "ns", f"s{i}", f"gw{i}"))
    result = compute_node_state(cluster_of(*objects), settings)
    actions = [s.families[0].action for s in result.state.services]
    assert actions.count(Action.MARK) == 3 and actions.count(Action.REJECT) == 2
    assert len({r.fwmark for r in result.state.routes}) == 3


def test_local_pod_counts_as_source_before_its_endpoint_slice() -> None:
    objects = [o for o in mail_service("node-b") if o["kind"] != "EndpointSlice"]
    objects += [
        k.pod(
            "mail", "relay-new", "node-a", ("10.244.1.20", "fd00:10:244:1::20"), {"app": "relay"}
        ),
        k.pod("mail", "host", "node-a", ("198.51.100.11",), {"app": "relay"}, host_network=True),
        k.pod("mail", "done", "node-a", ("10.244.1.21",), {"app": "relay"}, phase="Succeeded"),
        k.pod("mail", "elsewhere", "node-b", ("10.244.2.20",), {"app": "relay"}),
        k.pod("other", "same-labels", "node-a", ("10.244.1.22",), {"app": "relay"}),
        k.pod("mail", "unrelated", "node-a", ("10.244.1.23",), {"app": "web"}),
    ]
    (service,) = compute_node_state(cluster_of(*NODES, *objects), SETTINGS).state.services
    assert service.role == Role.FORWARDER
    assert [f.source_ips for f in service.families] == [("10.244.1.20",), ("fd00:10:244:1::20",)]


def test_service_without_selector_matches_no_pod() -> None:
    objects = [o for o in mail_service("node-b") if o["kind"] != "EndpointSlice"]
    objects[0] = k.service("mail", "relay", LB, selector={})
    objects.append(k.pod("mail", "p", "node-a", ("10.244.1.20",), {"app": "relay"}))
    (service,) = compute_node_state(cluster_of(*NODES, *objects), SETTINGS).state.services
    assert service.role == Role.NONE


LB = ("198.51.100.200", "2001:db8:1::200")
CIDR_NODES = (
    k.node("node-a", "198.51.100.11", "2001:db8:1::11", ("10.244.1.0/24", "fd00:10:244:1::/64")),
    k.node("node-b", "198.51.100.12", "2001:db8:1::12", ("10.244.2.0/24", "fd00:10:244:2::/64")),
    k.node("node-c", "198.51.100.13", None, ("10.244.3.0/24",)),
)


def test_transit_guard_holds_the_other_nodes_pods_and_never_this_nodes() -> None:
    objects = mail_service("node-a")
    objects[1] = k.endpoint_slice(
        "mail",
        "relay-v4",
        "relay",
        "IPv4",
        [
            ("10.244.1.10", "node-a"),
            ("10.244.2.10", "node-b"),
            ("10.250.0.7", "node-c"),
            ("10.250.0.8", None),
        ],
    )
    objects.append(k.pod("mail", "new", "node-b", ("10.244.2.11",), {"app": "relay"}))
    # Other nodes' pod CIDRs are not needed (nor watched): the guard lists the labelled
    # Services' pods on other nodes, from EndpointSlices and Pods; this node's CIDRs and
    # pods never.
    state = compute_node_state(cluster_of(*CIDR_NODES, *objects), SETTINGS).state
    assert state.transit_guard_ipv4 == ("10.244.2.10/32", "10.244.2.11/32", "10.250.0.7/32")
    assert state.transit_guard_ipv6 == ()
    objects.append(k.pod("mail", "reused", "node-c", ("10.244.1.33",), {"app": "relay"}))
    state = compute_node_state(cluster_of(*CIDR_NODES, *objects), SETTINGS).state
    assert "10.244.1.33/32" not in state.transit_guard_ipv4  # inside node-a's pod CIDR
    state = compute_node_state(cluster_of(*NODES, *objects), SETTINGS).state
    assert "10.244.1.33/32" in state.transit_guard_ipv4


def test_gateway_takes_new_pods_on_every_node_before_their_endpoint_slice() -> None:
    objects = mail_service("node-a")
    objects.append(
        k.pod("mail", "new", "node-c", ("10.244.3.20", "fd00:10:244:3::20"), {"app": "relay"})
    )
    (service,) = compute_node_state(cluster_of(*NODES, *objects), SETTINGS).state.services
    v4, v6 = service.families
    assert v4.action == Action.SNAT and "10.244.3.20" in v4.source_ips
    assert v6.action == Action.SNAT and "fd00:10:244:3::20" in v6.source_ips
    # On a forwarder, another node's pod is no source, but it is guarded.
    settings = NodeSettings(**{**_settings_dict(), "node_name": "node-b"})
    objects[-2] = k.l2_status("metallb-system", "l2-relay", "mail", "relay", "node-c")
    state = compute_node_state(cluster_of(*NODES, *objects), settings).state
    assert all("10.244.3.20" not in f.source_ips for f in state.services[0].families)
    assert "10.244.3.20/32" in state.transit_guard_ipv4


def test_sources_are_pods_never_nodes() -> None:
    objects = mail_service("node-a")
    objects[1] = k.endpoint_slice(
        "mail",
        "relay-v4",
        "relay",
        "IPv4",
        [("10.244.1.10", "node-a"), ("198.51.100.12", "node-b"), ("198.51.100.99", "node-x")],
    )
    objects.append(
        k.pod(
            "mail",
            "host",
            "node-x",
            ("198.51.100.99",),
            {"app": "relay"},
            host_network=True,
            host_ips=("198.51.100.99",),
        )
    )
    result = compute_node_state(cluster_of(*NODES, *objects), SETTINGS)
    (service,) = result.state.services
    assert service.families[0].source_ips == ("10.244.1.10",)
    assert result.state.transit_guard_ipv4 == ()
    messages = {str(p) for p in result.problems}
    assert any("198.51.100.12 is a node's address" in m for m in messages)  # a Node's InternalIP
    assert any("198.51.100.99 is a node's address" in m for m in messages)  # a hostNetwork Pod
    # The rest of the Service keeps working, on forwarders too.
    settings = NodeSettings(**{**_settings_dict(), "node_name": "node-b"})
    objects[-2] = k.l2_status("metallb-system", "l2-relay", "mail", "relay", "node-c")
    state = compute_node_state(cluster_of(*NODES, *objects), settings).state
    assert state.services[0].families == ()


def _settings_dict() -> dict[str, Any]:
    return {f: getattr(SETTINGS, f) for f in SETTINGS.__struct_fields__}


# --- generated clusters -------------------------------------------------------------------------

node_names = st.sampled_from(["node-a", "node-b", "node-c", "node-d", "ghost"])
ipv4s = st.sampled_from([f"10.244.{i}.{j}" for i in range(1, 4) for j in (10, 11, 12)])
ipv6s = st.sampled_from([f"fd00:10:244:{i}::{j}" for i in range(1, 4) for j in (10, 11)])
garbage = st.one_of(st.text(max_size=6), st.integers(), st.none(), st.just("10.0.0.300"))
any_ip = st.one_of(ipv4s, ipv6s, garbage)
names = st.sampled_from(["a", "b", "c"])
namespaces = st.sampled_from(["x", "y", "metallb-system"])


def maybe_broken(obj: dict[str, Any], draw: Any) -> dict[str, Any]:
    """Randomly drop or corrupt top-level parts of an object."""
    for field in ("metadata", "status", "spec", "endpoints", "addressType"):
        if field in obj and draw(st.integers(0, 9)) == 0:
            obj[field] = draw(st.sampled_from([None, {}, [], "junk"]))
    return obj


@st.composite
def raw_clusters(draw: Any) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for name in draw(st.lists(node_names, unique=True, max_size=4)):
        v4 = draw(
            st.one_of(st.none(), st.sampled_from(["198.51.100.11", "198.51.100.12", "bogus"]))
        )
        v6 = draw(st.one_of(st.none(), st.just("2001:db8:1::12")))
        cidrs = draw(
            st.lists(
                st.sampled_from(
                    [
                        "10.244.1.0/24",
                        "10.244.2.0/24",
                        "10.244.0.0/16",
                        "fd00:10:244:3::/64",
                        "bogus",
                    ]
                ),
                max_size=2,
            )
        )
        objects.append(maybe_broken(k.node(name, v4, v6, tuple(cidrs)), draw))
    for index in range(draw(st.integers(0, 3))):
        pod_ips = tuple(draw(st.lists(st.one_of(ipv4s, ipv6s), max_size=2, unique=True)))
        objects.append(
            maybe_broken(
                k.pod(
                    draw(namespaces),
                    f"pod-{index}",
                    draw(node_names),
                    pod_ips,
                    {"app": draw(names)},
                    host_network=draw(st.booleans()),
                    host_ips=tuple(
                        draw(
                            st.lists(
                                st.sampled_from(["198.51.100.11", "198.51.100.12", "10.244.1.10"]),
                                max_size=1,
                            )
                        )
                    ),
                ),
                draw,
            )
        )
    for namespace, name in draw(st.lists(st.tuples(namespaces, names), unique=True, max_size=4)):
        lb = draw(
            st.lists(
                st.one_of(st.sampled_from(["198.51.100.200", "2001:db8:1::200"]), garbage),
                max_size=3,
            )
        )
        label = draw(st.sampled_from([True, False, "True", "true"]))
        objects.append(maybe_broken(k.service(namespace, name, [str(x) for x in lb], label), draw))
        for index in range(draw(st.integers(0, 2))):
            address_type = draw(st.sampled_from(["IPv4", "IPv6", "FQDN", "bogus"]))
            endpoints = draw(
                st.lists(st.tuples(any_ip, st.one_of(st.none(), node_names)), max_size=4)
            )
            objects.append(
                maybe_broken(
                    k.endpoint_slice(namespace, f"{name}-{index}", name, address_type, endpoints),
                    draw,
                )
            )  # type: ignore[arg-type]
        if draw(st.booleans()):
            status_ns = draw(st.sampled_from(["metallb-system", "metallb-system", "other"]))
            objects.append(
                maybe_broken(
                    k.l2_status(
                        status_ns,
                        f"l2-{namespace}-{name}",
                        namespace,
                        name,
                        draw(st.one_of(st.none(), node_names)),
                    ),
                    draw,
                )
            )
    return objects


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_clusters(), node_names, st.booleans())
def test_generated_clusters_hold_the_reference_semantics(
    objects: list[dict[str, Any]], this_node: str, filter_endpoints: bool
) -> None:
    settings_ = NodeSettings(
        **{
            **_settings_dict(),
            "node_name": this_node,
            "filter_endpoints_for_node": filter_endpoints,
        }
    )
    cluster = cluster_of(*objects)
    result = compute_node_state(cluster, settings_)
    state = result.state

    labelled = {key for key, s in cluster.services.items() if s.labelled}
    assert [s.key for s in state.services] == sorted(labelled, key=lambda x: tuple(x.split("/")))

    seen_sources: set[str] = set()
    routes = {r.node: r for r in state.routes}
    node_addresses = {a for n in cluster.nodes.values() for a in n.addresses} | {
        a for p in cluster.pods.values() for a in p.host_ips
    }
    node_addresses |= {ip for p in cluster.pods.values() if p.host_network for ip, _ in p.ips}
    for service in state.services:
        info = cluster.services[service.key]
        gateway = service.gateway_node
        assert gateway is None or gateway in cluster.nodes
        families = [f.family for f in service.families]
        assert families == sorted(set(families))
        for entry in service.families:
            assert entry.source_ips and list(entry.source_ips) == sorted(
                set(entry.source_ips), key=lambda ip: int(ipaddress.ip_address(ip))
            )
            for ip in entry.source_ips:
                assert ip not in seen_sources, "a source IP is claimed twice"
                seen_sources.add(ip)
                assert ipaddress.ip_address(ip).version == entry.family
                endpoints = [
                    e
                    for sl in cluster.slices.values()
                    if sl.namespace == info.namespace and sl.service_name == info.name
                    for e in sl.endpoints
                    if e.ip == ip
                ]
                pods = [
                    p
                    for p in cluster.pods.values()
                    if p.namespace == info.namespace
                    and not p.host_network
                    and not p.finished
                    and info.selector
                    and set(info.selector) <= set(p.labels)
                    and any(pod_ip == ip for pod_ip, _ in p.ips)
                ]
                if pods:
                    event("source from a Pod")
                assert endpoints or pods, "a source that is neither an endpoint nor a Pod"
                assert ip not in node_addresses, "a node's address is a source"
                if filter_endpoints and gateway != this_node:
                    assert any(p.node_name == this_node for p in pods) or any(
                        e.node_name == this_node for e in endpoints
                    )
            lb = info.lb_ipv4 if entry.family == Family.IPV4 else info.lb_ipv6
            if entry.action == Action.SNAT:
                assert gateway == this_node and entry.snat_ip == lb is not None
            elif entry.action == Action.MARK:
                assert gateway is not None and gateway != this_node and lb is not None
                route = routes[gateway]
                assert entry.fwmark == route.fwmark
                hop = route.next_hop_ipv4 if entry.family == Family.IPV4 else route.next_hop_ipv6
                assert hop is not None
            else:
                assert entry.reason
                assert (
                    gateway is None
                    or lb is None
                    or (
                        gateway != this_node
                        and (
                            (
                                cluster.nodes[gateway].ipv4
                                if entry.family == Family.IPV4
                                else cluster.nodes[gateway].ipv6
                            )
                            is None
                        )
                    )
                )
    # The transit guard never holds this node's pods nor a node's address, and holds every
    # other node's endpoint and Pod of a labelled Service.
    local_pods = {
        ip
        for pod in cluster.pods.values()
        if pod.node_name == this_node and not pod.host_network and not pod.finished
        for ip, _ in pod.ips
    }
    own = cluster.nodes.get(this_node)
    own_networks = [ipaddress.ip_network(c) for c in (own.pod_cidrs if own else ())]
    guard = {c.split("/")[0] for c in state.transit_guard_ipv4 + state.transit_guard_ipv6}
    assert not guard & local_pods
    assert not guard & node_addresses
    for ip in guard:
        assert not any(ipaddress.ip_address(ip) in o for o in own_networks)
    for key in labelled:
        info = cluster.services[key]
        others = [
            (e.ip, e.node_name)
            for sl in cluster.slices.values()
            if sl.namespace == info.namespace and sl.service_name == info.name
            for e in sl.endpoints
        ]
        others += [
            (ip, p.node_name)
            for p in cluster.pods.values()
            if p.namespace == info.namespace
            and info.selector
            and set(info.selector) <= set(p.labels)
            and not p.host_network
            and not p.finished
            for ip, _ in p.ips
        ]
        for ip, node in others:
            if (
                node in (None, this_node)
                or ip in local_pods
                or ip in node_addresses
                or any(ipaddress.ip_address(ip) in o for o in own_networks)
            ):
                continue
            assert ip in guard, f"{ip} on {node} not guarded"

    # Routes: exactly the gateways some MARK entry uses, distinct slots within the mask.
    used = {s.gateway_node for s in state.services for f in s.families if f.action == Action.MARK}
    assert set(routes) == used
    assert len({r.slot for r in state.routes}) == len(state.routes)
    for route in state.routes:
        assert 1 <= route.slot <= fwmask_capacity(MASK)
        assert route.fwmark == route.slot << 20 and route.table == 100000 + route.slot

    # Deterministic and independent of the order objects arrive in.
    shuffled = list(objects)
    random.Random(len(objects)).shuffle(shuffled)
    assert compute_node_state(cluster_of(*shuffled), settings_).state == state
