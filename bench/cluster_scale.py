"""The watcher in a big cluster: memory, CPU under unrelated churn, gateway moves.

Run::

    .venv/bin/python -m bench.cluster_scale            # 5000 Nodes, 10,000 Services, 150,000 Pods
    .venv/bin/python -m bench.cluster_scale --quick    # 500 Nodes, 1000 Services, 15,000 Pods
    .venv/bin/python -m bench.cluster_scale --backend iptables --moves 30

What it builds (in the API emulator's store, in-process and without copies,
:meth:`tests.kubeapi.store.Store.load`; the agent talks to the emulator over
HTTP inside its network namespace as in :mod:`bench.latency`):

* Nodes ``node-00`` ... with kubelet-sized objects (~14 KB of JSON each):
  labels and annotations, ``podCIDR(s)``, addresses, capacity/allocatable,
  five conditions, 48 images with names, digests and sizes, ``nodeInfo`` and
  ``daemonEndpoints``. ``node-00`` is the agent's node; ``node-00`` ... ``node-14``
  have InternalIPs that are on-link in the namespace (possible gateways);
* Services in 50 namespaces (ClusterIP, ``app`` selector), 15 Pods each on
  Nodes round-robin (a Deployment's Pods: owner references, a container with
  probes, resources, env and mounts, kubelet status with conditions and
  container statuses, ~4 KB each) and one EndpointSlice per Service listing
  them (targetRef, conditions, zone, ports);
* 5 labelled Services (``metaleg.de/rewriteSrcIP: "true"``, LoadBalancer with
  an LB IP) in ``bench``, 3 Pods each (on ``node-00``, ``node-07``,
  ``node-08``), their EndpointSlices and MetalLB ``ServiceL2Status`` objects in
  ``metallb-system`` naming ``node-01`` ... ``node-05``.

The "small" cluster holds only what the desired state needs: the 5 labelled
Services with their Pods, slices and statuses, and Nodes ``node-00`` ...
``node-14``. Both are served to a fresh agent (default backend nftables):

(a) the watcher's RSS (``VmRSS``) once ready and settled, small vs big (goal:
    big <= 1.2 x small);
(b) the watcher's CPU (utime + stime of ``/proc/<pid>/stat``) while the
    cluster changes at 20 unrelated events a second (a third each: a Node status
    heartbeat of a Node that is no gateway, a Pod status update and an
    EndpointSlice update (an endpoint's readiness) of unlabelled Services),
    per event and as a share of one core (goal < 1 %);
(c) gateway moves: the ServiceL2Status of ``bench/svc-00000`` names
    ``node-00`` (this node: the source is SNATed) and ``node-06`` (no other
    Service's gateway: the source is marked) in turn; a process inside the
    namespace polls the kernel until the Service's source on ``node-00`` is in
    the SNAT (MARK) set or map (:class:`bench.agent.KernelPoller`). Latency =
    seen - written. Quiet cluster vs under the churn (goal: p50 and p99 under
    churn <= 1.2 x quiet).

The emulator's own CPU (this process: HTTP, watch fan-out, the churn's writes)
is reported too: it must not be the bottleneck.

Results: tables on stdout and ``bench/results/cluster_scale.json``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import ipaddress
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.agent import METALLB, AgentBench, Cluster, KernelPoller
from bench.common import (
    NAMESPACE,
    exit_on_sigterm,
    fmt_ratio,
    machine,
    ms,
    next_hop4,
    node_name,
    require_root,
    summary,
    table,
    write_results,
)
from bench.latency import stage_breakdown
from metaleg.firewall.iptables.rules import mark_set_name, source_set_name
from metaleg.model import Family
from metaleg.watcher.cluster import (
    L2_SERVICE_NAME_LABEL,
    L2_SERVICE_NAMESPACE_LABEL,
    REWRITE_LABEL,
    SERVICE_NAME_LABEL,
)

LABELLED = 5
PODS_PER_SERVICE = 15
NAMESPACES = 50
SPECIAL_NODES = 15
"""``node-00`` ... ``node-14``: on-link InternalIPs (bench.common.wire_next_hops)."""
LABELLED_POD_NODES = (0, 7, 8)
MOVING = 0
"""The labelled Service whose gateway moves."""
MOVE_TARGETS = (0, 6)
"""Its gateway alternates between this node and a node no other Service uses."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
STAMP = "2026-11-20T08:00:00Z"


@dataclass(frozen=True)
class Scale:
    nodes: int
    services: int
    """Including the labelled ones."""
    pods_per_service: int = PODS_PER_SERVICE


