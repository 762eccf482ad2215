"""The pure function at the heart of metaleg: cluster objects -> one node's desired state.

Semantics (the Go original's, see ``shared/design/reference-behaviour.md``,
made fail-closed where it was silent):

- A Service takes part when its label ``metaleg.de/rewriteSrcIP`` is exactly
  ``"true"``. Its SNAT addresses are the first IPv4 and IPv6 ingress IPs.
- Sources are the IPs of its EndpointSlices' endpoints, ready or not, and of
  the Pods its selector picks, on every node, as soon as they show an IP. With
  FILTER_ENDPOINTS_FOR_NODE only those on this node count, except on the
  gateway node, which takes all (the others forward to it).
- Sources are pods, never nodes: a Node's address (a hostNetwork Pod, an
  endpoint pointing at a node) is skipped and reported.
- The gateway is ``status.node`` of the ServiceL2Status in METALLB_NAMESPACE
  whose labels name the Service; it must be a known Node.
- Per address family: gateway here -> SNAT to the LB IP; gateway elsewhere with
  an InternalIP of that family -> MARK towards it; anything else (no gateway,
  no LB IP of that family, no next hop, no free mark) -> REJECT, with a reason.
  A labelled Service's pods never leave with a node or pod IP.
- The transit guard lists the labelled Services' sources on other nodes.
- A source IP claimed by two labelled Services goes to the first by
  namespace/name (the kernel can only do one thing with it); the conflict is
  reported.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import defaultdict
from collections.abc import Container, Iterable, Mapping, Sequence

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
from metaleg.watcher.cluster import (
    ClusterState,
    L2StatusInfo,
    NodeInfo,
    PodInfo,
    Problem,
    ServiceInfo,
    SliceInfo,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def gateway_of(
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


def selects(service: ServiceInfo, pod: PodInfo) -> bool:
    """Whether a Service's selector picks a Pod (same namespace; an empty selector picks none)."""
    return (
        bool(service.selector)
        and pod.namespace == service.namespace
        and set(service.selector) <= set(pod.labels)
    )


def pod_sources(pod: PodInfo) -> tuple[tuple[str, Family], ...]:
    """The IPs a Pod sends from, if it may be a source: not hostNetwork, not finished."""
    if pod.host_network or pod.finished:
        return ()
    return pod.ips


def node_addresses_of_pod(pod: PodInfo) -> tuple[str, ...]:
    """Addresses a Pod reveals as its node's: ``status.hostIPs``, and a hostNetwork Pod's IPs."""
    if pod.host_network:
        return (*pod.host_ips, *(ip for ip, _ in pod.ips))
    return pod.host_ips


def node_address_problem(service_key: str, ip: str) -> Problem:
    return Problem(
        "Service",
        service_key,
        "endpoints",
        f"{ip} is a node's address (a hostNetwork Pod or a node endpoint), not a pod's; "
        "never a source",
    )


def conflict_problem(service_key: str, ip: str, owner: str) -> Problem:
    return Problem(
        "Service",
        service_key,
        "endpoints",
        f"source {ip} also belongs to Service {owner}, which takes precedence",
    )


