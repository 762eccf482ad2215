"""The Kubernetes API emulator, exercised with the real ``kubernetes`` client and kubectl."""

from __future__ import annotations

import copy
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from tests.kubeapi import EmulatorControl, KubeApiServer, wait_for_port_file, write_kubeconfig
from tests.kubeapi.store import Store
from tests.netns import namespace, run_in_netns
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "metallb.io", "v1beta1", "servicel2statuses"
_END = object()


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(bookmark_interval=0.3) as server:
        yield server


@pytest.fixture
def core(api: KubeApiServer) -> client.CoreV1Api:
    return client.CoreV1Api(api.api_client())


@pytest.fixture
def custom(api: KubeApiServer) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api.api_client())


def service(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"ports": [{"port": 80}], **spec},
    }


def l2status(name: str, node: str = "node-a") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ServiceL2Status",
        "metadata": {"name": name, "labels": {"metallb.io/node": node}},
        "status": {"node": node, "serviceName": "web", "serviceNamespace": "default"},
    }


class Collector:
    """Runs ``watch.Watch().stream(...)`` in a thread; events (or the error) go to a queue."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self.watch = watch.Watch()

        def run() -> None:
            try:
                for event in self.watch.stream(func, *args, **kwargs):
                    self.queue.put(event)
            except Exception as error:
                self.queue.put(error)
            self.queue.put(_END)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def next(self, timeout: float = 5.0) -> Any:
        return self.queue.get(timeout=timeout)

    def take(self, count: int, timeout: float = 5.0) -> list[tuple[str, str, str]]:
        """(type, name, resourceVersion) of the next ``count`` non-bookmark events."""
        events = []
        while len(events) < count:
            item = self.next(timeout)
            assert isinstance(item, dict), f"expected an event, got {item!r}"
            if item["type"] != "BOOKMARK":
                metadata = item["raw_object"]["metadata"]
                events.append((item["type"], metadata["name"], metadata["resourceVersion"]))
        return events

    def finish(self, timeout: float = 5.0) -> list[Any]:
        """Everything up to the end of the stream."""
        items = []
        while (item := self.next(timeout)) is not _END:
            items.append(item)
        return items


def raw_watch(url: str, timeout: float = 10.0) -> tuple[int, list[Any]]:
    """GET a watch URL with urllib; the status and the decoded lines (until the stream ends)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, [json.loads(line) for line in response.read().splitlines()]


# --- CRUD ---------------------------------------------------------------------