# --- object builders ---------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _image_sets(variants: int = 8, per_node: int = 48) -> list[list[dict[str, Any]]]:
    """Lists of ``status.images`` as kubelets report them (shared between Nodes)."""
    rng = random.Random(7)
    repos = [
        f"{registry}/{team}/{app}"
        for registry in ("registry.k8s.io", "quay.io", "ghcr.io", "docker.io")
        for team in ("platform", "observability", "apps", "data")
        for app in ("api", "worker", "frontend", "exporter", "sidecar", "agent")
    ]
    sets = []
    for v in range(variants):
        images = []
        for repo in rng.sample(repos, per_node):
            tag = f"v{rng.randrange(1, 4)}.{rng.randrange(30)}.{rng.randrange(10)}"
            images.append(
                {
                    "names": [f"{repo}@sha256:{_digest(repo + tag + str(v))}", f"{repo}:{tag}"],
                    "sizeBytes": rng.randrange(5_000_000, 900_000_000),
                }
            )
        sets.append(images)
    return sets


_IMAGES = _image_sets()
_CAPACITY = {
    "cpu": "16",
    "ephemeral-storage": "202051772Ki",
    "hugepages-1Gi": "0",
    "hugepages-2Mi": "0",
    "memory": "65842128Ki",
    "pods": "110",
}
_ALLOCATABLE = {
    "cpu": "15800m",
    "ephemeral-storage": "186209991159",
    "hugepages-1Gi": "0",
    "hugepages-2Mi": "0",
    "memory": "64715728Ki",
    "pods": "110",
}


def node_ip(index: int) -> str:
    """InternalIP: on-link next hops for the special Nodes, a node network for the rest."""
    if index < SPECIAL_NODES:
        return next_hop4(index)
    return str(ipaddress.IPv4Address("172.20.0.0") + index + 1)


def pod_cidr(index: int) -> str:
    return f"10.{64 + index // 256}.{index % 256}.0/24"


def pod_ip(node: int, slot: int) -> str:
    return str(ipaddress.IPv4Network(pod_cidr(node))[slot])


def node_conditions(heartbeat: str) -> list[dict[str, Any]]:
    def condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return {
            "lastHeartbeatTime": heartbeat,
            "lastTransitionTime": STAMP,
            "message": message,
            "reason": reason,
            "status": status,
            "type": kind,
        }

    return [
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        condition(
            "DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        condition("NetworkUnavailable", "False", "RouteCreated", "RouteController created a route"),
    ]


def node(index: int) -> dict[str, Any]:
    name = node_name(index)
    zone = f"zone-{index % 3}"
    machine_id = _digest(name)[:32]
    return {
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/instance-type": "m6i.4xlarge",
                "beta.kubernetes.io/os": "linux",
                "failure-domain.beta.kubernetes.io/region": "eu-central",
                "failure-domain.beta.kubernetes.io/zone": zone,
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m6i.4xlarge",
                "topology.kubernetes.io/region": "eu-central",
                "topology.kubernetes.io/zone": zone,
                "node-role.kubernetes.io/worker": "",
            },
            "annotations": {
                "csi.volume.kubernetes.io/nodeid": f'{{"ebs.csi.aws.com":"i-{machine_id[:17]}"}}',
                "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/containerd/containerd.sock",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                "kube-router.io/pod-cidr": pod_cidr(index),
            },
        },
        "spec": {
            "podCIDR": pod_cidr(index),
            "podCIDRs": [pod_cidr(index)],
            "providerID": f"aws:///eu-central-1a/i-{machine_id[:17]}",
        },
        "status": {
            "addresses": [
                {"address": node_ip(index), "type": "InternalIP"},
                {"address": name, "type": "Hostname"},
            ],
            "allocatable": _ALLOCATABLE,
            "capacity": _CAPACITY,
            "conditions": node_conditions(STAMP),
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "images": _IMAGES[index % len(_IMAGES)],
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": str(uuid.UUID(machine_id[::-1])),
                "containerRuntimeVersion": "containerd://1.7.22",
                "kernelVersion": "6.1.0-28-cloud-amd64",
                "kubeProxyVersion": "v1.31.4",
                "kubeletVersion": "v1.31.4",
                "machineID": machine_id,
                "operatingSystem": "linux",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "systemUUID": str(uuid.UUID(machine_id)),
            },
        },
    }


def service_name(index: int) -> str:
    return f"svc-{index:05d}"


def service_namespace(index: int) -> str:
    return NAMESPACE if index < LABELLED else f"team-{index % NAMESPACES:02d}"


def lb_ip(index: int) -> str:
    return str(ipaddress.IPv4Address("198.18.0.0") + index + 1)


