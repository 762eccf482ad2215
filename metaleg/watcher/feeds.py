"""The watcher's informers, one per resource or scope, and the objects each delivered.

:class:`Feeds` starts the informers of the labelled Services and the ServiceL2Statuses,
follows :class:`~metaleg.watcher.scopes.ScopeInputs` with the scoped informers
(EndpointSlices, Pods, Nodes) and hands every parsed object to the
:class:`~metaleg.watcher.tracker.EgressTracker`.

A scope whose selector changes (a Service was labelled, a gateway moved to a node not
watched yet) is replaced make-before-break: the new informer lists while the old one
keeps delivering events; when the new list arrives it replaces the old scope's objects
(what it no longer holds is deleted, what is unchanged costs nothing) and the old
informer is stopped. No event is missed between the two: the list is a complete view
at its resourceVersion, and the new watch continues from there. Only the scope that
changed is listed again, never everything. Until a new scope has listed, the desired
state is not published (a gateway node whose Node is not known yet would read as
"unknown": egress rejected for the few milliseconds of a list), for at most
:data:`SCOPE_SYNC_TIMEOUT` seconds: after that the state is published as it is,
failing closed.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metaleg.watcher.cluster import (
    ObjectError,
    Problem,
    parse_endpoint_slice,
    parse_l2_status,
    parse_node,
    parse_pod,
    parse_service,
)
from metaleg.watcher.informer import (
    DEFAULT_IDLE_TIMEOUT,
    Event,
    Informer,
    ResourceSpec,
    base_specs,
    scoped_spec,
)
from metaleg.watcher.scopes import ScopeInputs
from metaleg.watcher.tracker import EgressTracker

log = logging.getLogger(__name__)

SCOPE_SYNC_TIMEOUT = 5.0
"""How long a new scope's first list may hold back publishing (see the module doc)."""

Parser = Callable[[dict[str, Any], list[Problem]], Any]

PARSERS: dict[str, tuple[Parser, str]] = {
    "services": (parse_service, "services"),
    "servicel2statuses": (parse_l2_status, "l2_statuses"),
    "endpointslices": (parse_endpoint_slice, "slices"),
    "pods": (parse_pod, "pods"),
    "nodes": (parse_node, "nodes"),
}
"""Informer name prefix -> its parser and the tracker's resource."""


@dataclass
class _Feed:
    informer: Informer
    selector: tuple[str, str] | None
    started: float
    synced: bool = False


