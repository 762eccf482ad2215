"""The object store: registry semantics, a global resourceVersion, watch history.

Everything is guarded by one re-entrant lock; watchers sleep on a condition
variable bound to it and are woken by every write (and by the faults that end
watches). Stored objects are never mutated after they are committed: every
write builds a new dict, so readers may serialise what they got under the lock
after releasing it.

resourceVersion is one integer counter shared by all resources (like an etcd
revision), bumped by every write that changes something. Each write appends a
:class:`WatchEvent` (with the object before and after) to a bounded history
ring; the ring is contiguous, so the watch of a client that saw version ``N``
replays ``history[N - floor:]`` where ``floor`` is the newest version no
longer retained. ``N < floor`` means *too old* (410 Gone / Expired).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import copy
import datetime
import heapq
import itertools
import json
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from . import errors
from .errors import ApiError
from .patch import PatchError, apply_patch
from .resources import BOOTSTRAP_OBJECTS, KEEP_STATUS, Object, ResourceType, default_resources
from .selectors import FieldSelector, LabelSelector, label_key_error, label_value_error

Key = tuple[str, str]  # (namespace or "", name)

#: metadata fields owned by the server: a client cannot set or change them
_SYSTEM_METADATA = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "managedFields",
    "selfLink",
)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WatchEvent:
    """One committed write, as retained in the history ring."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    resource: str  # ResourceType.key
    key: Key
    obj: Object  # the object after the write (DELETED: its last state at the deletion's RV)
    prev: Object | None  # the object before the write (None for ADDED)


@dataclass
class WatchInfo:
    """What :meth:`Store.open_watches` reports about one open watch."""

    resource: str
    namespace: str | None
    label_selector: str
    field_selector: str
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "namespace": self.namespace,
            "labelSelector": self.label_selector,
            "fieldSelector": self.field_selector,
            "started": self.started,
        }


def _strip_rv(obj: Mapping[str, Any]) -> Object:
    result = dict(obj)
    metadata = dict(result.get("metadata") or {})
    metadata.pop("resourceVersion", None)
    result["metadata"] = metadata
    return result


class Watch:
    """An open watch: initial objects, then :meth:`wait` for converted events.

    Created by :meth:`Store.watch`. ``expired`` is set (and nothing else is
    served) when the requested resourceVersion is older than the history.
    """

    def __init__(
        self,
        store: Store,
        resource: ResourceType,
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        pos: int,
        initial: list[Object],
        expired: ApiError | None,
        info: WatchInfo,
    ) -> None:
        self._store = store
        self.resource = resource
        self._namespace = namespace
        self._labels = labels
        self._fields = fields
        self.pos = pos
        self.initial = initial
        self.expired = expired
        self._info = info
        self._epoch = store._epoch
        self._closed = False

    def matches(self, obj: Object) -> bool:
        metadata = obj.get("metadata") or {}
        if self._namespace is not None and metadata.get("namespace") != self._namespace:
            return False
        return self._labels.matches(metadata.get("labels")) and self._fields.matches(obj)

    def _convert(self, event: WatchEvent) -> tuple[str, Object] | None:
        """The event this watcher sees, with the watch cache's selector transitions."""
        if event.resource != self.resource.key:
            return None
        current = event.type != "DELETED" and self.matches(event.obj)
        previous = event.prev is not None and self.matches(event.prev)
        if current:
            return ("MODIFIED" if previous else "ADDED"), event.obj
        if not previous:
            return None
        if event.type == "DELETED":
            return "DELETED", event.obj
        # Stopped matching: DELETED with the previous content at this event's RV.
        assert event.prev is not None
        gone = copy.deepcopy(event.prev)
        gone["metadata"]["resourceVersion"] = str(event.rv)
        return "DELETED", gone

    @property
    def open(self) -> bool:
        """False once closed, cut by a fault, or its group became unavailable."""
        store = self._store
        return not (
            self._closed
            or store._epoch != self._epoch
            or self.resource.group in store._unavailable_groups
        )

    def wait(self, timeout: float) -> list[tuple[str, Object]] | None:
        """Events after :attr:`pos` (waiting up to ``timeout`` s); None once the watch is over.

        An empty list means the timeout passed without an event for this watch.
        A watcher that fell behind the retained history is ended (as the API
        server drops watchers that cannot keep up); the client re-watches and
        gets 410 if it is too far behind.
        """
        store = self._store
        deadline = time.monotonic() + timeout
        with store._changed:
            while True:
                if not self.open and not self._owed_before_group_left():
                    return None
                if store._rv > self.pos:
                    if self.pos < store._floor:
                        return None
                    # The newest rv - pos events, taken from the right end of the ring (an
                    # islice from the left would step over the whole retained history).
                    events = list(itertools.islice(reversed(store._history), store._rv - self.pos))
                    events.reverse()
                    self.pos = store._rv
                    converted = [e for e in map(self._convert, events) if e is not None]
                    if converted:
                        return converted
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                store._changed.wait(remaining)

    def _owed_before_group_left(self) -> bool:
        """Events written before the watch's API group went away (the objects a deleted CRD
        took with it) are still delivered, as the API server does before it ends the watch."""
        store = self._store
        return (
            not self._closed
            and store._epoch == self._epoch
            and store._rv > self.pos
            and self.resource.group in store._unavailable_groups
        )

    def close(self) -> None:
        with self._store._changed:
            if not self._closed:
                self._closed = True
                self._store._watches.pop(id(self), None)
                self._store._changed.notify_all()


