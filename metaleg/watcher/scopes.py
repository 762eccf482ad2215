"""What the watcher watches besides the labelled Services and the ServiceL2Statuses.

A DaemonSet pays for every object it watches on every node, so the watcher asks the
API server only for what the desired state needs (a real kube-apiserver filters
server-side, in its watch cache):

- EndpointSlices of the labelled Services only:
  ``kubernetes.io/service-name in (<their names>)``. Same-named Services of other
  namespaces come along and are ignored (a label selector cannot name a namespace).
- Pods of the labelled Services, on every node, so that every node — the gateway
  above all — learns a new pod's IP when its kubelet reports it, not when an
  EndpointSlice lists it seconds later. A label selector cannot say "this selector
  or that one", so Services are grouped by the keys of their selectors: one watch
  per group, ``k1 in (values),k2 in (values)``, a superset of the group's Pods
  (typically one or two watches for any number of Services); the desired-state
  function matches each Service's selector exactly.
- Nodes by name (``metadata.name=<node>``): this node (its pod CIDRs keep its own pods
  out of the transit guard) and the nodes the labelled Services' ServiceL2Statuses
  name (their InternalIPs are the next hops). Never every Node: kubelets rewrite
  their Node's status all the time, and a Node object is mostly image lists.

The inputs are counted (:class:`ScopeInputs`) so that an event that changes nothing
of the scopes costs a few dictionary operations, and :meth:`ScopeInputs.scopes` is
rebuilt only when a name, a key or a value comes or goes.
"""

from __future__ import annotations

import re
from collections import Counter

import msgspec

from metaleg.watcher.cluster import SERVICE_NAME_LABEL, L2StatusInfo, ServiceInfo

SELECTOR_LIMIT = 256 * 1024
"""Above this many characters a selector of names is not sent (the API server's request
line and headers are limited to 1 MiB): then every EndpointSlice with a service-name
label is watched and filtered here."""

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def valid_label_pair(key: str, value: str) -> bool:
    """Whether ``key=value`` can go into a label selector (the API server answers 400 to a
    selector with an invalid key or value; it validates Service selectors the same way, so
    this guards against a hand-made object breaking the watch of every other Service)."""
    return bool(_LABEL_KEY.match(key)) and len(key) <= 317 and bool(_LABEL_VALUE.match(value))


class WatchScopes(msgspec.Struct, frozen=True):
    """The scoped watches, by scope name (``endpointslices``, ``pods:<keys>``,
    ``nodes:<name>``) -> selector query parameter (``labelSelector`` or ``fieldSelector``
    and its value)."""

    watches: dict[str, tuple[str, str]]


class ScopeInputs:
    """The parts of the labelled Services and their ServiceL2Statuses that decide the scopes,
    counted so that a change is noticed in O(1)."""

    def __init__(self, node_name: str, metallb_namespace: str) -> None:
        self.node_name = node_name
        self.metallb_namespace = metallb_namespace
        self._service_names: Counter[str] = Counter()
        self._selector_values: dict[tuple[str, ...], dict[str, Counter[str]]] = {}
        self._gateway_nodes: Counter[str] = Counter()
        """Nodes named by the ServiceL2Statuses of labelled Services."""
        self._labelled: set[tuple[str, str]] = set()
        self._status_targets: dict[str, tuple[tuple[str, str], str]] = {}
        """ServiceL2Status key -> (the Service it names, its node), for those in
        METALLB_NAMESPACE that name both."""
        self._statuses_of_service: dict[tuple[str, str], set[str]] = {}
        self.changed = True
        """A name, key or value came or went since :meth:`scopes` was last called."""

    def service(self, old: ServiceInfo | None, new: ServiceInfo | None) -> None:
        """A Service event (objects as the watcher parsed them; None: absent)."""
        if (
            old is not None
            and new is not None
            and (old.labelled, old.selector) == (new.labelled, new.selector)
        ):
            return  # its LB IPs changed, or nothing: no scope depends on those
        if old is not None and old.labelled:
            self._count_service(old, -1)
            self._labelled.discard((old.namespace, old.name))
            self._count_gateways_of((old.namespace, old.name), -1)
        if new is not None and new.labelled:
            self._count_service(new, 1)
            self._labelled.add((new.namespace, new.name))
            self._count_gateways_of((new.namespace, new.name), 1)

    def status(self, key: str, old: L2StatusInfo | None, new: L2StatusInfo | None) -> None:
        """A ServiceL2Status event."""
        target = None
        if (
            new is not None
            and new.namespace == self.metallb_namespace
            and new.service_namespace is not None
            and new.service_name is not None
            and new.node is not None
        ):
            target = ((new.service_namespace, new.service_name), new.node)
        if target == self._status_targets.get(key):
            return  # what a status says besides its Service and node does not matter here
        before = self._status_targets.pop(key, None)
        if before is not None:
            self._statuses_of_service[before[0]].discard(key)
            if not self._statuses_of_service[before[0]]:
                del self._statuses_of_service[before[0]]
            if before[0] in self._labelled:
                self._bump(self._gateway_nodes, before[1], -1)
        if target is not None:
            service, node = target
            self._status_targets[key] = target
            self._statuses_of_service.setdefault(service, set()).add(key)
            if service in self._labelled:
                self._bump(self._gateway_nodes, node, 1)

    def _count_gateways_of(self, service: tuple[str, str], step: int) -> None:
        for key in self._statuses_of_service.get(service, ()):
            self._bump(self._gateway_nodes, self._status_targets[key][1], step)

    def _count_service(self, service: ServiceInfo, step: int) -> None:
        self._bump(self._service_names, service.name, step)
        pairs = [(k, v) for k, v in service.selector if valid_label_pair(k, v)]
        if not pairs or len(pairs) != len(service.selector):
            return  # no Pods (no selector), or one the API server would refuse
        keys = tuple(k for k, _ in pairs)
        group = self._selector_values.setdefault(keys, {k: Counter() for k in keys})
        for k, v in pairs:
            self._bump(group[k], v, step)
        if not any(group.values()):
            del self._selector_values[keys]

    def _bump(self, counter: Counter[str], item: str, step: int) -> None:
        before = counter[item] > 0
        counter[item] += step
        if counter[item] <= 0:
            del counter[item]
        if before != (counter[item] > 0):  # a Counter answers 0 for a missing item
            self.changed = True

    def scopes(self) -> WatchScopes:
        """The scoped watches the current inputs need."""
        self.changed = False
        watches: dict[str, tuple[str, str]] = {}
        if self._service_names:
            names = ",".join(sorted(self._service_names))
            selector = f"{SERVICE_NAME_LABEL} in ({names})"
            if len(selector) > SELECTOR_LIMIT:
                selector = SERVICE_NAME_LABEL
            watches["endpointslices"] = ("labelSelector", selector)
        for keys, values in sorted(self._selector_values.items()):
            selector = ",".join(f"{k} in ({','.join(sorted(values[k]))})" for k in keys)
            watches[f"pods:{','.join(keys)}"] = ("labelSelector", selector)
        for node in sorted({self.node_name, *self._gateway_nodes}):
            watches[f"nodes:{node}"] = ("fieldSelector", f"metadata.name={node}")
        return WatchScopes(watches)