def object_key(obj: dict[str, Any]) -> str | None:
    """``namespace/name`` (or ``name`` for cluster-scoped objects), None without a name."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        return None
    namespace = metadata.get("namespace")
    return (
        f"{namespace}/{metadata['name']}"
        if isinstance(namespace, str) and namespace
        else metadata["name"]
    )


class Feeds:
    """Every informer of the watcher, the objects each delivered, their problems and errors."""

    def __init__(
        self,
        api: Any,
        events: queue.Queue[Event],
        tracker: EgressTracker,
        scope_inputs: ScopeInputs,
        metallb_namespace: str,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.api = api
        self.idle_timeout = idle_timeout
        self.events = events
        self.tracker = tracker
        self.scope_inputs = scope_inputs
        self.metallb_namespace = metallb_namespace
        self.active: dict[str, _Feed] = {}
        self.pending: dict[str, _Feed] = {}
        """Informers replacing (or adding) a scope that have not listed yet."""
        self.stores: dict[str, dict[str, Any]] = {}
        """Informer name -> key -> parsed object it delivered."""
        self.object_problems: dict[tuple[str, str], list[Problem]] = {}
        self.errors: dict[str, str] = {}
        self.relisted = False
        """A resource was listed since the caller last reset this (memory to give back)."""
        self._tags = itertools.count(1)
        self._synced_once = False

    # --- informers -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the informers of the Services and ServiceL2Statuses."""
        for spec in base_specs(self.api, self.metallb_namespace):
            self.active[spec.name] = self._start(spec, None)

    def _start(self, spec: ResourceSpec, selector: tuple[str, str] | None) -> _Feed:
        informer = Informer(spec, self.events, next(self._tags), self.idle_timeout)
        informer.start()
        return _Feed(informer, selector, time.monotonic())

    def stop(self) -> None:
        for feed in [*self.active.values(), *self.pending.values()]:
            feed.informer.stop()

    def follow_scopes(self) -> None:
        """Start, replace and stop scoped informers as the labelled Services require."""
        if not self.scope_inputs.changed:
            return
        wanted = self.scope_inputs.scopes().watches
        scoped = {name for name in [*self.active, *self.pending] if name not in _BASE}
        for name in sorted(scoped - wanted.keys()):
            self._drop_scope(name)
        for name, selector in sorted(wanted.items()):
            current = self.pending.get(name) or self.active.get(name)
            if current is not None and current.selector == selector:
                continue
            if name in self.pending:
                self.pending.pop(name).informer.stop()
            log.info("watching %s: %s=%s", name, *selector)
            self.pending[name] = self._start(scoped_spec(self.api, name, selector), selector)

    def _drop_scope(self, name: str) -> None:
        log.info("no longer watching %s", name)
        for feeds in (self.active, self.pending):
            feed = feeds.pop(name, None)
            if feed is not None:
                feed.informer.stop()
        self.errors.pop(name, None)
        store = self.stores.pop(name, {})
        for key in store:
            self.object_problems.pop((name, key), None)
            self._settle(name, key)

    # --- readiness -------------------------------------------------------------------------------

    def synced(self, now: float) -> bool:
        """Every informer listed once, and no scope has waited for its first list longer than
        :data:`SCOPE_SYNC_TIMEOUT` (a scope replaced as the cluster changes is not a loss of
        sync: readiness must not flicker at every gateway move). At start, every scope must
        have listed."""
        if not all(feed.synced for feed in self.active.values()):
            return False
        if not self._synced_once:
            self._synced_once = not self.pending
            return self._synced_once
        return all(now - feed.started < SCOPE_SYNC_TIMEOUT for feed in self.pending.values())

    def may_publish(self, now: float) -> bool:
        """The Services and statuses listed, and every scope too, or a new scope waited
        longer than :data:`SCOPE_SYNC_TIMEOUT` (see the module doc)."""
        if not all(self.active[name].synced for name in _BASE if name in self.active):
            return False
        if any(not feed.synced for feed in self.active.values()):
            return False
        return all(now - feed.started >= SCOPE_SYNC_TIMEOUT for feed in self.pending.values())

    def next_deadline(self) -> float | None:
        """When :meth:`may_publish` may turn true by itself (a pending scope timing out)."""
        if not self.pending:
            return None
        return min(feed.started for feed in self.pending.values()) + SCOPE_SYNC_TIMEOUT

    # --- events ----------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """Apply one informer event; late events of a replaced informer are dropped."""
        name = event.resource
        feed = self.active.get(name)
        promoting = False
        if feed is None or feed.informer.tag != event.tag:
            feed = self.pending.get(name)
            if feed is None or feed.informer.tag != event.tag:
                return  # a stopped informer's last words
            promoting = True
        if event.kind == "error":
            self.errors[name] = event.message
            return
        self.errors.pop(name, None)
        if event.kind == "ok":
            return
        if event.kind == "replace":
            self._replace(name, event.objects)
            feed.synced = True
            self.relisted = True
            if promoting:
                old = self.active.pop(name, None)
                if old is not None:
                    old.informer.stop()
                self.active[name] = self.pending.pop(name)
        elif promoting:
            return  # a pending informer lists before it watches; nothing else comes first
        elif event.kind == "upsert" and event.object is not None:
            self._upsert(name, event.object)
        elif event.kind == "delete" and event.object is not None:
            key = object_key(event.object)
            if key is not None:
                self._remove(name, key)

    def _replace(self, name: str, objects: list[dict[str, Any]]) -> None:
        store = self.stores.setdefault(name, {})
        listed: set[str] = set()
        for obj in objects:
            key = self._upsert(name, obj)
            if key is not None:
                listed.add(key)
        for key in [key for key in store if key not in listed]:
            self._remove(name, key)

    def _upsert(self, name: str, obj: dict[str, Any]) -> str | None:
        parse, resource = PARSERS[name.partition(":")[0]]
        problems: list[Problem] = []
        try:
            info = parse(obj, problems)
        except ObjectError as error:
            log.warning("skipped an object: %s", error, extra={"resource": name})
            return None
        key = object_key(obj)
        assert key is not None  # parse() succeeded, so the object has a name
        store = self.stores.setdefault(name, {})
        old = store.get(key)
        store[key] = info
        if problems:
            self.object_problems[(name, key)] = problems
        else:
            self.object_problems.pop((name, key), None)
        self._scope_input(resource, key, old, info)
        self.tracker.upsert(resource, key, info)
        return key

    def _remove(self, name: str, key: str) -> None:
        store = self.stores.get(name, {})
        old = store.pop(key, None)
        self.object_problems.pop((name, key), None)
        if old is not None:
            self._settle(name, key)

    def _settle(self, name: str, key: str) -> None:
        """After a scope lost an object: hold another scope's copy, or none."""
        kind = name.partition(":")[0]
        _, resource = PARSERS[kind]
        for other, store in self.stores.items():
            if other != name and other.partition(":")[0] == kind and key in store:
                self.tracker.upsert(resource, key, store[key])
                return
        old = self.tracker.cluster_object(resource, key)
        self._scope_input(resource, key, old, None)
        self.tracker.delete(resource, key)

    def _scope_input(self, resource: str, key: str, old: Any, new: Any) -> None:
        if resource == "services":
            self.scope_inputs.service(old, new)
        elif resource == "l2_statuses":
            self.scope_inputs.status(key, old, new)


_BASE = ("services", "servicel2statuses")
