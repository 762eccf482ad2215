"""Change tracking: the node's desired state kept up to date one cluster object at a time.

kube-proxy's ``ServiceChangeTracker``/``EndpointsChangeTracker`` are the model. An
object event updates the held objects and notes which labelled Services it concerns
(*dirty*); :meth:`EgressTracker.compute` recomputes only those and returns a
:class:`~metaleg.model.NodeDesiredState` that shares every unchanged
:class:`~metaleg.model.ServiceEgress` object with the one before. An object equal to
the one held causes no work at all. :func:`metaleg.watcher.desired.compute_node_state`
computes the same from scratch; it is the oracle of this module's tests.

A Service's egress is computed in two stages, because only the second depends on other
Services:

1. *inputs*: its gateway node (from its ServiceL2Status and the Node), and its
   candidate sources (its EndpointSlices' endpoints and its selector's Pods, with
   their nodes). Dirty when one of those objects changes.
2. *sources*: the candidates this node takes (node addresses never, the
   FILTER_ENDPOINTS_FOR_NODE rule), then the IPs that another Service, first by
   namespace/name, also claims go to that one. Dirty when stage 1 changed, when a
   Service sharing a source changed its claims, when an address became or stopped
   being a node's, or when its gateway's slot changed.

The mark allocation, the routes and the transit guard are kept alongside: the guard
as a count of labelled sources per IP on other nodes, so that a Pod event changes it
by one address.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import msgspec

from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    GatewayRoute,
    NodeDesiredState,
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
from metaleg.watcher.desired import (
    Network,
    NodeSettings,
    candidate_sources,
    conflict_problem,
    family_destinations,
    family_egress,
    gateway_of,
    gateway_route,
    guard_entry,
    guard_excludes,
    ip_sort_key,
    node_address_problem,
    node_addresses_of_pod,
    pod_sources,
    role_of,
    selects,
)

ServiceKey = tuple[str, str]
"""``(namespace, name)``: Services sort and take precedence in this order."""
Candidate = tuple[str, Family, str | None]
"""A possible source: IP, family, the node it runs on (None: unknown)."""


class TrackerResult(msgspec.Struct, frozen=True):
    """What :meth:`EgressTracker.compute` returns."""

    state: NodeDesiredState
    allocation: dict[str, int]
    """Gateway node -> slot (save it: a restarted watcher keeps the slots)."""
    problems: tuple[Problem, ...]
    """The Services' problems (gateways, node addresses, shared sources), sorted."""
    changed: tuple[str, ...]
    """``namespace/name`` of the Services whose egress changed (added, changed or removed)."""


class _ServiceInputs(msgspec.Struct, frozen=True):
    """Stage 1 of one labelled Service."""

    info: ServiceInfo
    gateway: str | None
    gateway_problems: tuple[Problem, ...]
    candidates: tuple[Candidate, ...]


def _has_lb_ip(info: ServiceInfo) -> bool:
    return info.lb_ipv4 is not None or info.lb_ipv6 is not None


