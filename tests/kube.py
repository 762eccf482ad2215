"""Driving cluster objects over real HTTP with the unmodified ``kubernetes`` client.

Tests, the lab scenarios and the demo change Services, EndpointSlices,
Nodes, Pods and ServiceL2Statuses through :class:`ClusterDriver`, against the API
emulator (``tests.kubeapi``), exactly as a user or MetalLB would.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from tests import cluster_objects as objects

METALLB_NAMESPACE = "metallb-system"


class ClusterDriver:
    """Create, change and delete the objects metaleg watches."""

    def __init__(self, api_client: Any) -> None:
        self.core = client.CoreV1Api(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def ensure_namespace(self, name: str) -> None:
        try:
            self.core.create_namespace(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )
        except ApiException as error:
            if error.status != 409:
                raise

    def node(
        self, name: str, ipv4: str | None, ipv6: str | None = None, pod_cidrs: tuple[str, ...] = ()
    ) -> None:
        body = objects.node(name, ipv4, ipv6, pod_cidrs)
        try:
            self.core.create_node(body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.core.patch_node(name, {"spec": body["spec"]})
            self.core.patch_node_status(name, {"status": body["status"]})

    def pod(
        self,
        namespace: str,
        name: str,
        node: str,
        ips: tuple[str, ...] = (),
        labels: dict[str, str] | None = None,
        *,
        host_network: bool = False,
        host_ips: tuple[str, ...] | None = None,
    ) -> None:
        """Create a Pod scheduled on ``node``; with ``ips``, set its status as the kubelet would:
        its IPs and ``status.hostIP(s)``, the node's InternalIPs (read from the Node object
        unless ``host_ips`` is given). A ``host_network`` Pod without ``ips`` gets the node's."""
        self.ensure_namespace(namespace)
        if host_ips is None:
            host_ips = self.node_internal_ips(node)
        if host_network and not ips:
            ips = host_ips
        body = objects.pod(namespace, name, node, (), labels, host_network=host_network)
        self.core.create_namespaced_pod(namespace, body)
        if ips:
            self.pod_ips(namespace, name, ips, host_ips)

    def pod_ips(
        self,
        namespace: str,
        name: str,
        ips: tuple[str, ...],
        host_ips: tuple[str, ...] = (),
    ) -> None:
        status = objects.pod(namespace, name, "", ips, host_ips=host_ips)["status"]
        self.core.patch_namespaced_pod_status(name, namespace, {"status": status})

    def node_internal_ips(self, name: str) -> tuple[str, ...]:
        """The Node's InternalIPs (what the kubelet reports as a Pod's ``status.hostIPs``);
        empty when there is no such Node."""
        try:
            node = self.core.read_node(name)
        except ApiException as error:
            if error.status != 404:
                raise
            return ()
        addresses = (node.status.addresses if node.status else None) or []
        return tuple(a.address for a in addresses if a.type == "InternalIP")

    def delete_pod(self, namespace: str, name: str) -> None:
        self.core.delete_namespaced_pod(name, namespace)

    def delete_node(self, name: str) -> None:
        self.core.delete_node(name)

    def service(
        self,
        namespace: str,
        name: str,
        lb_ips: tuple[str, ...] | list[str],
        labelled: bool | str = True,
    ) -> None:
        """Create the Service (or update its label) and set its LoadBalancer ingress IPs."""
        self.ensure_namespace(namespace)
        body = objects.service(namespace, name, lb_ips, labelled)
        try:
            self.core.create_namespaced_service(namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.label_service(namespace, name, labelled)
        self.core.patch_namespaced_service_status(name, namespace, {"status": body["status"]})

    def label_service(self, namespace: str, name: str, labelled: bool | str) -> None:
        """Set the opt-in label to "true" (True), to another value (a string) or remove it (False)."""
        value: str | None = "true" if labelled is True else (labelled or None)
        self.core.patch_namespaced_service(
            name, namespace, {"metadata": {"labels": {"metaleg.de/rewriteSrcIP": value}}}
        )

    def delete_service(self, namespace: str, name: str) -> None:
        self.core.delete_namespaced_service(name, namespace)

    def endpoints(
        self,
        namespace: str,
        service: str,
        address_type: str,
        endpoints: list[tuple[str, str | None]],
        ready: bool = True,
    ) -> None:
        """Replace the Service's EndpointSlice of one address type: (ip, nodeName) pairs."""
        suffix = "v4" if address_type == "IPv4" else "v6"
        name = f"{service}-{suffix}"
        body = objects.endpoint_slice(namespace, name, service, address_type, endpoints, ready)
        try:
            self.discovery.create_namespaced_endpoint_slice(namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.discovery.patch_namespaced_endpoint_slice(
                name, namespace, {"endpoints": body["endpoints"]}
            )

    def gateway(self, namespace: str, service: str, node: str | None) -> None:
        """Point the Service's ServiceL2Status at ``node``; None deletes the status."""
        self.ensure_namespace(METALLB_NAMESPACE)
        name = f"l2-{namespace}-{service}"
        if node is None:
            try:
                self.custom.delete_namespaced_custom_object(
                    "metallb.io", "v1beta1", METALLB_NAMESPACE, "servicel2statuses", name
                )
            except ApiException as error:
                if error.status != 404:
                    raise
            return
        body = objects.l2_status(METALLB_NAMESPACE, name, namespace, service, node)
        try:
            self.custom.create_namespaced_custom_object(
                "metallb.io", "v1beta1", METALLB_NAMESPACE, "servicel2statuses", body
            )
        except ApiException as error:
            if error.status != 409:
                raise
        self.custom.patch_namespaced_custom_object_status(
            "metallb.io",
            "v1beta1",
            METALLB_NAMESPACE,
            "servicel2statuses",
            name,
            {"status": {"node": node}},
        )