def test_service_crud_status_and_errors(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_service("default", service("web", {"app": "web"}))
    assert created.kind is None or created.kind == "Service"
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.namespace == "default"
    assert created.spec.cluster_ip.startswith("10.96.")
    assert created.spec.ports[0].target_port == 80
    rv = int(created.metadata.resource_version)

    with pytest.raises(ApiException) as info:
        core.create_namespaced_service("default", service("web"))
    assert info.value.status == 409
    assert json.loads(info.value.body)["reason"] == "AlreadyExists"

    with pytest.raises(ApiException) as info:
        core.create_namespaced_service("default", {"spec": {"ports": [{"port": 1}]}})
    assert info.value.status == 422
    assert json.loads(info.value.body)["reason"] == "Invalid"

    with pytest.raises(ApiException) as info:
        core.create_namespaced_service("nowhere", service("web"))
    assert info.value.status == 404  # the namespace does not exist

    got = core.read_namespaced_service("web", "default")
    assert got.metadata.resource_version == str(rv)

    # A main-resource write keeps .status; a status write changes only .status.
    ingress = {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}}
    with_status = core.patch_namespaced_service_status("web", "default", ingress)
    assert with_status.status.load_balancer.ingress[0].ip == "192.0.2.10"
    assert int(with_status.metadata.resource_version) == rv + 1
    ignored = core.patch_namespaced_service_status(
        "web", "default", {"metadata": {"labels": {"app": "x"}}, "status": None}
    )
    assert ignored.metadata.labels == {"app": "web"}
    core.patch_namespaced_service_status("web", "default", ingress)
    relabeled = core.patch_namespaced_service(
        "web", "default", {"metadata": {"labels": {"tier": "front"}}, "status": {}}
    )
    assert relabeled.metadata.labels == {"app": "web", "tier": "front"}
    assert relabeled.status.load_balancer.ingress[0].ip == "192.0.2.10"

    # A write that changes nothing gets no new resourceVersion.
    again = core.patch_namespaced_service(
        "web", "default", {"metadata": {"labels": {"tier": "front"}}}
    )
    assert again.metadata.resource_version == relabeled.metadata.resource_version

    # JSON patch (RFC 6902), and a failing test operation.
    patched = core.patch_namespaced_service(
        "web", "default", [{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}]
    )
    assert patched.metadata.annotations == {"a": "b"}
    with pytest.raises(ApiException) as info:
        core.patch_namespaced_service(
            "web", "default", [{"op": "test", "path": "/metadata/name", "value": "other"}]
        )
    assert info.value.status == 422

    # Replace: stale resourceVersion -> 409 Conflict; current one works.
    body = core.read_namespaced_service("web", "default")
    body.metadata.labels["tier"] = "back"
    stale = client.V1Service(
        metadata=client.V1ObjectMeta(name="web", resource_version=str(rv)), spec=body.spec
    )
    with pytest.raises(ApiException) as info:
        core.replace_namespaced_service("web", "default", stale)
    assert info.value.status == 409
    assert json.loads(info.value.body)["reason"] == "Conflict"
    replaced = core.replace_namespaced_service("web", "default", body)
    assert replaced.metadata.labels["tier"] == "back"
    assert replaced.spec.cluster_ip == created.spec.cluster_ip
    assert replaced.status.load_balancer.ingress[0].ip == "192.0.2.10"

    core.delete_namespaced_service("web", "default")
    with pytest.raises(ApiException) as info:
        core.read_namespaced_service("web", "default")
    assert info.value.status == 404
    assert json.loads(info.value.body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'services "web" not found',
        "reason": "NotFound",
        "details": {"name": "web", "kind": "services"},
        "code": 404,
    }


def test_servicel2status_custom_objects(
    api: KubeApiServer, custom: client.CustomObjectsApi
) -> None:
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, l2status("a")
    )
    assert created["kind"] == "ServiceL2Status" and created["metadata"]["generation"] == 1
    assert "status" not in created  # dropped on create: status is a subresource
    custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, l2status("b", "node-b")
    )

    status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "a", {"status": {"node": "node-a"}}
    )
    assert status["status"] == {"node": "node-a"}
    assert status["metadata"]["generation"] == 1  # status writes do not bump generation

    listed = custom.list_cluster_custom_object(
        GROUP, VERSION, PLURAL, label_selector="metallb.io/node=node-b"
    )
    assert [i["metadata"]["name"] for i in listed["items"]] == ["b"]
    assert listed["items"][0]["kind"] == "ServiceL2Status"  # custom list items keep their kind
    assert listed["metadata"]["resourceVersion"] == str(api.store.resource_version)
    namespaced = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert len(namespaced["items"]) == 2

    got = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    got["metadata"].pop("resourceVersion")
    with pytest.raises(ApiException) as info:  # custom resources need resourceVersion on update
        custom.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", got)
    assert info.value.status == 422

    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    with pytest.raises(ApiException) as info:
        custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    assert info.value.status == 404
    assert json.loads(info.value.body)["message"] == 'servicel2statuses.metallb.io "a" not found'


