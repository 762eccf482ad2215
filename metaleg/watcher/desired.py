"""The pure function at the heart of metaleg: cluster objects -> one node's desired state.

Semantics (the Go original's, see ``shared/design/reference-behaviour.md``,
made fail-closed where it was silent):

- A Service takes part when its label ``metaleg.de/rewriteSrcIP`` is exactly
  ``"true"``. Its SNAT addresses are the first IPv4 and IPv6 ingress IPs.
- Sources are the IPs of its EndpointSlices' endpoints, ready or not. With
  FILTER_ENDPOINTS_FOR_NODE only the endpoints on this node count, except on
  the gateway node, which takes all (the others forward to it).
- The gateway is ``status.node`` of the ServiceL2Status in METALLB_NAMESPACE
  whose labels name the Service; it must be a known Node.
- Per address family: gateway here -> SNAT to the LB IP; gateway elsewhere with
  an InternalIP of that family -> MARK towards it; anything else (no gateway,
  no LB IP of that family, no next hop, no free mark) -> REJECT, with a reason.
  A labelled Service's pods never leave with a node or pod IP.
- A source IP claimed by two labelled Services goes to the first by
  namespace/name (the kernel can only do one thing with it); the conflict is
  reported.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import defaultdict
from collections.abc import Mapping

import msgspec

from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    GatewayRoute,
    NodeDesiredState,
    Role,
    ServiceEgress,
    fwmask_capacity,
    fwmask_shift,
)
from metaleg.watcher.allocation import allocate_slots
from metaleg.watcher.cluster import ClusterState, L2StatusInfo, NodeInfo, Problem, ServiceInfo


class NodeSettings(msgspec.Struct, frozen=True):
    """The part of the configuration the desired-state function depends on."""

    node_name: str
    metallb_namespace: str
    filter_endpoints_for_node: bool
    fwmask: int
    route_table_id_offset: int
    exclude_dst_ipv4: tuple[str, ...]
    exclude_dst_ipv6: tuple[str, ...]


class Computation(msgspec.Struct, frozen=True):
    """The result of :func:`compute_node_state`."""

    state: NodeDesiredState
    allocation: dict[str, int]
    """Gateway node -> slot; feed it back as ``previous_allocation`` next time."""
    problems: tuple[Problem, ...]


def _gateway_of(
    service: ServiceInfo,
    statuses: list[L2StatusInfo],
    nodes: Mapping[str, NodeInfo],
    problems: list[Problem],
) -> str | None:
    """The announcing node of a Service: the first status (by name) naming a known node."""
    named = [status for status in statuses if status.node is not None]
    known = [status for status in named if status.node in nodes]
    for status in named:
        if status.node not in nodes:
            problems.append(
                Problem(
                    "ServiceL2Status",
                    f"{status.namespace}/{status.name}",
                    "status.node",
                    f"node {status.node!r} of Service {service.namespace}/{service.name} is unknown",
                )
            )
    if len({status.node for status in known}) > 1:
        problems.append(
            Problem(
                "Service",
                f"{service.namespace}/{service.name}",
                "ServiceL2Status",
                "announced by several nodes: "
                + ", ".join(sorted({str(status.node) for status in known}))
                + f"; using {known[0].node}",
            )
        )
    return known[0].node if known else None


def compute_node_state(
    cluster: ClusterState,
    settings: NodeSettings,
    previous_allocation: Mapping[str, int] | None = None,
) -> Computation:
    """Compute this node's complete desired state from the cluster objects. Pure and total."""
    problems: list[Problem] = []
    node_name = settings.node_name
    capacity = fwmask_capacity(settings.fwmask)
    shift = fwmask_shift(settings.fwmask)

    labelled = sorted(
        (s for s in cluster.services.values() if s.labelled),
        key=lambda s: (s.namespace, s.name),
    )
    statuses_by_service: dict[tuple[str, str], list[L2StatusInfo]] = defaultdict(list)
    for status in sorted(cluster.l2_statuses.values(), key=lambda s: (s.namespace, s.name)):
        if status.namespace != settings.metallb_namespace:
            continue
        if status.service_namespace is None or status.service_name is None:
            continue
        statuses_by_service[(status.service_namespace, status.service_name)].append(status)
    endpoints_by_service: dict[tuple[str, str], list[tuple[str, Family, str | None]]] = defaultdict(
        list
    )
    for endpoint_slice in sorted(cluster.slices.values(), key=lambda s: (s.namespace, s.name)):
        if endpoint_slice.service_name is None:
            continue
        bucket = endpoints_by_service[(endpoint_slice.namespace, endpoint_slice.service_name)]
        for endpoint in endpoint_slice.endpoints:
            bucket.append((endpoint.ip, endpoint.family, endpoint.node_name))
    # This node's Pods count as soon as they show an IP: an EndpointSlice lists a new Pod
    # only seconds later, and its first packets would leave with the node's IP meanwhile.
    local_pods = [
        pod
        for pod in sorted(cluster.pods.values(), key=lambda p: (p.namespace, p.name))
        if pod.node_name == node_name and not pod.host_network and not pod.finished and pod.ips
    ]
    for service in labelled:
        if not service.selector:
            continue
        wanted = set(service.selector)
        bucket = endpoints_by_service[(service.namespace, service.name)]
        for pod in local_pods:
            if pod.namespace == service.namespace and wanted <= set(pod.labels):
                bucket.extend((ip, family, node_name) for ip, family in pod.ips)

    gateways: dict[tuple[str, str], str | None] = {}
    for service in labelled:
        key = (service.namespace, service.name)
        gateways[key] = _gateway_of(
            service, statuses_by_service.get(key, []), cluster.nodes, problems
        )

    # Allocate over every gateway of a labelled Service with an LB IP, cluster-wide, so the
    # allocation does not depend on which Services happen to have endpoints here right now.
    allocation = allocate_slots(
        (
            gateway
            for service in labelled
            if (gateway := gateways[(service.namespace, service.name)]) is not None
            and (service.lb_ipv4 or service.lb_ipv6)
        ),
        previous_allocation or {},
        capacity,
    )

    claimed: dict[str, str] = {}  # source IP -> the Service that got it
    services: list[ServiceEgress] = []
    used_gateways: set[str] = set()
    for service in labelled:
        key = (service.namespace, service.name)
        service_key = f"{service.namespace}/{service.name}"
        gateway = gateways[key]
        is_gateway = gateway == node_name
        lb_ips = tuple(ip for ip in (service.lb_ipv4, service.lb_ipv6) if ip is not None)

        sources: dict[Family, set[str]] = {Family.IPV4: set(), Family.IPV6: set()}
        for ip, family, endpoint_node in endpoints_by_service.get(key, []):
            if settings.filter_endpoints_for_node and not is_gateway and endpoint_node != node_name:
                continue
            owner = claimed.setdefault(ip, service_key)
            if owner != service_key:
                problems.append(
                    Problem(
                        "Service",
                        service_key,
                        "endpoints",
                        f"source {ip} also belongs to Service {owner}, which takes precedence",
                    )
                )
                continue
            sources[family].add(ip)

        families: list[FamilyEgress] = []
        for family, lb_ip in ((Family.IPV4, service.lb_ipv4), (Family.IPV6, service.lb_ipv6)):
            if not sources[family]:
                continue
            source_ips = tuple(sorted(sources[family], key=_ip_sort_key))
            families.append(
                _family_egress(
                    family, source_ips, lb_ip, gateway, node_name, cluster.nodes, allocation, shift
                )
            )
        for entry in families:
            if entry.action == Action.MARK and gateway is not None:
                used_gateways.add(gateway)

        if not families:
            role = Role.NONE
        elif is_gateway:
            role = Role.GATEWAY
        elif any(entry.action == Action.MARK for entry in families):
            role = Role.FORWARDER
        else:
            role = Role.REJECT
        services.append(
            ServiceEgress(
                namespace=service.namespace,
                name=service.name,
                role=role,
                gateway_node=gateway,
                lb_ips=lb_ips,
                families=tuple(families),
            )
        )

    routes = []
    for gateway in sorted(used_gateways, key=lambda node: allocation[node]):
        slot = allocation[gateway]
        node = cluster.nodes[gateway]
        routes.append(
            GatewayRoute(
                node=gateway,
                slot=slot,
                fwmark=slot << shift,
                table=settings.route_table_id_offset + slot,
                next_hop_ipv4=node.ipv4,
                next_hop_ipv6=node.ipv6,
            )
        )

    guard = _transit_guard(
        cluster,
        node_name,
        [ip for pod in local_pods for ip, _ in pod.ips],
        [
            (ip, family, endpoint_node)
            for service in labelled
            for ip, family, endpoint_node in endpoints_by_service.get(
                (service.namespace, service.name), []
            )
        ],
        problems,
    )
    state = NodeDesiredState(
        node=node_name,
        fwmask=settings.fwmask,
        exclude_dst_ipv4=settings.exclude_dst_ipv4,
        exclude_dst_ipv6=settings.exclude_dst_ipv6,
        services=tuple(services),
        routes=tuple(routes),
        transit_guard_ipv4=guard[Family.IPV4],
        transit_guard_ipv6=guard[Family.IPV6],
    )
    return Computation(state=state, allocation=allocation, problems=tuple(problems))