class Store:
    """Objects of all registered resource types, their history and open watches."""

    def __init__(
        self,
        resources: Iterable[ResourceType] | None = None,
        *,
        history_size: int = 10000,
        require_namespaces: bool = True,
        bootstrap: bool = True,
    ) -> None:
        """Create a store.

        :param resources: the resource types (default :func:`default_resources`)
        :param history_size: events retained for watches from a resourceVersion
        :param require_namespaces: creating a namespaced object needs its
            Namespace to exist (404 otherwise), as in Kubernetes
        :param bootstrap: create the system namespaces and the ``kubernetes``
            Service, as every cluster has them
        """
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._types: dict[str, ResourceType] = {}
        self._objects: dict[str, dict[Key, Object]] = {}
        self._sorted_keys: dict[str, list[Key]] = {}
        """Per resource, its objects' keys in order; dropped when a key comes or goes."""
        self._history: deque[WatchEvent] = deque()
        self.history_size = history_size
        self.require_namespaces = require_namespaces
        self._rv = 0
        self._floor = 0
        self._epoch = 0
        self._unavailable_groups: set[str] = set()
        self._watches: dict[int, WatchInfo] = {}
        for resource in resources if resources is not None else default_resources():
            self.register(resource)
        if bootstrap:
            for resource_key, obj in BOOTSTRAP_OBJECTS:
                if resource_key in self._types:
                    namespace = obj["metadata"].get("namespace")
                    self.create(resource_key, copy.deepcopy(obj), namespace=namespace)

    # --- resource types -----------------------------------------------------

    def register(self, resource: ResourceType) -> None:
        """Serve another resource type (no-op if already registered)."""
        with self._lock:
            self._types.setdefault(resource.key, resource)
            self._objects.setdefault(resource.key, {})

    def resource_types(self, *, available_only: bool = True) -> list[ResourceType]:
        with self._lock:
            return [
                t
                for t in self._types.values()
                if not available_only or t.group not in self._unavailable_groups
            ]

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        """The available type served at ``group/version/plural``, if any."""
        with self._lock:
            api_version = f"{group}/{version}" if group else version
            resource = self._types.get(f"{api_version}/{plural}")
            if resource is None or resource.group in self._unavailable_groups:
                return None
            return resource

    def resolve(self, resource: ResourceType | str) -> ResourceType:
        """A type from itself, its key, ``plural``, ``plural.group`` or ``Kind``."""
        if isinstance(resource, ResourceType):
            return resource
        with self._lock:
            if resource in self._types:
                return self._types[resource]
            for t in self._types.values():
                names = {t.plural, t.kind, f"{t.plural}.{t.group}" if t.group else t.plural}
                if resource in names:
                    return t
        raise KeyError(f"unknown resource {resource!r}")

    # --- state and faults ---------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current (newest) resourceVersion."""
        with self._lock:
            return self._rv

    @property
    def oldest_resource_version(self) -> int:
        """Watches from a resourceVersion below this get 410 Expired."""
        with self._lock:
            return self._floor

    def compact(self) -> int:
        """Forget the watch history: any watch from an older resourceVersion gets 410."""
        with self._changed:
            self._history.clear()
            self._floor = self._rv
            self._changed.notify_all()
            return self._rv

    def drop_watches(self) -> None:
        """End every open watch."""
        with self._changed:
            self._epoch += 1
            self._changed.notify_all()

    def set_group_available(self, group: str, available: bool) -> None:
        """Make an API group disappear (404, not in discovery, watches end) or come back.

        Objects of the group are kept and reappear when it becomes available.
        """
        with self._changed:
            if available:
                self._unavailable_groups.discard(group)
            else:
                self._unavailable_groups.add(group)
            self._changed.notify_all()

    def group_available(self, group: str) -> bool:
        with self._lock:
            return group not in self._unavailable_groups

    def groups(self) -> dict[str, bool]:
        """Every registered API group (core is "") and whether it is available."""
        with self._lock:
            return {t.group: t.group not in self._unavailable_groups for t in self._types.values()}

    def open_watches(self) -> list[dict[str, Any]]:
        with self._lock:
            return [info.as_dict() for info in self._watches.values()]

    def wait_for_watches(
        self, count: int = 1, resource: ResourceType | str | None = None, timeout: float = 10.0
    ) -> None:
        """Block until at least ``count`` watches (on ``resource``, if given) are open."""
        key = self.resolve(resource).key if resource is not None else None
        deadline = time.monotonic() + timeout

        def enough() -> bool:
            return sum(1 for w in self._watches.values() if key in (None, w.resource)) >= count

        with self._changed:
            while not enough():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"fewer than {count} watches on {key or 'anything'}")
                self._changed.wait(remaining)

    def wait_for_watches_closed(self, timeout: float = 2.0) -> bool:
        """Wait until no watch is open; False if some still are after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._watches:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    # --- helpers ------------------------------------------------------------

    def _commit(
        self, resource: ResourceType, event_type: str, obj: Object, prev: Object | None
    ) -> Object:
        """Write ``obj`` (remove it for DELETED) at a new resourceVersion; record the event."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        metadata = obj["metadata"]
        key = (metadata.get("namespace", ""), metadata["name"])
        objects = self._objects[resource.key]
        if event_type == "DELETED":
            if objects.pop(key, None) is not None:
                self._sorted_keys.pop(resource.key, None)
        else:
            if key not in objects:
                self._sorted_keys.pop(resource.key, None)
            objects[key] = obj
        self._history.append(WatchEvent(self._rv, event_type, resource.key, key, obj, prev))
        while len(self._history) > self.history_size:
            self._floor = self._history.popleft().rv
        self._changed.notify_all()
        return obj

    def _get(self, resource: ResourceType, namespace: str | None, name: str) -> Object:
        obj = self._objects[resource.key].get((namespace or "", name))
        if obj is None:
            raise errors.not_found(resource.plural, resource.group, name)
        return obj

    def _changes_since(self, resource: ResourceType, rv: int) -> dict[Key, Object | None]:
        """The objects of ``resource`` that changed after resourceVersion ``rv``, as they were
        at ``rv`` (None: absent then). The others are as stored now."""
        changes: dict[Key, Object | None] = {}
        for event in reversed(self._history):
            if event.rv <= rv:
                break
            if event.resource != resource.key:
                continue
            # Walking back in time: the oldest event after rv leaves the state at rv.
            changes[event.key] = None if event.type == "ADDED" else event.prev
        return changes

    def _keys(self, resource: ResourceType) -> list[Key]:
        """The keys of the objects of ``resource``, sorted (cached until one comes or goes)."""
        keys = self._sorted_keys.get(resource.key)
        if keys is None:
            keys = self._sorted_keys[resource.key] = sorted(self._objects[resource.key])
        return keys

    def _objects_at(
        self, resource: ResourceType, rv: int, namespace: str | None, start: Key | None
    ) -> Iterator[tuple[Key, Object]]:
        """The objects of ``resource`` as they were at resourceVersion ``rv`` (not newer than
        the current one), in key order: those in ``namespace`` (any: None) after ``start``."""
        current = self._objects[resource.key]
        keys = self._keys(resource)
        low, high = _window(keys, namespace, start)
        window = (keys[i] for i in range(low, high))  # (an islice would step to low)
        changes = self._changes_since(resource, rv) if rv < self._rv else {}
        if not changes:
            for key in window:
                yield key, current[key]
            return
        # Objects deleted since rv are not among the current keys: merge them in.
        gone = sorted(
            k
            for k, obj in changes.items()
            if obj is not None
            and k not in current
            and (namespace is None or k[0] == namespace)
            and (start is None or k > start)
        )
        for key in heapq.merge(window, gone):
            obj = changes[key] if key in changes else current[key]
            if obj is not None:
                yield key, obj

    def _count_at(
        self, resource: ResourceType, rv: int, namespace: str | None, start: Key | None
    ) -> int:
        """How many objects :meth:`_objects_at` yields, without walking them."""
        keys = self._keys(resource)
        low, high = _window(keys, namespace, start)
        count = high - low
        if rv < self._rv:
            current = self._objects[resource.key]
            for key, obj in self._changes_since(resource, rv).items():
                if (namespace is None or key[0] == namespace) and (start is None or key > start):
                    count += (obj is not None) - (key in current)
        return count

    def _incoming(self, resource: ResourceType, body: Any, namespace: str | None) -> Object:
        """A deep copy of a request body, checked and with kind/apiVersion/namespace set."""
        if not isinstance(body, dict):
            raise errors.bad_request(f"the body of the request must be a {resource.kind} object")
        obj = copy.deepcopy(body)
        api_version = obj.get("apiVersion")
        if api_version not in (None, "", resource.api_version):
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({resource.api_version})"
            )
        kind = obj.get("kind")
        if kind not in (None, "", resource.kind):
            raise errors.bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({resource.kind})"
            )
        obj["apiVersion"] = resource.api_version
        obj["kind"] = resource.kind
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = obj["metadata"] = {}
        if not isinstance(metadata, dict):
            raise errors.bad_request("metadata must be an object")
        if resource.namespaced:
            given = metadata.get("namespace")
            if given and namespace and given != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request"
                )
            metadata["namespace"] = namespace or given or ""
        else:
            metadata.pop("namespace", None)
        return obj

    def _validate(self, resource: ResourceType, obj: Object) -> None:
        metadata = obj["metadata"]
        name = metadata.get("name", "")
        error = resource.name_error(name)
        if error:
            raise errors.invalid(
                resource.kind,
                resource.group,
                name,
                "metadata.name",
                "FieldValueInvalid",
                f'Invalid value: "{name}": {error}',
            )
        labels = metadata.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise errors.bad_request("metadata.labels must map strings to strings")
        for label_key, label_value in labels.items():
            problem = label_key_error(label_key) or label_value_error(label_value)
            if problem:
                raise errors.invalid(
                    resource.kind,
                    resource.group,
                    name,
                    "metadata.labels",
                    "FieldValueInvalid",
                    f"Invalid value: {problem}",
                )

    def _others(self, resource: ResourceType, key: Key | None) -> list[Object]:
        return [o for k, o in self._objects[resource.key].items() if k != key]

    # --- reads --------------------------------------------------------------

    def get(self, resource: ResourceType | str, name: str, namespace: str | None = None) -> Object:
        """The stored object (a copy); 404 :class:`ApiError` if absent."""
        resource = self.resolve(resource)
        with self._lock:
            return copy.deepcopy(self._get(resource, namespace, name))

    def list(
        self,
        resource: ResourceType | str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
        resource_version: str | None = None,
        resource_version_match: str | None = None,
    ) -> Object:
        """A ``<Kind>List`` as the API server returns it (objects are shared, not copied).

        Paginated lists are consistent snapshots: later pages are served at the
        first page's resourceVersion (410 Expired once that is compacted away).
        ``resourceVersionMatch=Exact`` lists at the given version likewise.
        """
        resource = self.resolve(resource)
        labels = LabelSelector.parse(label_selector)
        fields = FieldSelector.parse(field_selector, resource.field_labels)
        start: Key | None = None
        with self._lock:
            rv = self._rv
            if continue_token:
                rv, start = _decode_continue(continue_token)
                if rv < self._floor:
                    raise errors.expired(
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter, "
                        "or use the continue token in this response to retrieve the remainder "
                        "of the results. Continuing with the provided token results in an "
                        "inconsistent list - objects that were created, modified, or deleted "
                        "between the time the first chunk was returned and now may show up in "
                        "the list."
                    )
            elif resource_version_match == "Exact" and resource_version:
                rv = _parse_rv(resource_version)
                if rv < self._floor:
                    raise errors.expired(f"too old resource version: {rv} ({self._floor})")
            selective = not (labels.empty and not fields.requirements)
            items: list[Object] = []
            remaining = 0
            last: Key | None = None
            for k, obj in self._objects_at(resource, rv, namespace, start):
                metadata = obj["metadata"]
                if selective and not (
                    labels.matches(metadata.get("labels")) and fields.matches(obj)
                ):
                    continue
                if limit and len(items) >= limit:
                    # With a selector only whether more follow matters (no remainingItemCount);
                    # without one every object after the last item counts.
                    remaining = 1 if selective else self._count_at(resource, rv, namespace, last)
                    break
                items.append(obj)
                last = k
        if not resource.custom:
            # Built-in list items carry no kind/apiVersion, only the list does.
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        list_meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if remaining and last is not None:
            list_meta["continue"] = _encode_continue(rv, last)
            if labels.empty and not fields.requirements:
                list_meta["remainingItemCount"] = remaining
        return {
            "kind": resource.list_kind,
            "apiVersion": resource.api_version,
            "metadata": list_meta,
            "items": items,
        }

    # --- writes -------------------------------------------------------------

    def create(
        self, resource: ResourceType | str, body: Any, namespace: str | None = None
    ) -> Object:
        """Create an object (POST); 409 AlreadyExists, 422 Invalid, 404 for a missing namespace."""
        resource = self.resolve(resource)
        obj = self._incoming(resource, body, namespace)
        metadata = obj["metadata"]
        if not metadata.get("name") and metadata.get("generateName"):
            suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            metadata["name"] = f"{metadata['generateName']}{suffix}"
        if not metadata.get("name"):
            raise errors.invalid(
                resource.kind,
                resource.group,
                "",
                "metadata.name",
                "FieldValueRequired",
                "Required value: name or generateName is required",
            )
        if resource.namespaced and not metadata.get("namespace"):
            raise errors.bad_request("the namespace of the object must be set")
        self._validate(resource, obj)
        for name in (*_SYSTEM_METADATA, "resourceVersion"):
            metadata.pop(name, None)
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = now_rfc3339()
        if resource.generation:
            metadata["generation"] = 1
        if resource.has_status and resource.create_status != KEEP_STATUS:
            if resource.create_status is None:
                obj.pop("status", None)
            else:
                obj["status"] = copy.deepcopy(resource.create_status)
        with self._lock:
            namespaces = self._types.get("v1/namespaces")
            if (
                resource.namespaced
                and self.require_namespaces
                and namespaces is not None
                and ("", metadata["namespace"]) not in self._objects[namespaces.key]
            ):
                raise errors.not_found("namespaces", "", metadata["namespace"])
            key = (metadata.get("namespace", ""), metadata["name"])
            if key in self._objects[resource.key]:
                raise errors.already_exists(resource.plural, resource.group, metadata["name"])
            if resource.defaulter:
                resource.defaulter(obj, None, self._others(resource, key))
            return copy.deepcopy(self._commit(resource, "ADDED", obj, None))

    def load(self, resource: ResourceType | str, objects: Iterable[Object]) -> int:
        """Store complete objects as they are: the fast path for fixtures of large clusters.

        Each object gets ``kind`` and ``apiVersion``, a uid and a creationTimestamp (unless
        it has them) and a resourceVersion of its own, and is an ADDED event, as with
        :meth:`create`; but nothing is copied, validated or defaulted and its namespace need
        not exist. Objects may share nested parts (stored objects are never changed in
        place), but each needs a ``metadata`` dict of its own, and the caller must not change
        what it passed afterwards. 409 AlreadyExists as with :meth:`create`. Returns how many
        objects were stored.
        """
        resource = self.resolve(resource)
        count = 0
        with self._lock:
            stored = self._objects[resource.key]
            for obj in objects:
                obj["apiVersion"] = resource.api_version
                obj["kind"] = resource.kind
                metadata = obj["metadata"]
                if not resource.namespaced:
                    metadata.pop("namespace", None)
                key = (metadata.get("namespace", ""), metadata["name"])
                if key in stored:
                    raise errors.already_exists(resource.plural, resource.group, key[1])
                metadata.setdefault("uid", str(uuid.uuid4()))
                metadata.setdefault("creationTimestamp", now_rfc3339())
                self._commit(resource, "ADDED", obj, None)
                count += 1
        return count

    def _updated(
        self, resource: ResourceType, old: Object, incoming: Object, subresource: str | None
    ) -> Object:
        """The object a write of ``incoming`` over ``old`` stores (not yet committed)."""
        if subresource == "status":
            new = copy.deepcopy(old)
            if incoming.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = copy.deepcopy(incoming["status"])
            return new
        if subresource is not None:
            raise errors.no_such_path()
        new = copy.deepcopy(incoming)
        metadata = new["metadata"]
        old_metadata = old["metadata"]
        for name in (*_SYSTEM_METADATA, "name", "namespace"):
            if name in old_metadata:
                metadata[name] = old_metadata[name]
            else:
                metadata.pop(name, None)
        if resource.has_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        self._validate(resource, new)
        if resource.defaulter:
            key = (old_metadata.get("namespace", ""), old_metadata["name"])
            resource.defaulter(new, old, self._others(resource, key))
        if resource.generation:

            def spec_of(obj: Object) -> Object:
                return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

            if spec_of(new) != spec_of(old):
                metadata["generation"] = old_metadata.get("generation", 1) + 1
        return new

    def _write_update(self, resource: ResourceType, old: Object, new: Object) -> Object:
        """Commit an update unless it changes nothing; finish a pending deletion."""
        if _strip_rv(new) == _strip_rv(old):
            return copy.deepcopy(old)  # a no-op write: no new resourceVersion, no event
        new = self._commit(resource, "MODIFIED", new, old)
        metadata = new["metadata"]
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            self._commit(resource, "DELETED", copy.deepcopy(new), new)
        return copy.deepcopy(new)

    def update(
        self,
        resource: ResourceType | str,
        name: str,
        body: Any,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> Object:
        """Replace an object (PUT), or its status with ``subresource="status"``.

        409 Conflict when ``metadata.resourceVersion`` is set and stale.
        """
        resource = self.resolve(resource)
        obj = self._incoming(resource, body, namespace)
        given_name = obj["metadata"].get("name")
        if given_name != name:
            raise errors.bad_request(
                f"the name of the object ({given_name}) does not match the name on the URL ({name})"
            )
        with self._lock:
            old = self._get(resource, namespace, name)
            given_rv = obj["metadata"].get("resourceVersion")
            if given_rv:
                if given_rv != old["metadata"]["resourceVersion"]:
                    raise errors.conflict(resource.plural, resource.group, name)
            elif not resource.allow_unconditional_update:
                raise errors.invalid(
                    resource.kind,
                    resource.group,
                    name,
                    "metadata.resourceVersion",
                    "FieldValueInvalid",
                    "Invalid value: 0x0: must be specified for an update",
                )
            new = self._updated(resource, old, obj, subresource)
            return self._write_update(resource, old, new)

    def patch(
        self,
        resource: ResourceType | str,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        content_type: str = "application/merge-patch+json",
        subresource: str | None = None,
    ) -> Object:
        """Patch an object (merge, strategic-as-merge or JSON patch)."""
        resource = self.resolve(resource)
        with self._lock:
            old = self._get(resource, namespace, name)
            try:
                patched = apply_patch(content_type, old, patch)
            except PatchError as error:
                if error.malformed:
                    raise errors.bad_request(str(error)) from error
                raise errors.unprocessable(str(error)) from error
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise errors.unprocessable("the patched object is not a valid object")
            obj = self._incoming(resource, patched, namespace)
            if obj["metadata"].get("name") != name:
                raise errors.bad_request(
                    f"the name of the object ({obj['metadata'].get('name')}) does not match "
                    f"the name on the URL ({name})"
                )
            if obj["metadata"].get("resourceVersion") != old["metadata"]["resourceVersion"]:
                raise errors.conflict(resource.plural, resource.group, name)
            new = self._updated(resource, old, obj, subresource)
            return self._write_update(resource, old, new)

    def delete(
        self,
        resource: ResourceType | str,
        name: str,
        namespace: str | None = None,
        *,
        preconditions: Mapping[str, Any] | None = None,
    ) -> tuple[Object, bool]:
        """Delete an object; returns it and whether it is gone.

        An object with ``metadata.finalizers`` only gets a ``deletionTimestamp``
        (it goes once an update removes the last finalizer). Deleting a
        Namespace deletes everything in it at once (no Terminating phase).
        """
        resource = self.resolve(resource)
        with self._lock:
            old = self._get(resource, namespace, name)
            for field_name in ("uid", "resourceVersion"):
                wanted = (preconditions or {}).get(field_name)
                actual = old["metadata"].get(field_name)
                if wanted and wanted != actual:
                    raise errors.conflict(
                        resource.plural,
                        resource.group,
                        name,
                        f"Precondition failed: {field_name.upper() if field_name == 'uid' else 'ResourceVersion'} "
                        f"in precondition: {wanted}, {field_name} in object meta: {actual}",
                    )
            if resource.key == "v1/namespaces":
                for other in self._types.values():
                    if other.namespaced:
                        for key, obj in sorted(self._objects[other.key].items()):
                            if key[0] == name:
                                self._commit(other, "DELETED", copy.deepcopy(obj), obj)
            if old["metadata"].get("finalizers"):
                if old["metadata"].get("deletionTimestamp"):
                    return copy.deepcopy(old), False
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                return copy.deepcopy(self._commit(resource, "MODIFIED", new, old)), False
            gone = self._commit(resource, "DELETED", copy.deepcopy(old), old)
            return copy.deepcopy(gone), True

    def delete_collection(
        self,
        resource: ResourceType | str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Object:
        """Delete every matching object (DELETE on a collection); returns them as a list."""
        resource = self.resolve(resource)
        with self._lock:
            listed = self.list(
                resource, namespace, label_selector=label_selector, field_selector=field_selector
            )
            items = []
            for item in listed["items"]:
                metadata = item["metadata"]
                deleted, _ = self.delete(resource, metadata["name"], metadata.get("namespace"))
                items.append(deleted)
            listed["items"] = items
            listed["metadata"] = {"resourceVersion": str(self._rv)}
            return listed

    # --- watch ----------------------------------------------------------------

    def watch(
        self,
        resource: ResourceType | str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        send_initial_events: bool | None = None,
    ) -> Watch:
        """Open a watch; the caller must :meth:`Watch.close` it.

        Without a resourceVersion (or "0") the current matching objects are
        :attr:`Watch.initial` (sent as ADDED); with ``N`` every retained event
        after ``N`` is replayed, or :attr:`Watch.expired` is set when ``N`` is
        older than the history. ``send_initial_events`` forces the initial
        objects (watch-list).
        """
        resource = self.resolve(resource)
        labels = LabelSelector.parse(label_selector)
        fields = FieldSelector.parse(field_selector, resource.field_labels)
        info = WatchInfo(resource.key, namespace, label_selector or "", field_selector or "")
        with self._changed:
            initial: list[Object] = []
            expired = None
            if resource_version in (None, "", "0") or send_initial_events:
                pos = self._rv
                watch = Watch(self, resource, namespace, labels, fields, pos, [], None, info)
                state = self._objects[resource.key]
                initial = [state[k] for k in self._keys(resource) if watch.matches(state[k])]
                watch.initial = initial
            else:
                pos = _parse_rv(resource_version)
                if pos < self._floor:
                    expired = errors.expired(f"too old resource version: {pos} ({self._floor})")
                watch = Watch(self, resource, namespace, labels, fields, pos, [], expired, info)
            if expired is None:
                self._watches[id(watch)] = info
                self._changed.notify_all()
            return watch


def _window(keys: list[Key], namespace: str | None, start: Key | None) -> tuple[int, int]:
    """The slice of sorted ``keys`` in ``namespace`` (any: None) after ``start``."""
    low, high = 0, len(keys)
    if namespace is not None:
        low = bisect.bisect_left(keys, namespace, key=itemgetter(0))
        high = bisect.bisect_right(keys, namespace, lo=low, key=itemgetter(0))
    if start is not None:
        low = max(low, bisect.bisect_right(keys, start, lo=low, hi=high))
    return low, high


def _parse_rv(text: str | None) -> int:
    try:
        value = int(text or "")
    except ValueError:
        raise errors.bad_request(
            f'resourceVersion: Invalid value: "{text}": must be an integer'
        ) from None
    if value < 0:
        raise errors.bad_request(f'resourceVersion: Invalid value: "{text}": must be positive')
    return value


def _encode_continue(rv: int, last: Key) -> str:
    token = {"v": "meta.k8s.io/v1", "rv": rv, "start": f"{last[0]}/{last[1]}\x00"}
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode()


def _decode_continue(token: str) -> tuple[int, Key]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        start = data["start"].rstrip("\x00")
        namespace, _, name = start.partition("/")
        return int(data["rv"]), (namespace, name)
    except (binascii.Error, ValueError, KeyError, TypeError, AttributeError):
        raise errors.bad_request(f'continue key is not valid: "{token}"') from None