def guard_entry(ip: str) -> str:
    """An address of the transit guard as the host network the backends take."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def candidate_sources(
    service: ServiceInfo,
    slices: Iterable[SliceInfo],
    pods: Iterable[PodInfo],
) -> tuple[tuple[str, Family, str | None], ...]:
    """A labelled Service's possible sources before this node's filters: its EndpointSlices'
    endpoints (ready or not) and the IPs of the Pods its selector picks, on every node, each
    with the node it runs on (None: unknown)."""
    result: list[tuple[str, Family, str | None]] = []
    for endpoint_slice in sorted(slices, key=lambda s: (s.namespace, s.name)):
        result.extend((e.ip, e.family, e.node_name) for e in endpoint_slice.endpoints)
    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        if selects(service, pod):
            result.extend((ip, family, pod.node_name) for ip, family in pod_sources(pod))
    return tuple(result)


def role_of(families: tuple[FamilyEgress, ...], is_gateway: bool) -> Role:
    if not families:
        return Role.NONE
    if is_gateway:
        return Role.GATEWAY
    if any(entry.action == Action.MARK for entry in families):
        return Role.FORWARDER
    return Role.REJECT


def compute_node_state(
    cluster: ClusterState,
    settings: NodeSettings,
    previous_allocation: Mapping[str, int] | None = None,
) -> Computation:
    """Compute this node's complete desired state from the cluster objects. Pure and total.

    The watcher computes the same incrementally (:class:`metaleg.watcher.tracker.EgressTracker`);
    this whole computation is its oracle in the tests.
    """
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
    slices_by_service: dict[tuple[str, str], list[SliceInfo]] = defaultdict(list)
    for endpoint_slice in cluster.slices.values():
        if endpoint_slice.service_name is not None:
            slices_by_service[(endpoint_slice.namespace, endpoint_slice.service_name)].append(
                endpoint_slice
            )
    # Sources are pods, never nodes: a hostNetwork Pod's endpoint is its node's address, and
    # marking or SNATing it would take the node's own traffic.
    node_addresses = {address for node in cluster.nodes.values() for address in node.addresses}
    node_addresses.update(
        address for pod in cluster.pods.values() for address in node_addresses_of_pod(pod)
    )
    candidates = {
        (service.namespace, service.name): candidate_sources(
            service,
            slices_by_service.get((service.namespace, service.name), []),
            cluster.pods.values(),
        )
        for service in labelled
    }

    gateways: dict[tuple[str, str], str | None] = {}
    for service in labelled:
        key = (service.namespace, service.name)
        gateways[key] = gateway_of(
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
        for ip, family, endpoint_node in candidates[key]:
            if ip in node_addresses:
                problems.append(node_address_problem(service_key, ip))
                continue
            if settings.filter_endpoints_for_node and not is_gateway and endpoint_node != node_name:
                continue
            owner = claimed.setdefault(ip, service_key)
            if owner != service_key:
                problems.append(conflict_problem(service_key, ip, owner))
                continue
            sources[family].add(ip)

        families: list[FamilyEgress] = []
        for family, lb_ip in ((Family.IPV4, service.lb_ipv4), (Family.IPV6, service.lb_ipv6)):
            destinations = family_destinations(service, family)
            if not sources[family] or destinations is None:
                continue
            source_ips = tuple(sorted(sources[family], key=ip_sort_key))
            families.append(
                family_egress(
                    family,
                    source_ips,
                    lb_ip,
                    gateway,
                    node_name,
                    cluster.nodes,
                    allocation,
                    shift,
                    destinations,
                )
            )
        for entry in families:
            if entry.action == Action.MARK and gateway is not None:
                used_gateways.add(gateway)
        services.append(
            ServiceEgress(
                namespace=service.namespace,
                name=service.name,
                role=role_of(tuple(families), is_gateway),
                gateway_node=gateway,
                lb_ips=lb_ips,
                families=tuple(families),
                destination_ports=service.destination_ports,
            )
        )

    routes = tuple(
        gateway_route(gateway, allocation[gateway], cluster.nodes[gateway], settings)
        for gateway in sorted(used_gateways, key=lambda node: allocation[node])
    )

    # The transit guard: the labelled Services' pods on other nodes, never this node's.
    own = cluster.nodes.get(node_name)
    own_networks = [ipaddress.ip_network(cidr) for cidr in (own.pod_cidrs if own else ())]
    local_ips = {
        ip
        for pod in cluster.pods.values()
        if pod.node_name == node_name
        for ip, _ in pod_sources(pod)
    }
    guard: dict[Family, set[str]] = {Family.IPV4: set(), Family.IPV6: set()}
    for key in candidates:
        for ip, family, endpoint_node in candidates[key]:
            if guarded(ip, endpoint_node, node_name, local_ips, node_addresses, own_networks):
                guard[family].add(ip)
    state = NodeDesiredState(
        node=node_name,
        fwmask=settings.fwmask,
        exclude_dst_ipv4=settings.exclude_dst_ipv4,
        exclude_dst_ipv6=settings.exclude_dst_ipv6,
        services=tuple(services),
        routes=routes,
        transit_guard_ipv4=guard_list(guard[Family.IPV4]),
        transit_guard_ipv6=guard_list(guard[Family.IPV6]),
    )
    return Computation(state=state, allocation=allocation, problems=tuple(problems))


def guarded(
    ip: str,
    endpoint_node: str | None,
    node_name: str,
    local_ips: Container[str],
    node_addresses: Container[str],
    own_networks: Sequence[Network],
) -> bool:
    """Whether a labelled Service's source belongs in this node's transit guard: it runs on
    another (known) node and is neither one of this node's pods nor a node's address.
    Unknown locality must not risk catching this node's own pods."""
    if endpoint_node is None or endpoint_node == node_name:
        return False
    return not guard_excludes(ip, local_ips, node_addresses, own_networks)


