"""Kubernetes Events on a Service when its egress on this node changes.

``kubectl describe svc`` then shows, per node, what metaleg does for the
Service ("node-a: IPv4: egress via node-b as 198.51.100.200", "node-a: IPv4
and IPv6: egress rejected: no ServiceL2Status names a known gateway node"),
in the words of :func:`metaleg.model.describe_egress`. Events are posted by
a background thread so that a slow or unreachable API server never delays the
desired state, and rate-limited (a token bucket for the whole agent, plus a
bounded queue): a burst of changes across many Services must not flood the API
server. What the limit drops is counted, and still logged by the watcher.
"""

from __future__ import annotations

import datetime
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from metaleg.metrics import EVENTS_POSTED
from metaleg.model import Action, Role, ServiceEgress, describe_egress
from metaleg.watcher.cluster import Problem
from metaleg.watcher.kubeclient import KubeCalls

log = logging.getLogger(__name__)

COMPONENT = "metaleg-agent"
REPORTING_CONTROLLER = "metaleg.de/agent"
RATE_PER_SECOND = 2.0
BURST = 20
QUEUE_SIZE = 200


@dataclass(frozen=True)
class ServiceEvent:
    namespace: str
    name: str
    reason: str
    message: str
    warning: bool


_REASONS = {
    Role.GATEWAY: "EgressGateway",
    Role.FORWARDER: "EgressForwarding",
    Role.REJECT: "EgressRejected",
}


def describe_change(node: str, service: ServiceEgress | None, key: str) -> ServiceEvent | None:
    """The Event for a Service whose egress on ``node`` became ``service`` (None: removed).

    The message is :func:`~metaleg.model.describe_egress` (brief: no source
    counts); a rejected family makes it a Warning, except on the gateway.
    """
    namespace, _, name = key.partition("/")
    if service is None:
        return ServiceEvent(
            namespace, name, "EgressRemoved", f"{node}: egress rules removed", False
        )
    reason = _REASONS.get(service.role)
    if reason is None:
        return None  # no endpoints on this node: nothing happens here, nothing to tell
    rejected = any(e.action == Action.REJECT for e in service.families)
    warning = service.role == Role.REJECT or (service.role == Role.FORWARDER and rejected)
    message = f"{node}: {describe_egress(service, brief=True)}"
    return ServiceEvent(namespace, name, reason, message, warning)


def describe_problem(node: str, problem: Problem) -> ServiceEvent | None:
    """A Warning Event for a problem the desired-state computation found in a Service (a
    node's address among its endpoints, a source shared with another Service, several
    announcing nodes); None for problems of other objects."""
    if problem.kind != "Service":
        return None
    namespace, _, name = problem.object.partition("/")
    return ServiceEvent(
        namespace, name, "EgressProblem", f"{node}: {problem.field}: {problem.message}", True
    )


class EventPoster(threading.Thread):
    """Posts :class:`ServiceEvent` values as core/v1 Events, rate-limited, in the background."""

    def __init__(self, api_client: Any, node: str) -> None:
        super().__init__(name="event-poster", daemon=True)
        self.calls = KubeCalls(api_client)
        self.node = node
        self.queue: queue.Queue[ServiceEvent] = queue.Queue(maxsize=QUEUE_SIZE)
        self.tokens = float(BURST)
        self.refilled = time.monotonic()

    def post(self, event: ServiceEvent) -> None:
        """Queue an Event; dropped (and counted) when the agent is over its rate."""
        now = time.monotonic()
        self.tokens = min(BURST, self.tokens + (now - self.refilled) * RATE_PER_SECOND)
        self.refilled = now
        if self.tokens < 1:
            EVENTS_POSTED.labels("watcher", "suppressed").inc()
            return
        try:
            self.queue.put_nowait(event)
            self.tokens -= 1
        except queue.Full:
            EVENTS_POSTED.labels("watcher", "suppressed").inc()

    def run(self) -> None:
        while True:
            event = self.queue.get()
            try:
                self.calls.post(
                    f"/api/v1/namespaces/{quote(event.namespace, safe='')}/events",
                    self._body(event),
                    request_timeout=(10, 30),
                )
                EVENTS_POSTED.labels("watcher", "posted").inc()
            except Exception as error:  # API errors, urllib3 errors: never kill the thread
                EVENTS_POSTED.labels("watcher", "failed").inc()
                log.warning(
                    "could not post an Event on Service %s/%s: %s",
                    event.namespace,
                    event.name,
                    error,
                )

    def _body(self, event: ServiceEvent) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{event.name}.{secrets.token_hex(8)}",
                "namespace": event.namespace,
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Service",
                "namespace": event.namespace,
                "name": event.name,
            },
            "reason": event.reason,
            "message": event.message,
            "type": "Warning" if event.warning else "Normal",
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": REPORTING_CONTROLLER,
            "reportingInstance": self.node,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "action": "Egress",
            "count": 1,
        }
