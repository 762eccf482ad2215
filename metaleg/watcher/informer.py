"""List + watch of one Kubernetes resource with the ``kubernetes`` client, client-go style.

Each :class:`Informer` runs in its own thread of the watcher process (the
client is blocking) and feeds :class:`Event` values into one queue that the
watcher's main thread consumes. It lists (paginated), then watches from the
list's resourceVersion with bookmarks; a watch that ends is resumed from the
last resourceVersion seen; ``410 Gone`` (history expired) makes it relist; any
other failure (API server down or restarting, timeouts) is retried with
exponential back-off. The last good objects stay in the watcher meanwhile: an
outage never empties the desired state.

Objects are handled as raw JSON, never as the client's models: their
deserialisation is slow and would hide malformed fields we want to report
rather than crash on. The requests go through the client's ``ApiClient``
without its generated API classes (:mod:`metaleg.watcher.kubeclient`), and a
list page is decoded into only the fields the parsers read (the ``Wire*``
Structs of :mod:`metaleg.watcher.cluster`): a relist never holds whole objects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import msgspec
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from metaleg.metrics import ERRORS, RELISTS, WATCH_EVENTS
from metaleg.watcher.cluster import (
    REWRITE_LABEL,
    WireEndpointSlice,
    WireL2Status,
    WireNode,
    WirePod,
    WireService,
    list_decoder,
    slim_page,
)
from metaleg.watcher.kubeclient import KubeCalls, Query

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 500
WATCH_TIMEOUT_SECONDS = (240, 480)  # randomised per watch, like client-go, to spread reconnects
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
SHORT_WATCH = 1.0
"""A watch that ends sooner than this with nothing in it is resumed with back-off."""
DEFAULT_IDLE_TIMEOUT = 75.0
"""WATCH_IDLE_TIMEOUT's default: the API server's bookmark interval (1 min) plus a margin."""
RETRY_AFTER_MAX = 60.0


def _retry_after(error: ApiException) -> float:
    """Seconds a 429 asks to wait (``Retry-After``, seconds form), 1 s when it says nothing
    usable, at most :data:`RETRY_AFTER_MAX`."""
    headers = error.headers or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        seconds = float(str(value))
    except ValueError:
        return 1.0
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


class Gone(Exception):
    """The API server no longer has the history we asked for (410): relist."""


@dataclass(frozen=True)
class Event:
    """What an informer reports to the watcher's main thread.

    ``kind`` is ``replace`` (a complete list: ``objects``), ``upsert``/``delete``
    (one ``object``), ``error`` (``message``; the informer keeps retrying), ``ok`` (the API
    server answers again after an error); ``synced`` is implied by ``replace``.
    """

    resource: str
    """The informer's name: a resource (``services``) or a scope (``pods:app``)."""
    kind: str
    objects: list[dict[str, Any]] = field(default_factory=list)
    object: dict[str, Any] | None = None
    message: str = ""
    tag: int = 0
    """Which informer sent it: a replaced informer's late events are told apart by it."""


ListCall = Callable[..., Any]
"""``call(query, request_timeout=None)``: the resource's list (or, with ``watch=True`` in the
query, watch) request, not read yet; see :meth:`KubeCalls.get`."""


@dataclass
class ResourceSpec:
    """What to list and watch, and how to name it in logs and metrics."""

    name: str
    list_call: ListCall
    missing_hint: str = ""
    """Shown when the API answers 404 (e.g. a CRD that is not installed)."""
    wire: type[msgspec.Struct] | None = None
    """The fields of an item the watcher reads (a ``Wire*`` Struct of
    :mod:`metaleg.watcher.cluster`): list pages are decoded into it, the rest of each object
    is skipped. None: whole objects."""


