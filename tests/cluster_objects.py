"""Builders of raw Kubernetes objects (as the API server returns them) for tests and the lab."""

from __future__ import annotations

from typing import Any

from metaleg.watcher.cluster import (
    L2_SERVICE_NAME_LABEL,
    L2_SERVICE_NAMESPACE_LABEL,
    REWRITE_LABEL,
    SERVICE_NAME_LABEL,
)


def service(
    namespace: str,
    name: str,
    lb_ips: list[str] | tuple[str, ...] = (),
    labelled: bool | str = True,
    selector: dict[str, str] | None = None,
    annotations: dict[str, Any] | None = None,
) -> dict[str, Any]:
    labels: dict[str, str] = {}
    if labelled is True:
        labels[REWRITE_LABEL] = "true"
    elif isinstance(labelled, str):
        labels[REWRITE_LABEL] = labelled
    metadata: dict[str, Any] = {"namespace": namespace, "name": name, "labels": labels}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "LoadBalancer",
            "ports": [{"port": 25, "protocol": "TCP"}],
            "selector": selector if selector is not None else {"app": name},
        },
        "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}},
    }


def endpoint_slice(
    namespace: str,
    name: str,
    service_name: str,
    address_type: str,
    endpoints: list[tuple[str, str | None]],
    ready: bool = True,
) -> dict[str, Any]:
    """``endpoints``: (ip, nodeName) pairs."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {SERVICE_NAME_LABEL: service_name},
        },
        "addressType": address_type,
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready},
                **({"nodeName": node} if node else {}),
            }
            for ip, node in endpoints
        ],
        "ports": [{"port": 25, "protocol": "TCP"}],
    }


def node(
    name: str, ipv4: str | None = None, ipv6: str | None = None, pod_cidrs: tuple[str, ...] = ()
) -> dict[str, Any]:
    addresses = [{"type": "Hostname", "address": name}]
    if ipv4:
        addresses.append({"type": "InternalIP", "address": ipv4})
    if ipv6:
        addresses.append({"type": "InternalIP", "address": ipv6})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        # Without pod CIDRs (Calico-style IPAM, which does not use the node IPAM controller)
        # the fields are absent, as on such clusters.
        "spec": {"podCIDRs": list(pod_cidrs), "podCIDR": pod_cidrs[0]} if pod_cidrs else {},
        "status": {"addresses": addresses},
    }


def pod(
    namespace: str,
    name: str,
    node_name: str,
    ips: tuple[str, ...] = (),
    labels: dict[str, str] | None = None,
    host_network: bool = False,
    phase: str = "Running",
    host_ips: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``host_ips``: the node's InternalIPs, which the kubelet reports as ``status.hostIP(s)``
    (for a ``host_network`` Pod they are also its ``ips``)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": labels or {}},
        "spec": {
            "nodeName": node_name,
            "hostNetwork": host_network,
            "containers": [{"name": "main", "image": "registry.example/mail:1"}],
        },
        "status": {
            "phase": phase,
            **(
                {"hostIP": host_ips[0], "hostIPs": [{"ip": ip} for ip in host_ips]}
                if host_ips
                else {}
            ),
            **({"podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]} if ips else {}),
        },
    }


def l2_status(
    namespace: str,
    name: str,
    service_namespace: str,
    service_name: str,
    node_name: str | None,
) -> dict[str, Any]:
    return {
        "apiVersion": "metallb.io/v1beta1",
        "kind": "ServiceL2Status",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {
                L2_SERVICE_NAME_LABEL: service_name,
                L2_SERVICE_NAMESPACE_LABEL: service_namespace,
            },
        },
        "status": ({"node": node_name} if node_name is not None else {}),
    }
