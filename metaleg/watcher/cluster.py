"""Typed views of the cluster objects metaleg reads, parsed leniently from raw JSON.

The API server hands us dictionaries; anything in them may be missing or
malformed (a hand-edited object, an older MetalLB, a bug elsewhere). Parsing
never raises for a bad *field*: the field is skipped and a :class:`Problem`
names the object and the field. Only an object without a usable identity
(no ``metadata.name``) is rejected as a whole, with :class:`ObjectError`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec

from metaleg.model import Family, PortRange
from metaleg.watcher.destinations import (
    CIDRS_ANNOTATION,
    PORTS_ANNOTATION,
    PolicyError,
    parse_cidrs,
    parse_ports,
)

_Parsed = TypeVar("_Parsed")

REWRITE_LABEL = "metaleg.de/rewriteSrcIP"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
L2_SERVICE_NAME_LABEL = "metallb.io/service-name"
L2_SERVICE_NAMESPACE_LABEL = "metallb.io/service-namespace"


class Problem(msgspec.Struct, frozen=True):
    """Something wrong in a cluster object that metaleg worked around (logged, not fatal)."""

    kind: str
    object: str
    """``namespace/name`` or ``name``."""
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.object}: {self.field}: {self.message}"


class ObjectError(ValueError):
    """An object is unusable as a whole (for example it has no name)."""


class ServiceInfo(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    labelled: bool
    """The opt-in label has exactly the value "true"."""
    lb_ipv4: str | None
    """First IPv4 address in ``status.loadBalancer.ingress[].ip``."""
    lb_ipv6: str | None
    selector: tuple[tuple[str, str], ...] = ()
    destination_cidrs: tuple[str, ...] | None = None
    """``metaleg.de/destinationCIDRs`` parsed; None: absent or invalid (every destination)."""
    destination_ports: tuple[PortRange, ...] = ()
    """``metaleg.de/destinationPorts`` parsed; empty: absent or invalid (every port)."""
    """``spec.selector`` as sorted pairs; empty: no selector (then no Pod matches)."""


class Endpoint(msgspec.Struct, frozen=True):
    ip: str
    family: Family
    node_name: str | None


class SliceInfo(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    service_name: str | None
    endpoints: tuple[Endpoint, ...]


class NodeInfo(msgspec.Struct, frozen=True):
    name: str
    ipv4: str | None
    """First IPv4 InternalIP: the next hop towards this node."""
    ipv6: str | None
    pod_cidrs: tuple[str, ...] = ()
    """``spec.podCIDRs`` (or ``spec.podCIDR``), canonical networks."""
    addresses: tuple[str, ...] = ()
    """Every InternalIP and ExternalIP, canonical: never a source (see ``node_addresses``)."""


class PodInfo(msgspec.Struct, frozen=True):
    """A Pod that a labelled Service's selector may match (the watcher lists only those, on
    every node): its IPs become sources as soon as the Pod shows them, before an
    EndpointSlice lists them (which can take seconds)."""

    namespace: str
    name: str
    node_name: str | None
    ips: tuple[tuple[str, Family], ...]
    labels: tuple[tuple[str, str], ...]
    host_network: bool
    finished: bool
    """Phase Succeeded or Failed: the Pod sends nothing any more and its IP may be reused."""
    host_ips: tuple[str, ...] = ()
    """``status.hostIPs`` (or ``status.hostIP``): its node's addresses, never a source."""