def test_finalizers_delay_deletion(core: client.CoreV1Api) -> None:
    core.create_namespaced_service("default", service("held"))
    core.patch_namespaced_service("held", "default", {"metadata": {"finalizers": ["x/y"]}})
    pending = core.delete_namespaced_service("held", "default")
    assert pending.metadata.deletion_timestamp is not None
    core.read_namespaced_service("held", "default")  # still there
    core.patch_namespaced_service("held", "default", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as info:
        core.read_namespaced_service("held", "default")
    assert info.value.status == 404


# --- selectors and pagination -----------------------------------------------------


def test_label_and_field_selectors(core: client.CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "other"}})
    core.create_namespaced_service("default", service("a", {"app": "x", "tier": "front"}))
    core.create_namespaced_service("default", service("b", {"app": "y"}))
    core.create_namespaced_service("other", service("c", {"app": "x", "egress": "true"}))

    def names(**kwargs: Any) -> list[str]:
        items = core.list_service_for_all_namespaces(**kwargs).items
        return sorted(i.metadata.name for i in items)

    assert names(label_selector="app=x") == ["a", "c"]
    assert names(label_selector="app==y") == ["b"]
    assert names(label_selector="app!=x") == ["b", "kubernetes"]  # also matches "no app label"
    assert names(label_selector="app in (x, y),tier") == ["a"]
    assert names(label_selector="app notin (x)") == ["b", "kubernetes"]
    assert names(label_selector="!tier,app") == ["b", "c"]
    assert names(label_selector="egress") == ["c"]
    assert names(field_selector="metadata.namespace=other") == ["c"]
    assert names(field_selector="metadata.name=a") == ["a"]
    assert names(field_selector="metadata.name!=a", label_selector="app") == ["b", "c"]
    assert [s.metadata.name for s in core.list_namespaced_service("other").items] == ["c"]

    for bad in ("app in x", "app=(", "=x", "app in ()"):
        with pytest.raises(ApiException) as info:
            core.list_service_for_all_namespaces(label_selector=bad)
        assert info.value.status == 400, bad
        assert json.loads(info.value.body)["reason"] == "BadRequest"
    with pytest.raises(ApiException) as info:
        core.list_service_for_all_namespaces(field_selector="spec.type=LoadBalancer")
    assert info.value.status == 400