def _family_egress(
    family: Family,
    source_ips: tuple[str, ...],
    lb_ip: str | None,
    gateway: str | None,
    node_name: str,
    nodes: Mapping[str, NodeInfo],
    allocation: Mapping[str, int],
    shift: int,
) -> FamilyEgress:
    """What to do with one family's sources of one Service on this node."""
    label = "IPv4" if family == Family.IPV4 else "IPv6"

    def reject(reason: str) -> FamilyEgress:
        return FamilyEgress(family, Action.REJECT, source_ips, reason=reason)

    if gateway is None:
        return reject("no ServiceL2Status names a known gateway node")
    if lb_ip is None:
        return reject(f"the Service has no {label} LoadBalancer IP")
    if gateway == node_name:
        return FamilyEgress(family, Action.SNAT, source_ips, snat_ip=lb_ip)
    next_hop = nodes[gateway].ipv4 if family == Family.IPV4 else nodes[gateway].ipv6
    if next_hop is None:
        return reject(f"gateway node {gateway} has no {label} InternalIP")
    slot = allocation.get(gateway)
    if slot is None:
        return reject(f"no free firewall mark for gateway node {gateway} (FIREWALL_MASK is full)")
    return FamilyEgress(family, Action.MARK, source_ips, fwmark=slot << shift)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _transit_guard(
    cluster: ClusterState,
    node_name: str,
    local_pod_ips: list[str],
    labelled_endpoints: list[tuple[str, Family, str | None]],
    problems: list[Problem],
) -> dict[Family, tuple[str, ...]]:
    """Sources of pods on other nodes (see ``NodeDesiredState.transit_guard_ipv4``).

    The other nodes' pod CIDRs, plus the other nodes' endpoints of labelled
    Services (for clusters whose Nodes carry no pod CIDRs). Never anything of
    this node: its own pods' forwarded traffic must not be caught.
    """
    own = cluster.nodes.get(node_name)
    local_networks = [ipaddress.ip_network(cidr) for cidr in (own.pod_cidrs if own else ())]
    local_ips = set(local_pod_ips)

    def overlaps_local(network: Network) -> bool:
        return any(
            network.overlaps(local) for local in local_networks if local.version == network.version
        ) or any(ipaddress.ip_address(ip) in network for ip in local_ips)

    guard: dict[Family, list[Network]] = {Family.IPV4: [], Family.IPV6: []}
    for node in sorted(cluster.nodes.values(), key=lambda n: n.name):
        if node.name == node_name:
            continue
        for cidr in node.pod_cidrs:
            network = ipaddress.ip_network(cidr)
            if overlaps_local(network):
                problems.append(
                    Problem(
                        "Node",
                        node.name,
                        "spec.podCIDRs",
                        f"{cidr} overlaps this node's pods; not guarded",
                    )
                )
                continue
            guard[Family(network.version)].append(network)
    for ip, family, endpoint_node in labelled_endpoints:
        if endpoint_node is None or endpoint_node == node_name or ip in local_ips:
            continue  # unknown locality must not risk catching this node's own pods
        address = ipaddress.ip_address(ip)
        if any(address in local for local in local_networks):
            continue
        guard[family].append(ipaddress.ip_network(address))
    result: dict[Family, tuple[str, ...]] = {}
    for family, networks in guard.items():
        collapsed = ipaddress.collapse_addresses(networks)  # type: ignore[type-var]
        result[family] = tuple(str(network) for network in collapsed)
    return result


def _ip_sort_key(ip: str) -> tuple[int, bytes]:
    """Numeric order of canonical IP addresses (what the parsers produce). The packed form
    (big-endian, one length per family) sorts like the number; ``inet_pton`` is a C call,
    so unlike ``ipaddress`` it needs no cache, whose entries outlived the addresses."""
    if ":" in ip:
        return 6, socket.inet_pton(socket.AF_INET6, ip)
    return 4, socket.inet_pton(socket.AF_INET, ip)