def service(index: int) -> dict[str, Any]:
    name = service_name(index)
    labelled = index < LABELLED
    spec: dict[str, Any] = {
        "type": "LoadBalancer" if labelled else "ClusterIP",
        "clusterIP": str(ipaddress.IPv4Address("10.96.16.0") + index),
        "clusterIPs": [str(ipaddress.IPv4Address("10.96.16.0") + index)],
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        "selector": {"app": name},
        "sessionAffinity": "None",
    }
    if labelled:
        spec["allocateLoadBalancerNodePorts"] = False
        spec["externalTrafficPolicy"] = "Cluster"
    labels = {"app": name, "app.kubernetes.io/part-of": "bench"}
    if labelled:
        labels[REWRITE_LABEL] = "true"
    return {
        "metadata": {
            "name": name,
            "namespace": service_namespace(index),
            "labels": labels,
            "annotations": {"meta.helm.sh/release-name": name},
        },
        "spec": spec,
        "status": {"loadBalancer": {"ingress": [{"ip": lb_ip(index), "ipMode": "VIP"}]}}
        if labelled
        else {"loadBalancer": {}},
    }


def pod_template(index: int) -> dict[str, Any]:
    """What the Pods of Service ``index`` share (a Deployment's template)."""
    name = service_name(index)
    image = f"registry.example/apps/{name}:v1.{index % 30}.0"
    return {
        "labels": {"app": name, "pod-template-hash": _digest(name)[:10]},
        "owner": [
            {
                "apiVersion": "apps/v1",
                "blockOwnerDeletion": True,
                "controller": True,
                "kind": "ReplicaSet",
                "name": f"{name}-{_digest(name)[:10]}",
                "uid": str(uuid.UUID(_digest(name + "rs")[:32])),
            }
        ],
        "containers": [
            {
                "name": "main",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                "env": [
                    {"name": "LOG_LEVEL", "value": "info"},
                    {"name": "SERVICE_NAME", "value": name},
                    {
                        "name": "POD_IP",
                        "valueFrom": {
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}
                        },
                    },
                ],
                "resources": {
                    "limits": {"memory": "512Mi"},
                    "requests": {"cpu": "100m", "memory": "256Mi"},
                },
                "livenessProbe": {
                    "httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                    "periodSeconds": 10,
                    "failureThreshold": 3,
                    "successThreshold": 1,
                    "timeoutSeconds": 1,
                },
                "readinessProbe": {
                    "httpGet": {"path": "/readyz", "port": "http", "scheme": "HTTP"},
                    "periodSeconds": 5,
                    "failureThreshold": 3,
                    "successThreshold": 1,
                    "timeoutSeconds": 1,
                },
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [
                    {"mountPath": "/etc/app", "name": "config", "readOnly": True},
                    {
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        "name": "kube-api-access",
                        "readOnly": True,
                    },
                ],
            }
        ],
        "volumes": [
            {"configMap": {"defaultMode": 420, "name": f"{name}-config"}, "name": "config"},
            {
                "name": "kube-api-access",
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                "name": "kube-root-ca.crt",
                            }
                        },
                    ],
                },
            },
        ],
        "tolerations": [
            {
                "effect": "NoExecute",
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "tolerationSeconds": 300,
            },
            {
                "effect": "NoExecute",
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "tolerationSeconds": 300,
            },
        ],
        "conditions": [
            {"lastProbeTime": None, "lastTransitionTime": STAMP, "status": "True", "type": kind}
            for kind in (
                "PodReadyToStartContainers",
                "Initialized",
                "Ready",
                "ContainersReady",
                "PodScheduled",
            )
        ],
        "image": image,
        "imageID": f"registry.example/apps/{name}@sha256:{_digest(image)}",
    }


def pod(index: int, k: int, node_index: int, slot: int, template: dict[str, Any]) -> dict[str, Any]:
    """Pod ``k`` of Service ``index`` on Node ``node_index``, IP ``slot`` of its pod CIDR."""
    name = f"{service_name(index)}-{template['labels']['pod-template-hash']}-{k:05d}"
    ip = pod_ip(node_index, slot)
    return {
        "metadata": {
            "name": name,
            "generateName": f"{service_name(index)}-{template['labels']['pod-template-hash']}-",
            "namespace": service_namespace(index),
            "uid": str(uuid.UUID(int=(index << 20) + k + 1)),
            "creationTimestamp": STAMP,
            "labels": template["labels"],
            "ownerReferences": template["owner"],
        },
        "spec": {
            "containers": template["containers"],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": True,
            "nodeName": node_name(node_index),
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": "default",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
            "tolerations": template["tolerations"],
            "volumes": template["volumes"],
        },
        "status": {
            "conditions": template["conditions"],
            "containerStatuses": [
                {
                    "containerID": f"containerd://{_digest(name)}",
                    "image": template["image"],
                    "imageID": template["imageID"],
                    "lastState": {},
                    "name": "main",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": STAMP}},
                }
            ],
            "hostIP": node_ip(node_index),
            "hostIPs": [{"ip": node_ip(node_index)}],
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "qosClass": "Burstable",
            "startTime": STAMP,
        },
    }