def test_pagination_is_a_consistent_snapshot(api: KubeApiServer, core: client.CoreV1Api) -> None:
    for i in range(7):
        core.create_namespaced_service("default", service(f"s{i}"))
    first = core.list_namespaced_service("default", limit=3)
    assert [s.metadata.name for s in first.items] == ["kubernetes", "s0", "s1"]
    assert first.metadata.remaining_item_count == 5
    core.create_namespaced_service("default", service("s10"))  # after the snapshot
    core.delete_namespaced_service("s5", "default")
    names = [s.metadata.name for s in first.items]
    token = first.metadata._continue
    while token:
        page = core.list_namespaced_service("default", limit=3, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        names += [s.metadata.name for s in page.items]
        token = page.metadata._continue
    assert names == ["kubernetes"] + [f"s{i}" for i in range(7)]

    second = core.list_namespaced_service("default", limit=2)
    core.create_namespaced_service("default", service("late"))
    api.compact()
    with pytest.raises(ApiException) as info:
        core.list_namespaced_service("default", limit=2, _continue=second.metadata._continue)
    assert info.value.status == 410
    assert json.loads(info.value.body)["reason"] == "Expired"


def _reference_list(
    snapshot: dict[tuple[str, str], dict[str, Any]], namespace: str | None, app: str | None
) -> list[str]:
    """What a list at a snapshot must hold: matching names in key order."""
    return [
        f"{ns}/{name}"
        for (ns, name), obj in sorted(snapshot.items())
        if (namespace is None or ns == namespace)
        and (app is None or obj["metadata"]["labels"].get("app") == app)
    ]


def test_paged_lists_match_a_reference_under_concurrent_writes() -> None:
    """Store-level: paged lists (namespace, label selector, limit) while objects are created,
    relabelled and deleted between pages are exactly the objects of the first page's
    snapshot, in key order, and remainingItemCount counts the rest (checks the sorted-key
    and history-overlay fast paths of Store.list)."""
    rng = random.Random(13)
    store = Store(history_size=100000)
    for ns in ("a", "b", "c"):
        store.create("namespaces", {"metadata": {"name": ns}})
    store.load(
        "pods",
        (
            {"metadata": {"namespace": ns, "name": f"p{i:03d}", "labels": {"app": f"x{i % 3}"}}}
            for ns in ("a", "b")
            for i in range(40)
        ),
    )
    names = [f"p{i:03d}" for i in range(80)]

    def snapshot() -> dict[tuple[str, str], dict[str, Any]]:
        return {k: copy.deepcopy(v) for k, v in store._objects["v1/pods"].items()}

    def write() -> None:
        ns, name = rng.choice("abc"), rng.choice(names)
        try:
            if rng.random() < 0.4:
                labels = {"app": f"x{rng.randrange(3)}"}
                store.create("pods", {"metadata": {"name": name, "labels": labels}}, ns)
            elif rng.random() < 0.5:
                labels = {"labels": {"app": f"x{rng.randrange(3)}"}}
                store.patch("pods", name, {"metadata": labels}, ns)
            else:
                store.delete("pods", name, ns)
        except Exception as error:  # 404 / 409: nothing written
            assert getattr(error, "code", None) in (404, 409), error

    for _ in range(150):
        namespace = rng.choice([None, "a", "b", "c"])
        app = rng.choice([None, "x0", "x1"])
        limit = rng.choice([1, 2, 7, 30])
        expected = _reference_list(snapshot(), namespace, app)
        selector = f"app={app}" if app else None
        page = store.list("pods", namespace, label_selector=selector, limit=limit)
        rv = page["metadata"]["resourceVersion"]
        listed: list[str] = []
        while True:
            listed += [
                f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in page["items"]
            ]
            assert page["metadata"]["resourceVersion"] == rv
            token = page["metadata"].get("continue")
            if app is None:
                assert page["metadata"].get("remainingItemCount") == (
                    len(expected) - len(listed) or None
                )
            if not token:
                break
            for _ in range(rng.randrange(4)):
                write()
            page = store.list(
                "pods", namespace, label_selector=selector, limit=limit, continue_token=token
            )
        assert listed == expected
        exact = store.list(
            "pods",
            namespace,
            label_selector=selector,
            resource_version=rv,
            resource_version_match="Exact",
        )
        assert [
            f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in exact["items"]
        ] == expected
        write()


# --- watch ------------------------------------------------------------------


def test_watch_initial_events_then_live_namespaced_and_cluster_wide(
    api: KubeApiServer, core: client.CoreV1Api
) -> None:
    core.create_namespace({"metadata": {"name": "other"}})
    core.create_namespaced_service("default", service("a"))
    namespaced = Collector(core.list_namespaced_service, "default", timeout_seconds=20)
    everywhere = Collector(core.list_service_for_all_namespaces, timeout_seconds=20)
    assert sorted(e[1] for e in namespaced.take(2)) == ["a", "kubernetes"]
    assert sorted(e[1] for e in everywhere.take(2)) == ["a", "kubernetes"]
    api.wait_for_watches(2, "services", timeout=5)

    core.create_namespaced_service("other", service("b"))
    core.delete_namespaced_service("a", "default")
    assert [e[:2] for e in everywhere.take(2)] == [("ADDED", "b"), ("DELETED", "a")]
    deleted = namespaced.take(1)
    assert deleted[0][:2] == ("DELETED", "a")
    assert deleted[0][2] == str(api.store.resource_version)  # the deletion's resourceVersion


def test_watch_label_selector_transitions(api: KubeApiServer, core: client.CoreV1Api) -> None:
    core.create_namespaced_service("default", service("a", {"egress": "on"}))
    core.create_namespaced_service("default", service("b"))
    selected = Collector(
        core.list_namespaced_service, "default", label_selector="egress=on", timeout_seconds=20
    )
    assert selected.take(1)[0][:2] == ("ADDED", "a")
    base = int(core.list_namespaced_service("default").metadata.resource_version)

    core.patch_namespaced_service("a", "default", {"metadata": {"labels": {"egress": "off"}}})
    core.patch_namespaced_service("b", "default", {"metadata": {"labels": {"egress": "on"}}})
    core.patch_namespaced_service("b", "default", {"metadata": {"annotations": {"x": "1"}}})
    core.patch_namespaced_service(
        "a", "default", {"metadata": {"annotations": {"x": "1"}}}
    )  # unseen
    events = selected.take(3)
    assert [e[:2] for e in events] == [("DELETED", "a"), ("ADDED", "b"), ("MODIFIED", "b")]
    assert selected.queue.empty()

    raw = core.list_namespaced_service(
        "default",
        label_selector="egress=on",
        watch=True,
        resource_version=str(base),
        timeout_seconds=1,
        _preload_content=False,
    )
    lines = [json.loads(line) for line in iter_resp_lines(raw)]
    gone = lines[0]
    assert gone["type"] == "DELETED"
    # The DELETED-on-unmatch carries the object as it was before, at the new resourceVersion.
    assert gone["object"]["metadata"]["labels"] == {"egress": "on"}
    assert gone["object"]["metadata"]["resourceVersion"] == str(base + 1)
    assert gone["object"]["kind"] == "Service"


def test_watch_from_resource_version_replays_exactly_the_missed_events(
    api: KubeApiServer, core: client.CoreV1Api
) -> None:
    core.create_namespaced_service("default", service("a"))
    listed = core.list_namespaced_service("default")
    since = int(listed.metadata.resource_version)
    core.create_namespaced_service("default", service("b"))
    core.patch_namespaced_service("a", "default", {"metadata": {"labels": {"x": "1"}}})
    core.create_namespace({"metadata": {"name": "unrelated"}})  # another resource: not replayed
    core.delete_namespaced_service("b", "default")

    collector = Collector(
        core.list_namespaced_service, "default", resource_version=str(since), timeout_seconds=1
    )
    events = [
        (
            e["type"],
            e["raw_object"]["metadata"]["name"],
            int(e["raw_object"]["metadata"]["resourceVersion"]),
        )
        for e in collector.finish()
    ]
    assert events == [
        ("ADDED", "b", since + 1),
        ("MODIFIED", "a", since + 2),
        ("DELETED", "b", since + 4),
    ]


def test_watch_too_old_resource_version_gets_410(
    api: KubeApiServer, core: client.CoreV1Api
) -> None:
    old = core.list_namespaced_service("default").metadata.resource_version
    core.create_namespaced_service("default", service("a"))
    api.compact()

    status, lines = raw_watch(
        f"{api.url}/api/v1/namespaces/default/services?watch=true&resourceVersion={old}"
    )
    assert status == 200
    newest = api.store.resource_version
    assert lines == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {old} ({newest})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    collector = Collector(
        core.list_namespaced_service, "default", resource_version=old, timeout_seconds=5
    )
    error = collector.next()
    assert isinstance(error, ApiException) and error.status == 410

    # A bounded history expires old versions by itself.
    with KubeApiServer(history_size=2) as small:
        small_core = client.CoreV1Api(small.api_client())
        start = small_core.list_namespaced_service("default").metadata.resource_version
        for name in ("x", "y", "z"):
            small_core.create_namespaced_service("default", service(name))
        _, lines = raw_watch(f"{small.url}/api/v1/services?watch=1&resourceVersion={start}")
        assert lines[0]["object"]["code"] == 410


def test_bookmarks(api: KubeApiServer, core: client.CoreV1Api) -> None:
    rv = core.list_namespaced_service("default").metadata.resource_version
    collector = Collector(
        core.list_namespaced_service,
        "default",
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=20,
    )
    api.wait_for_watches(1, "services", timeout=5)
    core.create_namespace({"metadata": {"name": "elsewhere"}})  # bumps the global resourceVersion
    bookmark = collector.next(timeout=5)
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["raw_object"] == {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": str(api.store.resource_version), "creationTimestamp": None},
    }
    assert collector.watch.resource_version == str(api.store.resource_version)


def test_drop_watches_ends_streams_cleanly(api: KubeApiServer, core: client.CoreV1Api) -> None:
    collector = Collector(core.list_namespaced_service, "default", timeout_seconds=20)
    collector.take(1)
    api.wait_for_watches(1, timeout=5)
    api.drop_watches()
    assert collector.finish() == []  # the stream ended without an error
    # The server forgets the watch when its handler returns, which may be just after
    # the client saw the stream end.
    wait_until(
        lambda: api.state()["watches"],
        timeout=5,
        interval=0.02,
        message="the server to forget the dropped watch",
        accept=lambda watches: watches == [],
    )

    # A graceful stop ends the streams the same way before closing connections.
    collector = Collector(core.list_namespaced_service, "default", timeout_seconds=20)
    collector.take(1)
    api.wait_for_watches(1, timeout=5)
    api.stop(abort=False)
    assert collector.finish() == []
    api.start()


def test_restart_cuts_watches_and_the_client_relists(
    api: KubeApiServer, core: client.CoreV1Api
) -> None:
    port = api.port
    listed = core.list_namespaced_service("default")
    response = core.list_namespaced_service(
        "default",
        watch=True,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=30,
        _preload_content=False,
    )
    lines: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for line in iter_resp_lines(response):
                lines.put(line)
            lines.put(_END)
        except Exception as error:
            lines.put(error)

    threading.Thread(target=read, daemon=True).start()
    api.wait_for_watches(1, "services", timeout=5)
    api.stop()
    cut = lines.get(timeout=5)
    assert isinstance(cut, Exception), f"the watch was not cut: {cut!r}"
    with pytest.raises(Exception):  # noqa: B017 - any connection error
        core.list_namespaced_service("default", _request_timeout=2)

    api.start()
    assert api.port == port
    relisted = core.list_namespaced_service("default")
    assert int(relisted.metadata.resource_version) >= int(listed.metadata.resource_version)
    assert [s.metadata.name for s in relisted.items] == ["kubernetes"]  # the store survived
    core.create_namespaced_service("default", service("after"))
    collector = Collector(
        core.list_namespaced_service,
        "default",
        resource_version=relisted.metadata.resource_version,
        timeout_seconds=1,
    )
    assert [e["type"] for e in collector.finish()] == ["ADDED"]


def test_unavailable_group_is_404_and_absent_from_discovery(
    api: KubeApiServer, custom: client.CustomObjectsApi
) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, l2status("a"))
    apis = client.ApisApi(api.api_client())
    assert GROUP in [g.name for g in apis.get_api_versions().groups]
    collector = Collector(
        custom.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL, timeout_seconds=20
    )
    collector.take(1)

    api.set_group_available(GROUP, False)
    assert collector.finish() == []  # its watches end
    assert GROUP not in [g.name for g in apis.get_api_versions().groups]
    for call in (
        lambda: custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL),
        lambda: custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a"),
        lambda: custom.get_api_resources(GROUP, VERSION),
    ):
        with pytest.raises(ApiException) as info:
            call()
        assert info.value.status == 404
        assert json.loads(info.value.body)["reason"] == "NotFound"

    api.set_group_available(GROUP, True)
    assert (
        len(custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]) == 1
    )