def guard_excludes(
    ip: str,
    local_ips: Container[str],
    node_addresses: Container[str],
    own_networks: Sequence[Network],
) -> bool:
    """Whether an address must stay out of the transit guard whatever node it is said to run
    on: one of this node's pods (by IP or by this node's pod CIDRs), or a node's address."""
    if ip in local_ips or ip in node_addresses:
        return True
    if own_networks:
        address = ipaddress.ip_address(ip)
        return any(address in network for network in own_networks)
    return False


def guard_list(ips: Iterable[str]) -> tuple[str, ...]:
    """The transit guard of one family as the state holds it: host networks in address order."""
    return tuple(guard_entry(ip) for ip in sorted(ips, key=ip_sort_key))


def gateway_route(gateway: str, slot: int, node: NodeInfo, settings: NodeSettings) -> GatewayRoute:
    """Policy routing towards one gateway node in its allocation slot."""
    return GatewayRoute(
        node=gateway,
        slot=slot,
        fwmark=slot << fwmask_shift(settings.fwmask),
        table=settings.route_table_id_offset + slot,
        next_hop_ipv4=node.ipv4,
        next_hop_ipv6=node.ipv6,
    )


def family_egress(
    family: Family,
    source_ips: tuple[str, ...],
    lb_ip: str | None,
    gateway: str | None,
    node_name: str,
    nodes: Mapping[str, NodeInfo],
    allocation: Mapping[str, int],
    shift: int,
    destinations: tuple[str, ...] = (),
) -> FamilyEgress:
    """What to do with one family's sources of one Service on this node (for traffic to
    ``destinations``, :func:`family_destinations`)."""
    label = "IPv4" if family == Family.IPV4 else "IPv6"

    def reject(reason: str) -> FamilyEgress:
        return FamilyEgress(
            family, Action.REJECT, source_ips, reason=reason, destinations=destinations
        )

    if gateway is None:
        return reject("no ServiceL2Status names a known gateway node")
    if lb_ip is None:
        return reject(f"the Service has no {label} LoadBalancer IP")
    if gateway == node_name:
        return FamilyEgress(
            family, Action.SNAT, source_ips, snat_ip=lb_ip, destinations=destinations
        )
    next_hop = nodes[gateway].ipv4 if family == Family.IPV4 else nodes[gateway].ipv6
    if next_hop is None:
        return reject(f"gateway node {gateway} has no {label} InternalIP")
    slot = allocation.get(gateway)
    if slot is None:
        return reject(f"no free firewall mark for gateway node {gateway} (FIREWALL_MASK is full)")
    return FamilyEgress(
        family, Action.MARK, source_ips, fwmark=slot << shift, destinations=destinations
    )


def family_destinations(service: ServiceInfo, family: Family) -> tuple[str, ...] | None:
    """The destinations of ``family`` a Service's egress policy covers: () every one (no
    ``metaleg.de/destinationCIDRs``), its CIDRs of that family, or None when it names
    none of that family (that family's traffic then takes the node's normal path)."""
    if service.destination_cidrs is None:
        return ()
    cidrs = tuple(c for c in service.destination_cidrs if (":" in c) == (family == Family.IPV6))
    return cidrs or None


def ip_sort_key(ip: str) -> tuple[int, bytes]:
    """Numeric order of canonical IP addresses (what the parsers produce). The packed form
    (big-endian, one length per family) sorts like the number; ``inet_pton`` is a C call,
    so unlike ``ipaddress`` it needs no cache, whose entries outlived the addresses."""
    if ":" in ip:
        return 6, socket.inet_pton(socket.AF_INET6, ip)
    return 4, socket.inet_pton(socket.AF_INET, ip)