class Informer(threading.Thread):
    """Lists and watches one resource forever, reporting :class:`Event` values to ``events``."""

    def __init__(
        self,
        spec: ResourceSpec,
        events: queue.Queue[Event],
        tag: int = 0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        super().__init__(name=f"informer-{spec.name}", daemon=True)
        self.spec = spec
        self.events = events
        self.tag = tag
        self.idle_timeout = idle_timeout
        self.stopping = threading.Event()
        self.resource_version = ""
        self.relists = 0
        self.watch_events = 0
        self.failing = False
        """An error was reported and no request succeeded since."""
        self.list_version = "0"
        """The resourceVersion the next list asks for, as client-go's reflector chooses it:
        "0" at first (any version, from the API server's watch cache: a DaemonSet's agents
        must not all read etcd), then the newest version seen (not older than what we hold,
        still from the cache), "" (the newest, from etcd) after that was gone (410)."""
        self._response: Any = None
        """The open watch response, so that :meth:`stop` can end a read that would block for
        minutes (a replaced scope's informer must not keep its connection)."""
        self._page_decoder = list_decoder(spec.wire) if spec.wire is not None else None

    def stop(self) -> None:
        """Stop at once: the thread ends without reporting anything more."""
        self.stopping.set()
        response = self._response
        if response is not None:
            # urllib3's shutdown() unblocks a read in another thread (close() would not).
            with contextlib.suppress(Exception):
                response.shutdown()

    def run(self) -> None:
        delay = BACKOFF_INITIAL
        need_list = True
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if need_list:
                    self._list()
                    need_list = False
                events = self._watch()
                if events or time.monotonic() - started >= SHORT_WATCH:
                    delay = BACKOFF_INITIAL  # a watch that served and ended: resume at once
                else:
                    # Ended at once with nothing (a proxy closing every stream, an API
                    # server shedding load): resuming at once again would hammer it.
                    log.info(
                        "watch ended at once; resuming in %.1fs",
                        delay,
                        extra={"resource": self.spec.name},
                    )
                    delay = self._sleep(delay)
            except Gone:
                if self.stopping.is_set():
                    return
                log.info(
                    "watch history expired (410 Gone); relisting",
                    extra={"resource": self.spec.name},
                )
                need_list = True
            except ApiException as error:
                if self.stopping.is_set():
                    return
                ERRORS.labels("watcher", "watch").inc()
                message = self._describe(error)
                self._report_error(message)
                wait = _retry_after(error) if error.status == 429 else None
                if error.status == 410:
                    # The list's resourceVersion is gone too: list the newest (from etcd).
                    self.list_version = ""
                    need_list = True
                elif error.status != 429 and not (error.status or 0) >= 500:
                    # 429 and 5xx leave what we hold valid: retry the same request. Anything
                    # else (a CRD removed, permissions changed) starts again with a list.
                    need_list = True
                log.warning(
                    "%s; retrying in %.1fs",
                    message,
                    wait if wait is not None else delay,
                    extra={"resource": self.spec.name},
                )
                if wait is not None:
                    self.stopping.wait(wait)
                else:
                    delay = self._sleep(delay)
            except Exception as error:  # connection refused/reset, timeouts, bad JSON
                if self.stopping.is_set():
                    return
                ERRORS.labels("watcher", "watch").inc()
                message = f"{self.spec.name}: cannot reach the API server: {type(error).__name__}: {error}"
                self._report_error(message)
                log.warning(
                    "%s; retrying in %.1fs", message, delay, extra={"resource": self.spec.name}
                )
                delay = self._sleep(delay)

    def _report_error(self, message: str) -> None:
        self.failing = True
        self.events.put(Event(self.spec.name, "error", message=message, tag=self.tag))

    def _report_answer(self) -> None:
        """The API server answered: an error reported before is over (the watcher clears it
        even if no object changes afterwards)."""
        if self.failing:
            self.failing = False
            self.events.put(Event(self.spec.name, "ok", tag=self.tag))

    def _sleep(self, delay: float) -> float:
        self.stopping.wait(delay * random.uniform(0.8, 1.2))
        return min(delay * 2, BACKOFF_MAX)

    def _describe(self, error: ApiException) -> str:
        if error.status == 404 and self.spec.missing_hint:
            return f"{self.spec.name}: not found (404): {self.spec.missing_hint}"
        return f"{self.spec.name}: API error {error.status} {error.reason}"

    def _list(self) -> None:
        if self.stopping.is_set():
            return
        objects: list[dict[str, Any]] = []
        continue_token = ""
        while True:
            query: list[tuple[str, Any]] = [("limit", LIST_PAGE_SIZE)]
            if continue_token:
                query.append(("continue", continue_token))
            elif self.list_version:
                query.append(("resourceVersion", self.list_version))
            response = self.spec.list_call(query, request_timeout=(10, self.idle_timeout))
            self._report_answer()
            try:
                body = self._decode_page(response.data)
            finally:
                response.release_conn()
            objects.extend(item for item in body.get("items") or [] if isinstance(item, dict))
            metadata = body.get("metadata") or {}
            continue_token = metadata.get("continue") or ""
            if not continue_token:
                self.resource_version = str(metadata.get("resourceVersion") or "")
                self.list_version = self.resource_version
                break
        self.relists += 1
        RELISTS.labels("watcher", self.spec.name.partition(":")[0]).inc()
        if self.stopping.is_set():
            return
        self.events.put(Event(self.spec.name, "replace", objects=objects, tag=self.tag))

    def _decode_page(self, data: bytes) -> dict[str, Any]:
        if self._page_decoder is not None:
            try:
                return slim_page(self._page_decoder, data)
            except msgspec.DecodeError as error:
                # Not the shape the API server sends (say, a list item that is not an
                # object): decode it whole, the parsers report what is wrong.
                log.debug("list page decoded whole: %s", error, extra={"resource": self.spec.name})
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError(f"a list answer is not a JSON object but {type(body).__name__}")
        return body

    def _watch(self) -> int:
        """Watch until the stream ends; returns how many events and bookmarks it carried."""
        timeout = random.randint(*WATCH_TIMEOUT_SECONDS)
        response = self.spec.list_call(
            [
                ("allowWatchBookmarks", True),
                ("resourceVersion", self.resource_version),
                ("timeoutSeconds", timeout),
                ("watch", True),
            ],
            # The read timeout applies to every read: the API server sends a bookmark about
            # once a minute, so a connection silent for longer than that plus a margin is
            # dead (one that lost its peer fails sooner, by TCP keepalive).
            request_timeout=(10, self.idle_timeout),
        )
        self._response = response
        self._report_answer()
        received = 0
        if self.stopping.is_set():  # stopped while connecting: stop() did not see it
            response.shutdown()
        try:
            for event in self._events_of(response):
                if self.stopping.is_set():
                    return received
                received += 1
                self._handle(event)
            return received
        finally:
            self._response = None
            response.close()
            response.release_conn()

    def _events_of(self, response: Any) -> Iterator[dict[str, Any]]:
        for line in iter_resp_lines(response):
            if not line or line.isspace():
                continue
            event = json.loads(line)
            if isinstance(event, dict):
                yield event

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            return
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ApiException(
                status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}"
            )
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if isinstance(version, str) and version:
            self.resource_version = version
        if kind == "BOOKMARK":
            return
        self.watch_events += 1
        WATCH_EVENTS.labels("watcher", self.spec.name.partition(":")[0], str(kind)).inc()
        if kind in ("ADDED", "MODIFIED"):
            self.events.put(Event(self.spec.name, "upsert", object=obj, tag=self.tag))
        elif kind == "DELETED":
            self.events.put(Event(self.spec.name, "delete", object=obj, tag=self.tag))