def test_discovery_and_version(api: KubeApiServer) -> None:
    with urllib.request.urlopen(f"{api.url}/api/v1", timeout=5) as response:
        resources = json.loads(response.read())
    assert resources["kind"] == "APIResourceList"
    names = {r["name"] for r in resources["resources"]}
    assert {"services", "services/status", "nodes", "nodes/status", "pods", "events"} <= names
    version = client.VersionApi(api.api_client()).get_code()
    assert version.major == "1"


def test_latency_delays_api_requests_only(api: KubeApiServer, core: client.CoreV1Api) -> None:
    api.set_latency(1.5)
    started = time.monotonic()
    core.list_namespaced_service("default")
    assert time.monotonic() - started >= 1.5
    started = time.monotonic()
    assert EmulatorControl(api.url).state()["latency"] == 1.5  # control is not delayed
    assert time.monotonic() - started < 1.5
    api.set_latency(0)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_get_services(api: KubeApiServer, core: client.CoreV1Api, tmp_path: Path) -> None:
    core.create_namespaced_service("default", service("web", type="LoadBalancer"))
    kubeconfig = write_kubeconfig(str(tmp_path / "kubeconfig"), api.url)
    result = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            kubeconfig,
            "--cache-dir",
            str(tmp_path / "cache"),
            "get",
            "svc",
            "-A",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAMESPACE", "NAME", "TYPE"]
    assert any(line.split()[:3] == ["default", "web", "LoadBalancer"] for line in lines)
    result = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            kubeconfig,
            "--cache-dir",
            str(tmp_path / "cache"),
            "get",
            "servicel2statuses",
            "-A",
            "-o",
            "name",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# --- process mode -------------------------------------------------------------