class EgressTracker:
    """The held cluster objects, their indexes and this node's desired state, kept current.

    Feed it parsed objects with :meth:`upsert` and :meth:`delete` (``resource`` is one
    of ``services``, ``slices``, ``nodes``, ``l2_statuses``, ``pods``, keyed like
    :class:`ClusterState`), then call :meth:`compute`.
    """

    def __init__(self, settings: NodeSettings, allocation: Mapping[str, int] | None = None) -> None:
        self.settings = settings
        self.cluster = ClusterState()
        self._capacity = fwmask_capacity(settings.fwmask)
        self._shift = fwmask_shift(settings.fwmask)
        # Indexes of the held objects.
        self._labelled: dict[ServiceKey, ServiceInfo] = {}
        self._statuses_by_service: dict[ServiceKey, set[str]] = defaultdict(set)
        self._statuses_by_node: dict[str, set[str]] = defaultdict(set)
        self._slices_by_service: dict[ServiceKey, set[str]] = defaultdict(set)
        self._pods_by_label: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        """(namespace, label key, value) -> Pods: a selector's Pods without a scan."""
        self._services_by_selector_pair: dict[tuple[str, str, str], set[ServiceKey]] = defaultdict(
            set
        )
        """(namespace, key, value) of a labelled Service's selector -> those Services."""
        # Per labelled Service.
        self._inputs: dict[ServiceKey, _ServiceInputs] = {}
        self._wanted: dict[ServiceKey, dict[str, Family]] = {}
        self._address_problems: dict[ServiceKey, tuple[Problem, ...]] = {}
        self._problems: dict[ServiceKey, tuple[Problem, ...]] = {}
        self._egress: dict[ServiceKey, ServiceEgress] = {}
        self._order: list[ServiceKey] = []
        """The keys of ``_egress``, sorted; ``_services`` holds their egress in that order."""
        self._services: list[ServiceEgress] = []
        # Across Services.
        self._services_by_candidate: dict[str, set[ServiceKey]] = defaultdict(set)
        self._claims: dict[str, set[ServiceKey]] = defaultdict(set)
        self._services_by_gateway: dict[str, set[ServiceKey]] = defaultdict(set)
        self._gateway_count: Counter[str] = Counter()
        """Gateways of labelled Services with an LB IP: what the allocation covers."""
        self._allocation: dict[str, int] = dict(allocation or {})
        self._allocation_dirty = True
        self._mark_count: Counter[str] = Counter()
        """Gateway -> labelled Services that mark towards it here: the routes."""
        self._node_address_count: Counter[str] = Counter()
        self._local_ip_count: Counter[str] = Counter()
        self._guard_count: Counter[str] = Counter()
        self._guard: dict[Family, list[tuple[tuple[int, bytes], str]]] = {
            Family.IPV4: [],
            Family.IPV6: [],
        }
        self._guard_members: set[str] = set()
        self._own_networks: list[Network] = []
        # What changed since the last compute().
        self._dirty_inputs: set[ServiceKey] = set()
        self._dirty_sources: set[ServiceKey] = set()
        self._dirty_guard: set[str] = set()
        self._guard_rebuild = False

    # --- object events ---------------------------------------------------------------------------

    def upsert(self, resource: str, key: str, info: object) -> bool:
        """Hold ``info`` under ``key``; False (and no work) when it equals the held object."""
        store: dict[str, object] = getattr(self.cluster, resource)
        old = store.get(key)
        if old == info:
            return False
        store[key] = info
        self._changed(resource, key, old, info)
        return True

    def delete(self, resource: str, key: str) -> bool:
        """Forget the object under ``key``; False when none was held."""
        store: dict[str, object] = getattr(self.cluster, resource)
        old = store.pop(key, None)
        if old is None:
            return False
        self._changed(resource, key, old, None)
        return True

    def cluster_object(self, resource: str, key: str) -> object | None:
        """The object held under ``key``, or None."""
        store: dict[str, object] = getattr(self.cluster, resource)
        return store.get(key)

    def _changed(self, resource: str, key: str, old: object, new: object) -> None:
        if resource == "services":
            assert old is None or isinstance(old, ServiceInfo)
            assert new is None or isinstance(new, ServiceInfo)
            self._service_changed(old, new)
        elif resource == "slices":
            assert old is None or isinstance(old, SliceInfo)
            assert new is None or isinstance(new, SliceInfo)
            self._slice_changed(key, old, new)
        elif resource == "pods":
            assert old is None or isinstance(old, PodInfo)
            assert new is None or isinstance(new, PodInfo)
            self._pod_changed(key, old, new)
        elif resource == "nodes":
            assert old is None or isinstance(old, NodeInfo)
            assert new is None or isinstance(new, NodeInfo)
            self._node_changed(old, new)
        elif resource == "l2_statuses":
            assert old is None or isinstance(old, L2StatusInfo)
            assert new is None or isinstance(new, L2StatusInfo)
            self._status_changed(key, old, new)
        else:
            raise ValueError(f"unknown resource {resource!r}")

    def _service_changed(self, old: ServiceInfo | None, new: ServiceInfo | None) -> None:
        for info in (old, new):
            if info is None:
                continue
            key = (info.namespace, info.name)
            previous = self._labelled.pop(key, None)
            if previous is not None:
                for pair_key, value in previous.selector:
                    pair = (previous.namespace, pair_key, value)
                    self._services_by_selector_pair[pair].discard(key)
                    if not self._services_by_selector_pair[pair]:
                        del self._services_by_selector_pair[pair]
            self._dirty_inputs.add(key)
        if new is not None and new.labelled:
            key = (new.namespace, new.name)
            self._labelled[key] = new
            for pair_key, value in new.selector:
                self._services_by_selector_pair[(new.namespace, pair_key, value)].add(key)

    def _slice_changed(self, key: str, old: SliceInfo | None, new: SliceInfo | None) -> None:
        for info in (old, new):
            if info is None or info.service_name is None:
                continue
            service = (info.namespace, info.service_name)
            self._slices_by_service[service].discard(key)
            if not self._slices_by_service[service]:
                del self._slices_by_service[service]
            if service in self._labelled:
                self._dirty_inputs.add(service)
        if new is not None and new.service_name is not None:
            self._slices_by_service[(new.namespace, new.service_name)].add(key)

    def _pod_changed(self, key: str, old: PodInfo | None, new: PodInfo | None) -> None:
        node_name = self.settings.node_name
        for info, step in ((old, -1), (new, 1)):
            if info is None:
                continue
            for label, value in info.labels:
                pair = (info.namespace, label, value)
                if step < 0:
                    self._pods_by_label[pair].discard(key)
                    if not self._pods_by_label[pair]:
                        del self._pods_by_label[pair]
                else:
                    self._pods_by_label[pair].add(key)
            self._count_node_addresses(node_addresses_of_pod(info), step)
            if info.node_name == node_name:
                self._count_local_ips((ip for ip, _ in pod_sources(info)), step)
            # The Services whose selector holds one of its labels, and picks it.
            for label, value in info.labels:
                for service in self._services_by_selector_pair.get(
                    (info.namespace, label, value), ()
                ):
                    if selects(self._labelled[service], info):
                        self._dirty_inputs.add(service)

    def _node_changed(self, old: NodeInfo | None, new: NodeInfo | None) -> None:
        for info, step in ((old, -1), (new, 1)):
            if info is None:
                continue
            self._count_node_addresses(info.addresses, step)
            # Whether the node is known, and its next hops, decide its Services' gateway.
            for status_key in self._statuses_by_node.get(info.name, ()):
                service = self._service_of_status(self.cluster.l2_statuses[status_key])
                if service is not None and service in self._labelled:
                    self._dirty_inputs.add(service)
        name = (new or old).name  # type: ignore[union-attr]
        if name == self.settings.node_name:
            own = new.pod_cidrs if new is not None else ()
            self._own_networks = [ipaddress.ip_network(cidr) for cidr in own]
            self._guard_rebuild = True

    def _status_changed(self, key: str, old: L2StatusInfo | None, new: L2StatusInfo | None) -> None:
        for info, adding in ((old, False), (new, True)):
            service = self._service_of_status(info)
            if info is None or service is None:
                continue
            if adding:
                self._statuses_by_service[service].add(key)
                if info.node is not None:
                    self._statuses_by_node[info.node].add(key)
            else:
                self._statuses_by_service[service].discard(key)
                if info.node is not None:
                    self._statuses_by_node[info.node].discard(key)
                    if not self._statuses_by_node[info.node]:
                        del self._statuses_by_node[info.node]
            if service in self._labelled or service in self._inputs:
                self._dirty_inputs.add(service)

    def _service_of_status(self, info: L2StatusInfo | None) -> ServiceKey | None:
        """The Service a ServiceL2Status in METALLB_NAMESPACE names, or None."""
        if info is None or info.namespace != self.settings.metallb_namespace:
            return None
        if info.service_namespace is None or info.service_name is None:
            return None
        return (info.service_namespace, info.service_name)

    def _count_node_addresses(self, addresses: Iterable[str], step: int) -> None:
        for address in addresses:
            before = self._node_address_count[address] > 0
            self._node_address_count[address] += step
            after = self._node_address_count[address] > 0
            if self._node_address_count[address] <= 0:
                del self._node_address_count[address]
            if before != after:
                self._dirty_sources.update(self._services_by_candidate.get(address, ()))
                self._dirty_guard.add(address)

    def _count_local_ips(self, ips: Iterable[str], step: int) -> None:
        for ip in ips:
            before = self._local_ip_count[ip] > 0
            self._local_ip_count[ip] += step
            if self._local_ip_count[ip] <= 0:
                del self._local_ip_count[ip]
            if before != (self._local_ip_count[ip] > 0):
                self._dirty_guard.add(ip)

    # --- computation -----------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Whether :meth:`compute` has anything to do."""
        return bool(
            self._dirty_inputs
            or self._dirty_sources
            or self._dirty_guard
            or self._guard_rebuild
            or self._allocation_dirty
        )

    def compute(self) -> TrackerResult:
        """Recompute what the events since the last call touched; returns the whole state."""
        changed: set[ServiceKey] = set()
        for service in sorted(self._dirty_inputs):
            self._compute_inputs(service)
        self._dirty_inputs.clear()
        if self._allocation_dirty:
            self._allocation_dirty = False
            allocation = allocate_slots(self._gateway_count, self._allocation, self._capacity)
            for node in allocation.keys() | self._allocation.keys():
                if allocation.get(node) != self._allocation.get(node):
                    self._dirty_sources.update(self._services_by_gateway.get(node, ()))
            self._allocation = allocation
        # Claims first for every dirty Service, then the winners: a Service that wants or
        # stops wanting an IP changes which Service gets it.
        dirty = set(self._dirty_sources)
        self._dirty_sources.clear()
        for service in sorted(dirty):
            dirty.update(self._compute_wanted(service))
        for service in sorted(dirty):
            if self._compute_egress(service):
                changed.add(service)
        self._update_guard()
        state = NodeDesiredState(
            node=self.settings.node_name,
            fwmask=self.settings.fwmask,
            exclude_dst_ipv4=self.settings.exclude_dst_ipv4,
            exclude_dst_ipv6=self.settings.exclude_dst_ipv6,
            services=tuple(self._services),
            routes=self._routes(),
            transit_guard_ipv4=tuple(entry for _, entry in self._guard[Family.IPV4]),
            transit_guard_ipv6=tuple(entry for _, entry in self._guard[Family.IPV6]),
        )
        problems = tuple(
            sorted(
                {problem for problems in self._problems.values() for problem in problems},
                key=str,
            )
        )
        return TrackerResult(
            state=state,
            allocation=dict(self._allocation),
            problems=problems,
            changed=tuple(f"{namespace}/{name}" for namespace, name in sorted(changed)),
        )

    def _compute_inputs(self, service: ServiceKey) -> None:
        old = self._inputs.get(service)
        info = self._labelled.get(service)
        if info is None:
            new = None
        else:
            problems: list[Problem] = []
            statuses = sorted(
                (self.cluster.l2_statuses[k] for k in self._statuses_by_service.get(service, ())),
                key=lambda s: (s.namespace, s.name),
            )
            gateway = gateway_of(info, statuses, self.cluster.nodes, problems)
            slices = [self.cluster.slices[k] for k in self._slices_by_service.get(service, ())]
            pods = [self.cluster.pods[k] for k in self._selected_pods(info)]
            new = _ServiceInputs(
                info, gateway, tuple(problems), candidate_sources(info, slices, pods)
            )
        if new == old:
            return
        self._dirty_sources.add(service)
        for inputs, step in ((old, -1), (new, 1)):
            if inputs is None:
                continue
            for ip, _, endpoint_node in inputs.candidates:
                if step > 0:
                    self._services_by_candidate[ip].add(service)
                else:
                    self._services_by_candidate[ip].discard(service)
                    if not self._services_by_candidate[ip]:
                        del self._services_by_candidate[ip]
                if endpoint_node is not None and endpoint_node != self.settings.node_name:
                    self._guard_count[ip] += step
                    if self._guard_count[ip] <= 0:
                        del self._guard_count[ip]
                    self._dirty_guard.add(ip)
            if inputs.gateway is not None:
                if step > 0:
                    self._services_by_gateway[inputs.gateway].add(service)
                else:
                    self._services_by_gateway[inputs.gateway].discard(service)
                    if not self._services_by_gateway[inputs.gateway]:
                        del self._services_by_gateway[inputs.gateway]
                if _has_lb_ip(inputs.info):
                    before = self._gateway_count[inputs.gateway] > 0
                    self._gateway_count[inputs.gateway] += step
                    if self._gateway_count[inputs.gateway] <= 0:
                        del self._gateway_count[inputs.gateway]
                    if before != (self._gateway_count[inputs.gateway] > 0):
                        self._allocation_dirty = True
        if new is None:
            del self._inputs[service]
        else:
            self._inputs[service] = new

    def _selected_pods(self, info: ServiceInfo) -> set[str]:
        """The keys of the Pods a Service's selector picks, from the label index."""
        if not info.selector:
            return set()
        candidates = sorted(
            (self._pods_by_label.get((info.namespace, k, v), set()) for k, v in info.selector),
            key=len,
        )
        return candidates[0].intersection(*candidates[1:])

    def _compute_wanted(self, service: ServiceKey) -> set[ServiceKey]:
        """Stage 2a: the sources this node would take of one Service, and the claims index.
        Returns the other Services whose claims on an IP changed with it."""
        inputs = self._inputs.get(service)
        wanted: dict[str, Family] = {}
        problems: dict[Problem, None] = {}
        if inputs is not None:
            node_name = self.settings.node_name
            take_all = not self.settings.filter_endpoints_for_node or inputs.gateway == node_name
            service_key = f"{service[0]}/{service[1]}"
            for ip, family, endpoint_node in inputs.candidates:
                if ip in self._node_address_count:
                    problems[node_address_problem(service_key, ip)] = None
                    continue
                if take_all or endpoint_node == node_name:
                    wanted.setdefault(ip, family)
        old = self._wanted.get(service, {})
        self._address_problems[service] = tuple(problems)
        if inputs is None:
            self._wanted.pop(service, None)
            self._address_problems.pop(service, None)
        else:
            self._wanted[service] = wanted
        touched: set[ServiceKey] = set()
        for ip in old.keys() - wanted.keys():
            claimants = self._claims[ip]
            claimants.discard(service)
            touched.update(claimants)
            if not claimants:
                del self._claims[ip]
        for ip in wanted.keys() - old.keys():
            claimants = self._claims[ip]
            touched.update(claimants)
            claimants.add(service)
        return touched

    def _compute_egress(self, service: ServiceKey) -> bool:
        """Stage 2b: one Service's egress from its claims; True when it changed."""
        inputs = self._inputs.get(service)
        old = self._egress.get(service)
        if inputs is None:
            self._problems.pop(service, None)
            if old is None:
                return False
            self._forget_marks(old)
            del self._egress[service]
            index = bisect.bisect_left(self._order, service)
            del self._order[index]
            del self._services[index]
            return True
        info = inputs.info
        node_name = self.settings.node_name
        service_key = f"{service[0]}/{service[1]}"
        problems = list(inputs.gateway_problems) + list(self._address_problems.get(service, ()))
        sources: dict[Family, list[str]] = {Family.IPV4: [], Family.IPV6: []}
        for ip, family in self._wanted.get(service, {}).items():
            owner = min(self._claims[ip])
            if owner != service:
                problems.append(conflict_problem(service_key, ip, f"{owner[0]}/{owner[1]}"))
                continue
            sources[family].append(ip)
        families: list[FamilyEgress] = []
        for family, lb_ip in ((Family.IPV4, info.lb_ipv4), (Family.IPV6, info.lb_ipv6)):
            destinations = family_destinations(info, family)
            if not sources[family] or destinations is None:
                continue
            families.append(
                family_egress(
                    family,
                    tuple(sorted(sources[family], key=ip_sort_key)),
                    lb_ip,
                    inputs.gateway,
                    node_name,
                    self.cluster.nodes,
                    self._allocation,
                    self._shift,
                    destinations,
                )
            )
        self._problems[service] = tuple(problems)
        new = ServiceEgress(
            namespace=info.namespace,
            name=info.name,
            role=role_of(tuple(families), inputs.gateway == node_name),
            gateway_node=inputs.gateway,
            lb_ips=tuple(ip for ip in (info.lb_ipv4, info.lb_ipv6) if ip is not None),
            families=tuple(families),
            destination_ports=info.destination_ports,
        )
        if new == old:
            return False
        if old is not None:
            self._forget_marks(old)
            index = bisect.bisect_left(self._order, service)
            self._services[index] = new
        else:
            index = bisect.bisect_left(self._order, service)
            self._order.insert(index, service)
            self._services.insert(index, new)
        self._egress[service] = new
        for gateway in self._mark_gateways(new):
            self._mark_count[gateway] += 1
        return True

    @staticmethod
    def _mark_gateways(egress: ServiceEgress) -> set[str]:
        if egress.gateway_node is None:
            return set()
        if any(entry.action == Action.MARK for entry in egress.families):
            return {egress.gateway_node}
        return set()

    def _forget_marks(self, egress: ServiceEgress) -> None:
        for gateway in self._mark_gateways(egress):
            self._mark_count[gateway] -= 1
            if self._mark_count[gateway] <= 0:
                del self._mark_count[gateway]

    def _routes(self) -> tuple[GatewayRoute, ...]:
        # At most one route per slot of FIREWALL_MASK (15 by default): rebuilt every time.
        return tuple(
            gateway_route(
                gateway, self._allocation[gateway], self.cluster.nodes[gateway], self.settings
            )
            for gateway in sorted(self._mark_count, key=lambda node: self._allocation[node])
        )

    def _update_guard(self) -> None:
        if self._guard_rebuild:
            self._guard_rebuild = False
            self._dirty_guard.update(self._guard_members)
            self._dirty_guard.update(self._guard_count)
        for ip in self._dirty_guard:
            # Counted only for occurrences on another known node.
            member = self._guard_count.get(ip, 0) > 0 and not guard_excludes(
                ip, self._local_ip_count, self._node_address_count, self._own_networks
            )
            if member == (ip in self._guard_members):
                continue
            family = Family.IPV6 if ":" in ip else Family.IPV4
            entries = self._guard[family]
            item = (ip_sort_key(ip), guard_entry(ip))
            if member:
                self._guard_members.add(ip)
                bisect.insort(entries, item)
            else:
                self._guard_members.discard(ip)
                del entries[bisect.bisect_left(entries, item)]
        self._dirty_guard.clear()