def base_specs(api: Any, metallb_namespace: str) -> list[ResourceSpec]:
    """The resources watched whatever the scopes: labelled Services and MetalLB's statuses."""
    calls = KubeCalls(api)
    return [
        # Server-side filtering: a Service that loses the label arrives as DELETED.
        ResourceSpec(
            "services",
            _lister(calls, "/api/v1/services", ("labelSelector", f"{REWRITE_LABEL}=true")),
            wire=WireService,
        ),
        ResourceSpec(
            "servicel2statuses",
            _lister(
                calls,
                f"/apis/metallb.io/v1beta1/namespaces/{quote(metallb_namespace, safe='')}"
                "/servicel2statuses",
            ),
            wire=WireL2Status,
            missing_hint="the ServiceL2Status CRD (metallb.io/v1beta1) is missing; MetalLB >= 0.14 is "
            "required. Keeping the current kernel state and retrying",
        ),
    ]


_SCOPED_RESOURCES: dict[str, tuple[str, type[msgspec.Struct]]] = {
    "endpointslices": ("/apis/discovery.k8s.io/v1/endpointslices", WireEndpointSlice),
    "pods": ("/api/v1/pods", WirePod),
    "nodes": ("/api/v1/nodes", WireNode),
}


def scoped_spec(api: Any, scope: str, selector: tuple[str, str]) -> ResourceSpec:
    """The list + watch of one scope (see :mod:`metaleg.watcher.scopes`): ``scope`` is
    ``endpointslices``, ``pods:<keys>`` or ``nodes:<name>``, ``selector`` its query
    parameter (``labelSelector`` or ``fieldSelector``) and value."""
    path, wire = _SCOPED_RESOURCES[scope.partition(":")[0]]
    return ResourceSpec(scope, _lister(KubeCalls(api), path, selector), wire=wire)


def _lister(calls: KubeCalls, path: str, *selectors: tuple[str, str]) -> ListCall:
    def call(query: Query, request_timeout: Any = None) -> Any:
        return calls.get(path, [*selectors, *query], request_timeout)

    return call
