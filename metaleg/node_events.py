"""Warning Events on this node's Node object, for what stops the whole agent here.

A Service's problems go to that Service (:mod:`metaleg.watcher.events`); what
concerns the node as a whole — a second agent refused, no firewall backend that
can run on this kernel — goes to the Node, where ``kubectl describe node`` shows
it. Such Events are posted once, when the process that finds the problem starts,
with short timeouts: a problem must be reported even when the API server cannot
be reached, so posting never raises and never waits long.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from typing import Any

from metaleg.config import Config

EVENT_TIMEOUT = (3.0, 5.0)
"""Connect and read timeouts of the Event's POST."""


def node_event(node: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Warning Event on Node ``node`` (its uid is its name, as the kubelet's
    Events have it, which is what ``kubectl describe node`` looks for)."""
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{node}.{secrets.token_hex(8)}", "namespace": "default"},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
        "reason": reason,
        "message": message,
        "type": "Warning",
        "source": {"component": "metaleg-agent", "host": node},
        "reportingComponent": "metaleg.de/agent",
        "reportingInstance": node,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "action": "Start",
        "count": 1,
    }


def post_node_event(config: Config, reason: str, message: str) -> str:
    """Post :func:`node_event` with KUBECONFIG or the in-cluster configuration; returns
    "" or why it could not be posted (never raises)."""
    # urllib3 logs each retry; the problem is reported once, by the caller.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        from metaleg.watcher.kubeclient import KubeCalls, api_client

        client = api_client(config.kubeconfig)
        try:
            KubeCalls(client).post(
                "/api/v1/namespaces/default/events",
                node_event(config.node_name, reason, message),
                request_timeout=EVENT_TIMEOUT,
            )
        finally:
            client.close()
    except Exception as error:
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0] if text else ''}"
    return ""
