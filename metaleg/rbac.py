"""The Kubernetes API permissions the agent needs: the single source of truth.

The ClusterRole in ``k8s/clusterrole.yaml`` grants exactly :data:`PERMISSIONS`
(``tests/test_manifests.py`` checks it), and the same test runs the watcher's
real API calls against the API emulator and checks that each one is covered
here and that every permission here is used. A new resource the agent reads or
writes is one more :class:`Permission` line below, plus its rule in the
ClusterRole.
"""

from __future__ import annotations

from dataclasses import dataclass

Verb = str
"""A Kubernetes authorisation verb: ``get``, ``list``, ``watch``, ``create``, ``patch``..."""

READ: tuple[Verb, ...] = ("get", "list", "watch")
"""What an informer needs: list, watch from the list's resourceVersion, and get."""


@dataclass(frozen=True)
class Permission:
    """One RBAC rule: ``verbs`` on ``resource`` of API group ``api_group``.

    ``api_group`` is ``""`` for the core group (``/api/v1``); ``resource`` is the
    plural, lower-case name as in the URL path (``endpointslices``), optionally
    with a subresource (``services/status``).
    """

    api_group: str
    resource: str
    verbs: tuple[Verb, ...]

    def allows(self, api_group: str, resource: str, verb: Verb) -> bool:
        """Whether this rule grants ``verb`` on ``resource`` of ``api_group``."""
        return api_group == self.api_group and resource == self.resource and verb in self.verbs


PERMISSIONS: tuple[Permission, ...] = (
    Permission("", "services", READ),
    Permission("", "nodes", READ),
    Permission("", "pods", READ),
    Permission("discovery.k8s.io", "endpointslices", READ),
    Permission("metallb.io", "servicel2statuses", READ),
    Permission("", "events", ("create",)),  # Events on Services (metaleg.watcher.events)
)
"""Every API permission of the agent, cluster-wide (a ClusterRole)."""


def allowed(api_group: str, resource: str, verb: Verb) -> bool:
    """Whether :data:`PERMISSIONS` grants ``verb`` on ``resource`` of ``api_group``."""
    return any(permission.allows(api_group, resource, verb) for permission in PERMISSIONS)
