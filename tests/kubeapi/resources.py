"""Resource types the emulator serves, and their per-type behaviour.

A :class:`ResourceType` says where a resource lives in the API (group,
version, plural, scope), how it appears in discovery, and the few per-type
rules of the real registry that clients notice: whether it has a ``status``
subresource (then main-resource writes keep ``.status`` and status writes
change only ``.status``), what ``.status`` a create starts with, defaulting
(a Service gets a ClusterIP and node ports), which field selectors work,
whether ``metadata.generation`` is maintained and what DELETE returns.

Adding a resource is one more :class:`ResourceType` in :func:`default_resources`
or a call to ``Store.register``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import invalid
from .selectors import is_dns1035_label, is_dns1123_label, is_dns1123_subdomain

Object = dict[str, Any]
#: ``defaulter(new, old, others)``: fill in defaults of ``new`` in place (``old``
#: is the stored object on update, None on create; ``others`` are the other
#: stored objects of the type); raise :class:`~.errors.ApiError` to reject.
Defaulter = Callable[[Object, Object | None, Iterable[Object]], None]

KEEP_STATUS = "keep"


@dataclass(frozen=True)
class ResourceType:
    """A REST resource: ``/api/v1/namespaces/<ns>/services`` is ("", "v1", "services")."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    #: subresources served, e.g. ``frozenset({"status"})``
    subresources: frozenset[str] = frozenset()
    #: ``.status`` a create starts with when the type has a status subresource:
    #: a dict (services: ``{"loadBalancer": {}}``), None (dropped, as for custom
    #: resources) or :data:`KEEP_STATUS` (nodes: kept as sent)
    create_status: Mapping[str, Any] | str | None = None
    defaulter: Defaulter | None = None
    #: extra paths usable in ``fieldSelector`` besides metadata.name/namespace
    field_labels: frozenset[str] = frozenset()
    #: PUT without ``metadata.resourceVersion`` allowed (custom resources: no)
    allow_unconditional_update: bool = True
    #: maintain ``metadata.generation`` (bumped on changes outside metadata/status)
    generation: bool = False
    #: DELETE answers with the deleted object instead of a ``Status``
    return_deleted_object: bool = False
    #: served through a CustomResourceDefinition (list items carry kind/apiVersion)
    custom: bool = False
    #: "subdomain" (DNS-1123 subdomain), "label" (DNS-1123 label) or "dns1035"
    name_format: str = "subdomain"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Unique id of the type: ``v1/services``, ``metallb.io/v1beta1/servicel2statuses``."""
        return f"{self.api_version}/{self.plural}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def name_error(self, name: str) -> str | None:
        """Why ``name`` is not a valid object name for this type, or None."""
        check = {
            "subdomain": is_dns1123_subdomain,
            "label": is_dns1123_label,
            "dns1035": is_dns1035_label,
        }[self.name_format]
        if check(name):
            return None
        return {
            "subdomain": "a lowercase RFC 1123 subdomain must consist of lower case "
            "alphanumeric characters, '-' or '.', and must start and end with an "
            "alphanumeric character",
            "label": "a lowercase RFC 1123 label must consist of lower case alphanumeric "
            "characters or '-', and must start and end with an alphanumeric character",
            "dns1035": "a DNS-1035 label must consist of lower case alphanumeric "
            "characters or '-', start with an alphabetic character, and end with an "
            "alphanumeric character",
        }[self.name_format]

    def discovery(self) -> list[dict[str, Any]]:
        """The entries of this type in its group version's ``APIResourceList``."""
        entry: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": [
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ],
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        entries = [entry]
        for sub in sorted(self.subresources):
            entries.append(
                {
                    "name": f"{self.plural}/{sub}",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        return entries


# --- defaulters -------------------------------------------------------------

SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")
NODE_PORT_RANGE = range(30000, 32768)


def _service_defaults(new: Object, old: Object | None, others: Iterable[Object]) -> None:
    """Service defaulting and IP/port allocation as done by the API server."""
    spec = new.setdefault("spec", {})
    old_spec = (old or {}).get("spec", {})
    name = new.get("metadata", {}).get("name", "")
    service_type = spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if "targetPort" not in port and "port" in port:
            port["targetPort"] = port["port"]
    if service_type == "ExternalName":
        return
    others = list(others)
    used_ips = {o.get("spec", {}).get("clusterIP") for o in others}
    used_ports = {
        p.get("nodePort") for o in others for p in o.get("spec", {}).get("ports") or []
    } | {o.get("spec", {}).get("healthCheckNodePort") for o in others}

    # ClusterIP: kept from the stored object on update, allocated on create.
    old_ip = old_spec.get("clusterIP")
    if old_ip and not spec.get("clusterIP"):
        spec["clusterIP"] = old_ip
        spec.setdefault("clusterIPs", old_spec.get("clusterIPs", [old_ip]))
    if old_ip and spec.get("clusterIP") != old_ip:
        raise invalid(
            "Service",
            "",
            name,
            "spec.clusterIPs[0]",
            "FieldValueInvalid",
            f'Invalid value: "{spec.get("clusterIP")}": may not change once set',
        )
    if not spec.get("clusterIP"):
        for address in SERVICE_CIDR.hosts():
            candidate = str(address)
            if int(address) - int(SERVICE_CIDR.network_address) >= 10 and candidate not in used_ips:
                spec["clusterIP"] = candidate
                break
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")

    def allocate() -> int:
        for candidate in NODE_PORT_RANGE:
            if candidate not in used_ports:
                used_ports.add(candidate)
                return candidate
        raise invalid("Service", "", name, "spec.ports", "FieldValueInvalid", "no node ports left")

    if service_type in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
        if service_type == "LoadBalancer":
            spec.setdefault("allocateLoadBalancerNodePorts", True)
        old_node_ports = {
            (p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
            for p in old_spec.get("ports") or []
        }
        if service_type == "NodePort" or spec.get("allocateLoadBalancerNodePorts"):
            for port in spec.get("ports") or []:
                if not port.get("nodePort"):
                    kept = old_node_ports.get((port.get("port"), port.get("protocol")))
                    port["nodePort"] = kept or allocate()
        if (
            service_type == "LoadBalancer"
            and spec["externalTrafficPolicy"] == "Local"
            and not spec.get("healthCheckNodePort")
        ):
            spec["healthCheckNodePort"] = old_spec.get("healthCheckNodePort") or allocate()
    else:
        spec.pop("externalTrafficPolicy", None)


def _namespace_defaults(new: Object, old: Object | None, others: Iterable[Object]) -> None:
    metadata = new.setdefault("metadata", {})
    labels = metadata.get("labels") or {}
    labels["kubernetes.io/metadata.name"] = metadata.get("name", "")
    metadata["labels"] = labels
    new.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])


_EVENT_FIELDS = (
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)


def default_resources() -> list[ResourceType]:
    """The resources served out of the box."""
    status = frozenset({"status"})
    return [
        ResourceType(
            "",
            "v1",
            "namespaces",
            "Namespace",
            False,
            short_names=("ns",),
            subresources=status,
            create_status={"phase": "Active"},
            defaulter=_namespace_defaults,
            field_labels=frozenset({"status.phase"}),
            name_format="label",
        ),
        ResourceType(
            "",
            "v1",
            "nodes",
            "Node",
            False,
            short_names=("no",),
            subresources=status,
            create_status=KEEP_STATUS,
            field_labels=frozenset({"spec.unschedulable"}),
        ),
        ResourceType(
            "",
            "v1",
            "services",
            "Service",
            True,
            short_names=("svc",),
            categories=("all",),
            subresources=status,
            create_status={"loadBalancer": {}},
            defaulter=_service_defaults,
            return_deleted_object=True,
            name_format="dns1035",
        ),
        ResourceType(
            "", "v1", "endpoints", "Endpoints", True, singular="endpoints", short_names=("ep",)
        ),
        ResourceType(
            "",
            "v1",
            "pods",
            "Pod",
            True,
            short_names=("po",),
            categories=("all",),
            subresources=status,
            create_status={"phase": "Pending"},
            return_deleted_object=True,
            field_labels=frozenset(
                {
                    "spec.nodeName",
                    "spec.restartPolicy",
                    "spec.schedulerName",
                    "spec.serviceAccountName",
                    "spec.hostNetwork",
                    "status.phase",
                    "status.podIP",
                    "status.nominatedNodeName",
                }
            ),
        ),
        ResourceType(
            "",
            "v1",
            "events",
            "Event",
            True,
            short_names=("ev",),
            field_labels=frozenset(_EVENT_FIELDS),
        ),
        ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
        ResourceType(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            True,
            short_names=("ev",),
            field_labels=frozenset(_EVENT_FIELDS),
        ),
        ResourceType(
            "metallb.io",
            "v1beta1",
            "servicel2statuses",
            "ServiceL2Status",
            True,
            subresources=status,
            create_status=None,
            custom=True,
            allow_unconditional_update=False,
            generation=True,
        ),
    ]


#: Objects every cluster starts with: the four system namespaces and the
#: ``kubernetes`` Service in ``default``.
BOOTSTRAP_OBJECTS: tuple[tuple[str, Object], ...] = (
    *(
        ("v1/namespaces", {"metadata": {"name": name}})
        for name in ("default", "kube-system", "kube-public", "kube-node-lease")
    ),
    (
        "v1/services",
        {
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"},
            },
            "spec": {
                "clusterIP": "10.96.0.1",
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
            },
        },
    ),
)