class L2StatusInfo(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    service_namespace: str | None
    service_name: str | None
    node: str | None
    """``status.node``: the node that announces the Service's IP."""


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _identity(obj: Mapping[str, Any], kind: str, namespaced: bool) -> tuple[str, str]:
    metadata = _mapping(obj.get("metadata"))
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{kind} without metadata.name")
    if not namespaced:
        return "", name
    namespace = metadata.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise ObjectError(f"{kind} {name} without metadata.namespace")
    return namespace, name


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(_mapping(obj.get("metadata")).get("labels"))


def canonical_ip(text: Any) -> tuple[str, Family] | None:
    """The canonical form and family of an IP address string, or None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return str(address), Family(address.version)


def parse_service(obj: Mapping[str, Any], problems: list[Problem]) -> ServiceInfo:
    """Parse a ``v1 Service``; invalid ingress IPs are skipped and reported."""
    namespace, name = _identity(obj, "Service", namespaced=True)
    labelled = _labels(obj).get(REWRITE_LABEL) == "true"
    lb_ipv4: str | None = None
    lb_ipv6: str | None = None
    ingress = _list(_mapping(_mapping(obj.get("status")).get("loadBalancer")).get("ingress"))
    for index, entry in enumerate(ingress):
        raw_ip = _mapping(entry).get("ip")
        if raw_ip is None:
            continue  # hostname-only ingress: not an address we can SNAT to
        parsed = canonical_ip(raw_ip)
        if parsed is None:
            problems.append(
                Problem(
                    "Service",
                    f"{namespace}/{name}",
                    f"status.loadBalancer.ingress[{index}].ip",
                    f"{raw_ip!r} is not an IP address; skipped",
                )
            )
            continue
        address, family = parsed
        if family == Family.IPV4 and lb_ipv4 is None:
            lb_ipv4 = address
        elif family == Family.IPV6 and lb_ipv6 is None:
            lb_ipv6 = address
    selector = _string_pairs(_mapping(obj.get("spec")).get("selector"))
    annotations = _mapping(_mapping(obj.get("metadata")).get("annotations"))
    key = f"{namespace}/{name}"
    cidrs = _annotation(annotations, CIDRS_ANNOTATION, parse_cidrs, key, problems)
    ports = _annotation(annotations, PORTS_ANNOTATION, parse_ports, key, problems)
    return ServiceInfo(namespace, name, labelled, lb_ipv4, lb_ipv6, selector, cidrs, ports or ())


def _annotation(
    annotations: Mapping[str, Any],
    annotation: str,
    parse: Callable[[str], _Parsed],
    key: str,
    problems: list[Problem],
) -> _Parsed | None:
    """An annotation parsed; None when absent, and when invalid (with a Problem): the
    Service is then treated as if it were absent (see :mod:`metaleg.watcher.destinations`)."""
    raw = annotations.get(annotation)
    if raw is None:
        return None
    field = f"metadata.annotations[{annotation}]"
    ignored = "the annotation is ignored: every destination takes the LoadBalancer IP"
    if not isinstance(raw, str):
        problems.append(Problem("Service", key, field, f"{raw!r} is not a string; {ignored}"))
        return None
    try:
        return parse(raw)
    except PolicyError as error:
        problems.append(Problem("Service", key, field, f"{error}; {ignored}"))
        return None


def _string_pairs(value: Any) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted(
            (k, v) for k, v in _mapping(value).items() if isinstance(k, str) and isinstance(v, str)
        )
    )


def parse_endpoint_slice(obj: Mapping[str, Any], problems: list[Problem]) -> SliceInfo:
    """Parse a ``discovery.k8s.io/v1 EndpointSlice``; every endpoint counts, ready or not."""
    namespace, name = _identity(obj, "EndpointSlice", namespaced=True)
    service_name = _labels(obj).get(SERVICE_NAME_LABEL)
    address_type = obj.get("addressType")
    expected = {"IPv4": Family.IPV4, "IPv6": Family.IPV6}.get(
        address_type if isinstance(address_type, str) else ""
    )
    endpoints: list[Endpoint] = []
    if expected is None:
        # FQDN slices (or garbage) carry no pod IPs we could match on.
        if address_type != "FQDN":
            problems.append(
                Problem(
                    "EndpointSlice",
                    f"{namespace}/{name}",
                    "addressType",
                    f"{address_type!r} is not IPv4 or IPv6; slice ignored",
                )
            )
        return SliceInfo(
            namespace, name, service_name if isinstance(service_name, str) else None, ()
        )
    for index, endpoint in enumerate(_list(obj.get("endpoints"))):
        endpoint = _mapping(endpoint)
        node_name = endpoint.get("nodeName")
        node = node_name if isinstance(node_name, str) and node_name else None
        for position, raw_ip in enumerate(_list(endpoint.get("addresses"))):
            parsed = canonical_ip(raw_ip)
            if parsed is None or parsed[1] != expected:
                problems.append(
                    Problem(
                        "EndpointSlice",
                        f"{namespace}/{name}",
                        f"endpoints[{index}].addresses[{position}]",
                        f"{raw_ip!r} is not an {address_type} address; skipped",
                    )
                )
                continue
            endpoints.append(Endpoint(parsed[0], parsed[1], node))
    return SliceInfo(
        namespace,
        name,
        service_name if isinstance(service_name, str) else None,
        tuple(endpoints),
    )


def parse_node(obj: Mapping[str, Any], problems: list[Problem]) -> NodeInfo:
    """Parse a ``v1 Node``: the first InternalIP of each family."""
    _, name = _identity(obj, "Node", namespaced=False)
    ipv4: str | None = None
    ipv6: str | None = None
    addresses: list[str] = []
    for index, address in enumerate(_list(_mapping(obj.get("status")).get("addresses"))):
        address = _mapping(address)
        if address.get("type") not in ("InternalIP", "ExternalIP"):
            continue
        parsed = canonical_ip(address.get("address"))
        if parsed is None:
            problems.append(
                Problem(
                    "Node",
                    name,
                    f"status.addresses[{index}].address",
                    f"{address.get('address')!r} is not an IP address; skipped",
                )
            )
            continue
        addresses.append(parsed[0])
        if address.get("type") != "InternalIP":
            continue
        if parsed[1] == Family.IPV4 and ipv4 is None:
            ipv4 = parsed[0]
        elif parsed[1] == Family.IPV6 and ipv6 is None:
            ipv6 = parsed[0]
    spec = _mapping(obj.get("spec"))
    raw_cidrs = _list(spec.get("podCIDRs")) or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    pod_cidrs: list[str] = []
    for index, raw in enumerate(raw_cidrs):
        try:
            pod_cidrs.append(str(ipaddress.ip_network(str(raw), strict=False)))
        except ValueError:
            problems.append(
                Problem("Node", name, f"spec.podCIDRs[{index}]", f"{raw!r} is not a CIDR; skipped")
            )
    return NodeInfo(
        name, ipv4, ipv6, tuple(dict.fromkeys(pod_cidrs)), tuple(sorted(set(addresses)))
    )


def parse_pod(obj: Mapping[str, Any], problems: list[Problem]) -> PodInfo:
    """Parse a ``v1 Pod``: its IPs (``status.podIPs``, else ``status.podIP``), labels, node."""
    namespace, name = _identity(obj, "Pod", namespaced=True)
    spec = _mapping(obj.get("spec"))
    status = _mapping(obj.get("status"))
    pod = f"{namespace}/{name}"
    ips = _status_ips(status, "podIPs", "podIP", pod, problems)
    host_ips = [ip for ip, _ in _status_ips(status, "hostIPs", "hostIP", pod, problems)]
    node_name = spec.get("nodeName")
    return PodInfo(
        namespace=namespace,
        name=name,
        node_name=node_name if isinstance(node_name, str) and node_name else None,
        ips=tuple(dict.fromkeys(ips)),
        labels=_string_pairs(_mapping(obj.get("metadata")).get("labels")),
        host_network=spec.get("hostNetwork") is True,
        finished=status.get("phase") in ("Succeeded", "Failed"),
        host_ips=tuple(sorted(set(host_ips))),
    )


def _status_ips(
    status: Mapping[str, Any],
    plural: str,
    singular: str,
    pod: str,
    problems: list[Problem],
) -> list[tuple[str, Family]]:
    """A Pod status's ``podIPs``/``hostIPs`` (else ``podIP``/``hostIP``), canonical; entries
    that are not IP addresses are skipped and reported."""
    raw_ips = [_mapping(entry).get("ip") for entry in _list(status.get(plural))]
    if not raw_ips and status.get(singular):
        raw_ips = [status.get(singular)]
    ips: list[tuple[str, Family]] = []
    for index, raw in enumerate(raw_ips):
        parsed = canonical_ip(raw)
        if parsed is None:
            problems.append(
                Problem(
                    "Pod",
                    pod,
                    f"status.{plural}[{index}].ip",
                    f"{raw!r} is not an IP address; skipped",
                )
            )
            continue
        ips.append(parsed)
    return ips


def parse_l2_status(obj: Mapping[str, Any], problems: list[Problem]) -> L2StatusInfo:
    """Parse a ``metallb.io/v1beta1 ServiceL2Status``."""
    namespace, name = _identity(obj, "ServiceL2Status", namespaced=True)
    labels = _labels(obj)
    service_namespace = labels.get(L2_SERVICE_NAMESPACE_LABEL)
    service_name = labels.get(L2_SERVICE_NAME_LABEL)
    node = _mapping(obj.get("status")).get("node")
    if node is not None and (not isinstance(node, str) or not node):
        problems.append(
            Problem(
                "ServiceL2Status",
                f"{namespace}/{name}",
                "status.node",
                f"{node!r} is not a node name",
            )
        )
        node = None
    return L2StatusInfo(
        namespace,
        name,
        service_namespace if isinstance(service_namespace, str) else None,
        service_name if isinstance(service_name, str) else None,
        node,
    )


class ClusterState(msgspec.Struct):
    """The parsed objects the watcher holds, keyed by ``namespace/name`` (or ``name`` for nodes)."""

    services: dict[str, ServiceInfo] = msgspec.field(default_factory=dict)
    slices: dict[str, SliceInfo] = msgspec.field(default_factory=dict)
    nodes: dict[str, NodeInfo] = msgspec.field(default_factory=dict)
    l2_statuses: dict[str, L2StatusInfo] = msgspec.field(default_factory=dict)
    pods: dict[str, PodInfo] = msgspec.field(default_factory=dict)


# --- what the watcher decodes of a list -----------------------------------------------------------
#
# A list page is decoded into these Structs, which name only the fields the parsers above
# read (every leaf typed ``Any``, so a malformed value still reaches its parser and becomes a
# Problem): the rest of each object (managedFields, annotations, conditions, targetRefs, most
# of a Pod) is skipped by the decoder instead of becoming Python objects. A field a parser
# starts to read must be added here too (tests/test_memory_watcher.py checks that parsing the
# slim form gives the same result as parsing the whole object).


class _Wire(msgspec.Struct, omit_defaults=True):
    """Fields left at their default (absent from the JSON, or null) are left out again by
    :func:`slim_items`, so the parsers see the same keys as in the whole object."""


class _WireMetadata(_Wire):
    name: Any = None
    namespace: Any = None
    labels: Any = None
    resourceVersion: Any = None


class _WireServiceSpec(_Wire):
    selector: Any = None


class _WireLoadBalancer(_Wire):
    ingress: Any = None


class _WireServiceStatus(_Wire):
    loadBalancer: _WireLoadBalancer | None = None


class _WireServiceMetadata(_WireMetadata):
    annotations: Any = None
    """Only a Service's (the destination policy); a Pod's can be large and are not read."""


class WireService(_Wire):
    metadata: _WireServiceMetadata | None = None
    spec: _WireServiceSpec | None = None
    status: _WireServiceStatus | None = None


class _WireEndpoint(_Wire):
    addresses: Any = None
    nodeName: Any = None


class WireEndpointSlice(_Wire):
    metadata: _WireMetadata | None = None
    addressType: Any = None
    endpoints: list[_WireEndpoint] | None = None


class _WireNodeSpec(_Wire):
    podCIDRs: Any = None
    podCIDR: Any = None


class _WireNodeStatus(_Wire):
    addresses: Any = None


class WireNode(_Wire):
    metadata: _WireMetadata | None = None
    spec: _WireNodeSpec | None = None
    status: _WireNodeStatus | None = None


class _WirePodSpec(_Wire):
    nodeName: Any = None
    hostNetwork: Any = None


class _WirePodStatus(_Wire):
    podIPs: Any = None
    podIP: Any = None
    hostIPs: Any = None
    hostIP: Any = None
    phase: Any = None


class WirePod(_Wire):
    metadata: _WireMetadata | None = None
    spec: _WirePodSpec | None = None
    status: _WirePodStatus | None = None


class _WireL2Status(_Wire):
    node: Any = None


class WireL2Status(_Wire):
    metadata: _WireMetadata | None = None
    status: _WireL2Status | None = None


class _WireListMetadata(_Wire):
    resourceVersion: Any = None
    # "continue" is a Python keyword: renamed.
    continue_: Any = msgspec.field(default=None, name="continue")


def list_decoder(item: type[msgspec.Struct]) -> msgspec.json.Decoder[Any]:
    """A decoder of a list page whose items are ``item`` (one of the ``Wire*`` Structs)."""
    page = msgspec.defstruct(
        f"{item.__name__}List",
        [
            ("metadata", _WireListMetadata | None, None),
            ("items", list[item] | None, None),  # type: ignore[valid-type]
        ],
        omit_defaults=True,
    )
    return msgspec.json.Decoder(page)


def slim_page(decoder: msgspec.json.Decoder[Any], data: bytes) -> dict[str, Any]:
    """A list page as ``{"metadata": ..., "items": [...]}`` of plain dicts holding only the
    fields the parsers read; raises ``msgspec.DecodeError`` (or ``ValidationError``) when the
    page does not have that shape (the caller then decodes it whole)."""
    result: dict[str, Any] = msgspec.to_builtins(decoder.decode(data))
    return result