def endpoint_slice(index: int, pods: list[dict[str, Any]]) -> dict[str, Any]:
    name = service_name(index)
    return {
        "metadata": {
            "name": f"{name}-{_digest(name)[:5]}",
            "generateName": f"{name}-",
            "namespace": service_namespace(index),
            "labels": {
                SERVICE_NAME_LABEL: name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": name,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": STAMP},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "blockOwnerDeletion": True,
                    "controller": True,
                    "kind": "Service",
                    "name": name,
                    "uid": str(uuid.UUID(_digest(name + "svc")[:32])),
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": [endpoint(p, True) for p in pods],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def endpoint(pod_object: dict[str, Any], ready: bool) -> dict[str, Any]:
    metadata = pod_object["metadata"]
    node_index = int(pod_object["spec"]["nodeName"].split("-")[1])
    return {
        "addresses": [pod_object["status"]["podIP"]],
        "conditions": {"ready": ready, "serving": ready, "terminating": False},
        "nodeName": pod_object["spec"]["nodeName"],
        "targetRef": {
            "kind": "Pod",
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
        },
        "zone": f"zone-{node_index % 3}",
    }


def l2_status(index: int, gateway: int) -> dict[str, Any]:
    return {
        "apiVersion": "metallb.io/v1beta1",
        "kind": "ServiceL2Status",
        "metadata": {
            "name": l2_name(index),
            "namespace": METALLB,
            "labels": {
                L2_SERVICE_NAME_LABEL: service_name(index),
                L2_SERVICE_NAMESPACE_LABEL: NAMESPACE,
            },
        },
        "status": {"node": node_name(gateway)},
    }


def l2_name(index: int) -> str:
    return f"l2-{NAMESPACE}-{service_name(index)}"


class ScaleCluster:
    """Fills the store with the small or the big cluster (see the module doc)."""

    def __init__(self, scale: Scale | None) -> None:
        self.scale = scale
        """None: the small cluster."""
        self.unrelated_nodes: list[str] = []
        self.unrelated_pods: list[tuple[str, str]] = []
        self.unrelated_slices: list[tuple[str, str]] = []
        self.moving_source = pod_ip(0, 200 + MOVING * len(LABELLED_POD_NODES))

    def __call__(self, cluster: Cluster) -> None:
        store = cluster.store
        nodes = self.scale.nodes if self.scale else SPECIAL_NODES
        services = self.scale.services if self.scale else LABELLED
        per_service = self.scale.pods_per_service if self.scale else 0
        names = {NAMESPACE, METALLB} | {service_namespace(i) for i in range(services)}
        for name in sorted(names):
            cluster.create("namespaces", {"metadata": {"name": name}})
        store.load("nodes", (node(i) for i in range(nodes)))
        self.unrelated_nodes = [node_name(i) for i in range(SPECIAL_NODES, nodes)]
        store.load("services", (service(i) for i in range(services)))
        slices: list[dict[str, Any]] = []
        next_slot = [2] * nodes  # pod CIDR slots in use per node (.0, .1 skipped)
        counter = 0

        def pods() -> Iterator[dict[str, Any]]:
            nonlocal counter
            for i in range(services):
                template = pod_template(i)
                members = []
                if i < LABELLED:
                    for k, node_index in enumerate(LABELLED_POD_NODES):
                        slot = 200 + i * len(LABELLED_POD_NODES) + k
                        members.append(pod(i, k, node_index, slot, template))
                else:
                    for k in range(per_service):
                        node_index = counter % nodes
                        counter += 1
                        members.append(pod(i, k, node_index, next_slot[node_index], template))
                        next_slot[node_index] += 1
                    self.unrelated_pods += [
                        (p["metadata"]["namespace"], p["metadata"]["name"]) for p in members
                    ]
                slices.append(endpoint_slice(i, members))
                yield from members

        store.load("pods", pods())
        store.load("endpointslices", slices)
        self.unrelated_slices = [
            (s["metadata"]["namespace"], s["metadata"]["name"]) for s in slices[LABELLED:]
        ]
        for i in range(LABELLED):
            body = l2_status(i, 1 + i)
            cluster.create("servicel2statuses", body, METALLB)
            cluster.status("servicel2statuses", l2_name(i), body["status"], METALLB)
        # The emulator shares this process: a full collection walks the ~2 million objects
        # of the big cluster with the GIL held (~1.1 s here), delaying every watch event.
        # Objects stored so far are never freed: exempt them from collection.
        gc.collect()
        gc.freeze()


# --- the churn ---------------------------------------------------------------------------------


class Churn(threading.Thread):
    """Unrelated writes at ``rate`` a second, round-robin: a Node heartbeat, a Pod status
    update, an EndpointSlice update; bounded by ``limit`` seconds."""

    def __init__(self, cluster: Cluster, layout: ScaleCluster, rate: float, limit: float) -> None:
        super().__init__(name="churn", daemon=True)
        self.store = cluster.store
        self.layout = layout
        self.rate = rate
        self.limit = limit
        self.stopping = threading.Event()
        self.counts = {"node": 0, "pod": 0, "endpointslice": 0}
        self.late = 0
        self.rng = random.Random(11)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def run(self) -> None:
        started = time.monotonic()
        k = 0
        kinds = (self._node, self._pod, self._slice)
        while not self.stopping.is_set():
            due = started + k / self.rate
            if due - started > self.limit:
                return
            delay = due - time.monotonic()
            if delay > 0:
                if self.stopping.wait(delay):
                    return
            elif delay < -0.5:
                self.late += 1
            kinds[k % 3]()
            k += 1

    def _node(self) -> None:
        name = self.rng.choice(self.layout.unrelated_nodes)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {"conditions": node_conditions(stamp)}
        self.store.patch("nodes", name, {"status": status}, subresource="status")
        self.counts["node"] += 1

    def _pod(self) -> None:
        namespace, name = self.rng.choice(self.layout.unrelated_pods)
        current = self.store.get("pods", name, namespace)
        statuses = current["status"]["containerStatuses"]
        statuses[0]["restartCount"] += 1
        statuses[0]["state"] = {
            "running": {"startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        }
        self.store.update("pods", name, current, namespace, subresource="status")
        self.counts["pod"] += 1

    def _slice(self) -> None:
        namespace, name = self.rng.choice(self.layout.unrelated_slices)
        current = self.store.get("endpointslices", name, namespace)
        endpoint_entry = self.rng.choice(current["endpoints"])
        conditions = endpoint_entry["conditions"]
        conditions["ready"] = conditions["serving"] = not conditions["ready"]
        self.store.update("endpointslices", name, current, namespace)
        self.counts["endpointslice"] += 1


# --- measurements ------------------------------------------------------------------------------


class GcPauses:
    """Garbage collections of this process (the emulator's) and how long they held the GIL."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def start(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self.pauses.append(time.perf_counter() - self._started)

    def report(self) -> dict[str, Any]:
        return {"count": len(self.pauses), "max": max(self.pauses, default=0.0)}


def cpu_seconds(pid: int | str) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def kernel_target(backend: str, gateway: int) -> tuple[str, str]:
    """Where the moving Service's source on this node is, with ``gateway`` announcing it."""
    if backend == "iptables":
        if gateway == 0:
            return "ipset", source_set_name(Family.IPV4, NAMESPACE, service_name(MOVING))
        return "ipset", mark_set_name(Family.IPV4)
    return "nft", "snat4" if gateway == 0 else "mark4"


def gateway_moves(
    bench: AgentBench, poller: KernelPoller, layout: ScaleCluster, moves: int, start: int
) -> dict[str, Any]:
    """``moves`` gateway moves of the moving Service: latencies, timeouts and, from the
    agent's logs, the stages of each move (as :func:`bench.latency.stage_breakdown`)."""
    samples: list[float] = []
    by_target: dict[str, list[float]] = {node_name(g): [] for g in MOVE_TARGETS}
    timeouts = 0
    marks: list[tuple[float, str]] = []
    bench.log_lines()  # skip to now
    for k in range(moves):
        gateway = MOVE_TARGETS[(start + k) % len(MOVE_TARGETS)]
        kind, set_name = kernel_target(bench.backend, gateway)
        wall = time.time()
        before = time.monotonic()
        bench.cluster.status(
            "servicel2statuses", l2_name(MOVING), {"node": node_name(gateway)}, METALLB
        )
        seen, _, _ = poller.wait(kind, set_name, layout.moving_source, timeout=30)
        if seen is None:
            timeouts += 1
            print(f"move {k} to {node_name(gateway)} not applied within 30 s", file=sys.stderr)
        else:
            samples.append(seen - before)
            by_target[node_name(gateway)].append(seen - before)
        marks.append((wall, f"{NAMESPACE}/{service_name(MOVING)}"))
        time.sleep(0.3)
    time.sleep(0.5)  # the last "applied" line follows the kernel change
    stages = stage_breakdown(bench.log_lines(), marks)
    return {
        **summary(samples),
        "timeouts": timeouts,
        "samples": samples,
        "by_target": {name: summary(values) for name, values in by_target.items()},
        "stages": {name: summary(values) for name, values in stages.items()},
    }


def settle(bench: AgentBench, seconds: float) -> int:
    """Wait, then return the watcher's pid."""
    time.sleep(seconds)
    return bench.pids()["watcher"]


def run_small(backend: str, settle_seconds: float, env: dict[str, str]) -> dict[str, Any]:
    layout = ScaleCluster(None)
    with AgentBench(LABELLED, backend, populate=layout) as bench:
        bench.env.update(env)  # the agent's environment (PYTHONPATH of --code)
        started = time.monotonic()
        bench.start()
        bench.wait_ready(timeout=300)
        ready = time.monotonic() - started
        pid = settle(bench, settle_seconds)
        result = {
            "ready_seconds": ready,
            "watcher_rss_kib": status_kib(pid, "VmRSS"),
            "watcher_hwm_kib": status_kib(pid, "VmHWM"),
        }
        print(f"small cluster: ready in {ready:.1f} s, watcher {result}", file=sys.stderr)
        return result


def run_big(
    backend: str,
    scale: Scale,
    *,
    settle_seconds: float,
    idle_seconds: float,
    churn_seconds: float,
    moves: int,
    rate: float,
    env: dict[str, str],
) -> dict[str, Any]:
    layout = ScaleCluster(scale)
    result: dict[str, Any] = {}
    built = time.monotonic()
    with AgentBench(LABELLED, backend, populate=layout) as bench:
        bench.env.update(env)  # the agent's environment (PYTHONPATH of --code)
        result["build_seconds"] = time.monotonic() - built
        store = bench.api.store
        result["objects"] = {
            kind: len(store.list(kind)["items"])
            for kind in ("nodes", "services", "pods", "endpointslices")
        }
        print(
            f"big cluster built in {result['build_seconds']:.1f} s: {result['objects']}",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        bench.start()
        bench.wait_ready(timeout=900)
        result["ready_seconds"] = time.monotonic() - started
        pid = settle(bench, settle_seconds)
        result["watches"] = sorted(
            f"{w['resource']} {w['labelSelector'] or '-'} {w['fieldSelector'] or '-'}"
            for w in store.open_watches()
        )
        result["watcher_rss_kib"] = status_kib(pid, "VmRSS")
        result["watcher_hwm_kib"] = status_kib(pid, "VmHWM")
        print(
            f"big cluster: ready in {result['ready_seconds']:.1f} s, watcher RSS "
            f"{result['watcher_rss_kib'] / 1024:.1f} MiB",
            file=sys.stderr,
            flush=True,
        )
        # Idle.
        cpu0, own0, t0 = cpu_seconds(pid), cpu_seconds("self"), time.monotonic()
        time.sleep(idle_seconds)
        wall = time.monotonic() - t0
        result["idle"] = {
            "seconds": wall,
            "watcher_cpu_percent": 100 * (cpu_seconds(pid) - cpu0) / wall,
            "emulator_cpu_percent": 100 * (cpu_seconds("self") - own0) / wall,
        }
        poller = KernelPoller(bench.netns)
        churn: Churn | None = None
        pauses = GcPauses().start()
        try:
            result["moves_quiet"] = gateway_moves(bench, poller, layout, moves, 0)
            # Under churn: CPU over a window, then the moves while it goes on.
            # Bounded, and long enough for every move to time out (30 s) under churn.
            limit = churn_seconds + 2 + moves * 30.5 + 10
            churn = Churn(bench.cluster, layout, rate, limit)
            churn.start()
            time.sleep(2.0)
            pid = bench.pids()["watcher"]
            cpu0, own0, n0, t0 = (
                cpu_seconds(pid),
                cpu_seconds("self"),
                churn.total,
                time.monotonic(),
            )
            time.sleep(churn_seconds)
            cpu1, own1, n1, t1 = (
                cpu_seconds(pid),
                cpu_seconds("self"),
                churn.total,
                time.monotonic(),
            )
            events = n1 - n0
            result["churn"] = {
                "seconds": t1 - t0,
                "events": events,
                "rate": events / (t1 - t0),
                "watcher_cpu_seconds": cpu1 - cpu0,
                "watcher_cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0),
                "watcher_cpu_per_event": (cpu1 - cpu0) / events if events else None,
                "emulator_cpu_percent": 100 * (own1 - own0) / (t1 - t0),
            }
            result["moves_churn"] = gateway_moves(bench, poller, layout, moves, moves)
            result["churn"]["ran_through_moves"] = churn.is_alive()
            result["churn"]["counts"] = dict(churn.counts)
            result["churn"]["late"] = churn.late
            result["watcher_rss_after_churn_kib"] = status_kib(pid, "VmRSS")
            report = bench.status()
            result["watcher_restarts"] = (
                sum(p.restarts for p in report.processes if p.name == "watcher") if report else None
            )
            result["emulator_gc"] = pauses.report()
        finally:
            pauses.stop()
            if churn is not None:
                churn.stopping.set()
                churn.join(10)
            poller.close()
    return result


# --- report ------------------------------------------------------------------------------------


def mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def render_report(results: dict[str, Any]) -> str:
    small, big = results["small"], results["big"]
    scale = results["scale"]
    watches = big.get("watches") or []
    shown = ", ".join(watches[:8]) + (f", ... ({len(watches)} in all)" if len(watches) > 8 else "")
    lines = [
        f"Cluster: {scale['nodes']} Nodes, {scale['services']} Services ({LABELLED} labelled), "
        f"{big['objects']['pods']} Pods, {big['objects']['endpointslices']} EndpointSlices; "
        f"backend {results['backend']}",
        f"Watches the agent opened (resource, label selector, field selector): {shown}",
    ]
    rss_ratio = big["watcher_rss_kib"] / small["watcher_rss_kib"]
    rows = [
        [
            "small (what the state needs)",
            mib(small["watcher_rss_kib"]),
            mib(small["watcher_hwm_kib"]),
            f"{small['ready_seconds']:.1f} s",
        ],
        [
            "big",
            mib(big["watcher_rss_kib"]),
            mib(big["watcher_hwm_kib"]),
            f"{big['ready_seconds']:.1f} s",
        ],
        ["big, after the churn", mib(big.get("watcher_rss_after_churn_kib")), "", ""],
    ]
    lines += [
        "",
        "(a) watcher memory",
        table(["cluster", "RSS", "peak RSS (VmHWM)", "ready after"], rows),
    ]
    lines.append(
        f"RSS big / small: {fmt_ratio(rss_ratio)} (goal <= 1.2x: {'met' if rss_ratio <= 1.2 else 'MISSED'})"
    )
    churn, idle = big["churn"], big["idle"]
    rows = [
        [
            "idle",
            share_text(idle["watcher_cpu_percent"], idle["seconds"]),
            "-",
            f"{idle['emulator_cpu_percent']:.1f} %",
        ],
        [
            f"{churn['rate']:.1f} unrelated events/s",
            share_text(churn["watcher_cpu_percent"], churn["seconds"]),
            ms(churn["watcher_cpu_per_event"])
            if churn["watcher_cpu_seconds"]
            else f"< {ms(1 / CLK_TCK / max(churn['events'], 1))}",
            f"{churn['emulator_cpu_percent']:.1f} %",
        ],
    ]
    lines += [
        "",
        f"(b) watcher CPU ({churn['events']} events in {churn['seconds']:.0f} s; written in all: "
        f"{churn.get('counts')})",
    ]
    lines.append(
        table(
            ["cluster", "watcher, % of a core", "watcher CPU per event", "emulator (this process)"],
            rows,
        )
    )
    share = churn["watcher_cpu_percent"]
    gc_pauses = big.get("emulator_gc") or {}
    lines.append(
        f"emulator garbage collections during the moves and the churn: {gc_pauses.get('count')}, "
        f"longest {ms(gc_pauses.get('max'))}"
    )
    lines.append(
        f"watcher share under churn: {share_text(share, churn['seconds'])} (goal < 1 %: {'met' if share < 1 else 'MISSED'})"
    )
    quiet, busy = big["moves_quiet"], big["moves_churn"]
    rows = [
        [
            "quiet",
            quiet["n"],
            ms(quiet["p50"]),
            ms(quiet["p99"]),
            ms(quiet["max"]),
            quiet["timeouts"],
        ],
        [
            "under churn",
            busy["n"],
            ms(busy["p50"]),
            ms(busy["p99"]),
            ms(busy["max"]),
            busy["timeouts"],
        ],
    ]
    lines += [
        "",
        "(c) gateway move: ServiceL2Status write -> source in the SNAT/MARK set of the kernel",
    ]
    lines.append(table(["cluster", "moves", "p50", "p99", "max", "timeouts"], rows))
    for label, moves in (("quiet", quiet), ("under churn", busy)):
        parts = [
            f"to {target} p50 {ms(s['p50'])}"
            for target, s in (moves.get("by_target") or {}).items()
        ]
        if parts:
            lines.append(f"{label}: " + ", ".join(parts))
    r50 = _ratio(busy["p50"], quiet["p50"])
    r99 = _ratio(busy["p99"], quiet["p99"])
    verdict = "met" if r50 is not None and r99 is not None and max(r50, r99) <= 1.2 else "MISSED"
    lines.append(
        f"under churn / quiet: p50 {fmt_ratio(r50)}, p99 {fmt_ratio(r99)} (goal <= 1.2x: {verdict})"
    )
    rows = [
        [f"{label}: {stage}", s["n"], ms(s["p50"]), ms(s["p99"]), ms(s["max"])]
        for label, moves in (("quiet", quiet), ("churn", busy))
        for stage, s in (moves.get("stages") or {}).items()
    ]
    lines += ["", "Stages of the moves from the agent's logs (millisecond timestamps)"]
    lines.append(table(["stage", "n", "p50", "p99", "max"], rows))
    return "\n".join(lines)


def share_text(percent: float, seconds: float) -> str:
    """A CPU share; no tick at all (utime and stime count 1/CLK_TCK s) as an upper bound."""
    if percent == 0:
        return f"< {100 / CLK_TCK / seconds:.2f} %"
    return f"{percent:.2f} %"


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and a == a and b == b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster_scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--pods-per-service", type=int, default=PODS_PER_SERVICE)
    parser.add_argument("--backend", default="nftables", choices=("nftables", "iptables"))
    parser.add_argument(
        "--moves", type=int, default=40, help="gateway moves, quiet and under churn"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="unrelated events per second")
    parser.add_argument("--churn-seconds", type=float, default=30.0, help="CPU window under churn")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--settle-seconds", type=float, default=5.0)
    parser.add_argument(
        "--quick", action="store_true", help="500 Nodes, 1000 Services, 6 moves, 10 s windows"
    )
    parser.add_argument(
        "--code",
        help="run the agent from the metaleg package in this directory, e.g. a commit's "
        "export: mkdir D && git archive C metaleg | tar -x -C D",
    )
    parser.add_argument("--code-commit", default="", help="the commit --code holds (recorded)")
    args = parser.parse_args(argv)
    require_root()
    exit_on_sigterm()
    info = machine()
    if args.quick:
        scale = Scale(500, 1000, args.pods_per_service)
        moves, churn_seconds, idle_seconds, settle_seconds = 6, 10.0, 5.0, 3.0
    else:
        scale = Scale(args.nodes, args.services, args.pods_per_service)
        moves, churn_seconds = args.moves, args.churn_seconds
        idle_seconds, settle_seconds = args.idle_seconds, args.settle_seconds
    if scale.nodes < SPECIAL_NODES or scale.services <= LABELLED:
        parser.error(f"at least {SPECIAL_NODES} nodes and {LABELLED + 1} services")
    started = time.monotonic()
    results: dict[str, Any] = {
        "scale": {
            "nodes": scale.nodes,
            "services": scale.services,
            "pods_per_service": scale.pods_per_service,
        },
        "backend": args.backend,
        "rate": args.rate,
        "moves": moves,
    }
    env: dict[str, str] = {}
    if args.code:
        # The agent imports metaleg from there (PYTHONPATH precedes the editable install).
        env["PYTHONPATH"] = os.path.abspath(args.code)
        results["code"] = {"dir": env["PYTHONPATH"], "commit": args.code_commit}
    results["small"] = run_small(args.backend, settle_seconds, env)
    results["big"] = run_big(
        args.backend,
        scale,
        settle_seconds=settle_seconds,
        idle_seconds=idle_seconds,
        churn_seconds=churn_seconds,
        moves=moves,
        rate=args.rate,
        env=env,
    )
    small, big = results["small"], results["big"]
    results["goals"] = {
        "rss_ratio": big["watcher_rss_kib"] / small["watcher_rss_kib"],
        "churn_cpu_percent": big["churn"]["watcher_cpu_percent"],
        "move_ratio_p50": _ratio(big["moves_churn"]["p50"], big["moves_quiet"]["p50"]),
        "move_ratio_p99": _ratio(big["moves_churn"]["p99"], big["moves_quiet"]["p99"]),
    }
    results["wall_seconds"] = time.monotonic() - started
    path = write_results("cluster_scale" + ("-quick" if args.quick else ""), results, info)
    print(render_report(results))
    print(f"\n({results['wall_seconds']:.0f} s; results in {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