def _start_process(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    port_file = tmp_path / "ports.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.kubeapi",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--bookmark-interval",
            "0.5",
            *extra,
        ],
        cwd=ROOT,
    )
    try:
        return process, wait_for_port_file(str(port_file), timeout=15)
    except BaseException:
        process.kill()
        process.wait(5)
        raise


def _terminate(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_process_mode_and_http_control(tmp_path: Path) -> None:
    process, ports = _start_process(tmp_path, "--disable-group", GROUP)
    try:
        url = ports["listen"]["url"]
        assert ports["pid"] == process.pid
        control = EmulatorControl(url)
        core = client.CoreV1Api(client.ApiClient(client.Configuration(host=url)))
        custom = client.CustomObjectsApi(client.ApiClient(client.Configuration(host=url)))

        with pytest.raises(ApiException) as info:
            custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        assert info.value.status == 404
        control.set_group_available(GROUP, True)
        assert custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"] == []

        old = core.list_namespaced_service("default").metadata.resource_version
        core.create_namespaced_service("default", service("web"))
        control.compact()
        _, lines = raw_watch(f"{url}/api/v1/services?watch=true&resourceVersion={old}")
        assert lines[0]["object"]["code"] == 410

        collector = Collector(core.list_namespaced_service, "default", timeout_seconds=20)
        collector.take(2)
        control.wait_for_watches(1, "services", timeout=5)
        control.drop_watches()
        assert collector.finish() == []

        control.restart(downtime=0.2)
        assert control.state()["restarts"] == 1
        names = [s.metadata.name for s in core.list_namespaced_service("default").items]
        assert names == ["kubernetes", "web"]
    finally:
        assert _terminate(process) == 0


def _get_namespaces(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/api/v1/namespaces", timeout=5) as response:
        return [item["metadata"]["name"] for item in json.loads(response.read())["items"]]


@pytest.mark.netns
def test_process_mode_listener_inside_a_network_namespace(tmp_path: Path) -> None:
    with namespace("mlka") as netns:
        process, ports = _start_process(tmp_path, "--netns", netns, "--netns-listen", "127.0.0.1:0")
        try:
            inside_url = ports["netns"]["url"]
            assert ports["netns"]["netns"] == netns
            core = client.CoreV1Api(
                client.ApiClient(client.Configuration(host=ports["listen"]["url"]))
            )
            core.create_namespace({"metadata": {"name": "from-root"}})
            # The same store answers inside the namespace ...
            assert "from-root" in run_in_netns(netns, _get_namespaces, inside_url)
            # ... and that socket is not in the root namespace.
            if ports["netns"]["port"] != ports["listen"]["port"]:
                with pytest.raises(urllib.error.URLError):
                    _get_namespaces(inside_url)
        finally:
            assert _terminate(process) == 0


def test_kubeconfig_loads_with_the_kubernetes_config_loader(
    api: KubeApiServer, tmp_path: Path
) -> None:
    from kubernetes import config

    path = write_kubeconfig(str(tmp_path / "kubeconfig"), api.url)
    configuration = client.Configuration()
    config.load_kube_config(config_file=path, client_configuration=configuration)
    assert configuration.host == api.url
    names = client.CoreV1Api(client.ApiClient(configuration)).list_namespace().items
    assert "default" in [n.metadata.name for n in names]
    assert os.path.exists(path)
