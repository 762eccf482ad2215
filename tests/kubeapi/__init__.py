"""A faithful Kubernetes API server emulator for tests, over real HTTP.

The unmodified ``kubernetes`` client and ``kubectl`` talk to it: discovery,
list (label/field selectors, pagination), get, create, replace, patch, delete,
status subresources and watch (resourceVersion replay, 410 Expired, bookmarks,
selector transitions) with one global resourceVersion. Faults: compaction,
disappearing API groups, dropped watches, restarts, latency.

In-process::

    from tests.kubeapi import KubeApiServer

    with KubeApiServer() as api:
        core = kubernetes.client.CoreV1Api(api.api_client())

In another process (e.g. inside a network-namespace lab)::

    python -m tests.kubeapi --listen 127.0.0.1:0 --port-file ports.json \\
        [--netns NAME --netns-listen 0.0.0.0:6443]

driven with :class:`EmulatorControl`.
"""

from .control import EmulatorControl, api_client, wait_for_port_file, write_kubeconfig
from .errors import ApiError
from .resources import ResourceType, default_resources
from .server import KubeApiServer, Listener
from .store import Store, Watch, WatchEvent

__all__ = [
    "ApiError",
    "EmulatorControl",
    "KubeApiServer",
    "Listener",
    "ResourceType",
    "Store",
    "Watch",
    "WatchEvent",
    "api_client",
    "default_resources",
    "wait_for_port_file",
    "write_kubeconfig",
]
