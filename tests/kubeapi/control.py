"""Client-side helpers: kubeconfig, a ``kubernetes`` ApiClient, and the fault-control client.

Tests talk Kubernetes to the emulator with the real ``kubernetes`` client
(:func:`api_client`) or ``kubectl`` (:func:`write_kubeconfig`), and drive its
faults either on the :class:`~.server.KubeApiServer` object or, when it runs
in another process (``python -m tests.kubeapi``), with :class:`EmulatorControl`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from tests.waiting import wait_until


def write_kubeconfig(
    path: str, server_url: str, *, namespace: str = "default", token_file: str | None = None
) -> str:
    """Write a kubeconfig for ``server_url`` (plain http; no credentials, or the bearer token
    in ``token_file``, which clients read from there); return ``path``.

    It is JSON, which is YAML too: the ``kubernetes`` client's
    ``config.load_kube_config`` and ``kubectl --kubeconfig`` both read it.
    """
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server_url}}],
        "users": [{"name": "emulator", "user": {"tokenFile": token_file} if token_file else {}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
            }
        ],
        "current-context": "emulator",
        "preferences": {},
    }
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as file:
        json.dump(config, file, indent=2)
    os.replace(temporary, path)
    return path


def api_client(server_url: str) -> Any:
    """A ``kubernetes.client.ApiClient`` for ``server_url`` (no auth, no global state)."""
    from kubernetes import client

    configuration = client.Configuration(host=server_url)
    return client.ApiClient(configuration)


def wait_for_port_file(path: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait for ``python -m tests.kubeapi --port-file`` to write ``path``; return its content.

    The file is ``{"pid": ..., "listen": {"host", "port", "url", "netns"},
    "netns": {...}}`` (``netns`` only with ``--netns``).
    """

    def content() -> dict[str, Any] | None:
        try:
            with open(path) as file:
                data: dict[str, Any] = json.load(file)
                return data
        except (FileNotFoundError, ValueError):
            return None

    return wait_until(content, timeout, message=f"{path} to be written")


class EmulatorControl:
    """Drive the faults of an emulator over HTTP (``/_emulator/...``)."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, action: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body or {}).encode() if method == "POST" else None
        request = urllib.request.Request(
            f"{self.base_url}/_emulator/{action}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def state(self) -> dict[str, Any]:
        """resourceVersion, oldestResourceVersion, groups, open watches, latency, listeners."""
        result: dict[str, Any] = self._call("GET", "state")
        return result

    def compact(self) -> None:
        self._call("POST", "compact")

    def drop_watches(self, *, abort: bool = False) -> None:
        self._call("POST", "drop_watches", {"abort": abort})

    def set_group_available(self, group: str, available: bool) -> None:
        self._call("POST", "set_group_available", {"group": group, "available": available})

    def set_latency(self, seconds: float) -> None:
        self._call("POST", "set_latency", {"seconds": seconds})

    def restart(
        self, downtime: float = 0.0, *, keep_history: bool = False, wait: bool = True
    ) -> None:
        """Stop and start the emulator (all listeners); with ``wait``, until it is back."""
        before = int(self.state()["restarts"])
        self._call("POST", "restart", {"downtime": downtime, "keep_history": keep_history})
        if wait:
            self.wait_ready(timeout=self.timeout + downtime, restarts=before + 1)

    def wait_ready(self, timeout: float = 10.0, *, restarts: int = 0) -> None:
        """Wait until the emulator serves (and has restarted ``restarts`` times)."""

        def state() -> dict[str, Any] | str:
            try:
                return self.state()
            except (OSError, urllib.error.URLError, ValueError) as error:
                return f"{type(error).__name__}: {error}"

        wait_until(
            state,
            timeout,
            message=f"{self.base_url} to serve after {restarts} restarts",
            accept=lambda state: (
                isinstance(state, dict) and state["running"] and int(state["restarts"]) >= restarts
            ),
        )

    def wait_for_watches(
        self, count: int = 1, resource: str | None = None, timeout: float = 10.0
    ) -> None:
        """Wait until ``count`` watches are open (on ``resource``: a key like ``v1/services``,
        or a plural such as ``services``)."""

        def matching() -> list[dict[str, Any]]:
            return [
                w
                for w in self.state()["watches"]
                if resource is None
                or w["resource"] == resource
                or w["resource"].rsplit("/", 1)[-1] == resource
            ]

        wait_until(
            matching,
            timeout,
            message=f"{count} watches on {resource or 'anything'}",
            accept=lambda watches: len(watches) >= count,
        )
