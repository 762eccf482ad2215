"""What keeps the watcher small: slim list pages, raw API calls, parsed objects only.

- list pages are decoded into Structs of only the fields the parsers read; parsing that slim
  form must give exactly what parsing the whole object gives (objects and problems), also for
  malformed fields, and a page of another shape falls back to a whole decode;
- the API calls go through the ``ApiClient`` without the generated per-group API classes
  (which cost ~21 MiB); errors still arrive as ``ApiException``;
- the watcher's stores hold parsed Structs, never the raw dicts.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from kubernetes.client.rest import ApiException

from metaleg import lifecycle
from metaleg.config import Config
from metaleg.lifecycle import release_memory
from metaleg.watcher import cluster as parsed
from metaleg.watcher.feeds import Feeds
from metaleg.watcher.informer import Event, Informer, scoped_spec
from metaleg.watcher.kubeclient import KubeCalls
from metaleg.watcher.main import Watcher
from tests import cluster_objects as objects
from tests.kube import ClusterDriver
from tests.kubeapi import KubeApiServer
from tests.waiting import wait_until

Parser = Callable[[Any, list[parsed.Problem]], Any]


def _with_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """As a real API server sends it: metadata the watcher never reads."""
    obj = json.loads(json.dumps(obj))
    obj["metadata"].update(
        uid="0b4e6c1e-93c8-4a8e-9f5b-1f3d7ac1d2e4",
        resourceVersion="4711",
        creationTimestamp="2026-01-01T00:00:00Z",
        annotations={"kubectl.kubernetes.io/last-applied-configuration": "{" * 200},
        managedFields=[{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:x": {}}}],
    )
    return obj


CASES: list[tuple[type[msgspec.Struct], Parser, dict[str, Any]]] = [
    (parsed.WireService, parsed.parse_service, objects.service("mail", "relay", ["192.0.2.1"])),
    (
        parsed.WireService,
        parsed.parse_service,
        objects.service("mail", "v6", ["2001:db8::1", "192.0.2.2", "nonsense"], labelled="yes"),
    ),
    (
        parsed.WireService,
        parsed.parse_service,
        {
            "metadata": {"namespace": "a", "name": "odd", "labels": None},
            "spec": {"selector": "not-a-map"},
            "status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}, 7, {"ip": 3}]}},
        },
    ),
    (
        parsed.WireEndpointSlice,
        parsed.parse_endpoint_slice,
        objects.endpoint_slice(
            "mail", "relay-v4", "relay", "IPv4", [("10.0.0.1", "n1"), ("10.0.0.2", None)]
        ),
    ),
    (
        parsed.WireEndpointSlice,
        parsed.parse_endpoint_slice,
        {
            "metadata": {"namespace": "mail", "name": "bad", "labels": {}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["10.0.0.1", None, "fd00::1"], "nodeName": 5}],
        },
    ),
    (
        parsed.WireEndpointSlice,
        parsed.parse_endpoint_slice,
        objects.endpoint_slice("mail", "fqdn", "relay", "FQDN", [("mail.example", None)]),
    ),
    (
        parsed.WireNode,
        parsed.parse_node,
        objects.node("n1", "192.0.2.11", "2001:db8::11", ("10.244.1.0/24", "fd00:1::/64")),
    ),
    (
        parsed.WireNode,
        parsed.parse_node,
        {
            "metadata": {"name": "n2"},
            "spec": {"podCIDR": "10.244.2.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "x"}]},
        },
    ),
    (
        parsed.WirePod,
        parsed.parse_pod,
        objects.pod("mail", "p1", "n1", ("10.0.0.1", "fd00::1"), {"app": "relay"}),
    ),
    (
        parsed.WirePod,
        parsed.parse_pod,
        {
            "metadata": {"namespace": "mail", "name": "p2"},
            "spec": {"nodeName": "n1", "hostNetwork": True},
            "status": {"podIP": "10.0.0.9", "phase": "Succeeded"},
        },
    ),
    (
        parsed.WireL2Status,
        parsed.parse_l2_status,
        objects.l2_status("metallb-system", "l2-a", "mail", "relay", "n1"),
    ),
    (
        parsed.WireL2Status,
        parsed.parse_l2_status,
        objects.l2_status("metallb-system", "l2-b", "mail", "relay", None),
    ),
    (
        parsed.WireL2Status,
        parsed.parse_l2_status,
        {"metadata": {"namespace": "m", "name": "l2-c"}, "status": {"node": ""}},
    ),
]


def _parse(parse: Parser, obj: Any) -> tuple[Any, list[parsed.Problem]]:
    problems: list[parsed.Problem] = []
    try:
        return parse(obj, problems), problems
    except parsed.ObjectError as error:
        return f"ObjectError: {error}", problems


@pytest.mark.parametrize(("wire", "parse", "obj"), CASES)
def test_parsing_the_slim_page_gives_what_parsing_the_whole_object_gives(
    wire: type[msgspec.Struct], parse: Parser, obj: dict[str, Any]
) -> None:
    whole = _with_managed_fields(obj) if isinstance(obj.get("metadata"), dict) else obj
    page = json.dumps(
        {"metadata": {"resourceVersion": "9", "continue": "abc"}, "items": [whole]}
    ).encode()
    slim = parsed.slim_page(parsed.list_decoder(wire), page)
    assert slim["metadata"] == {"resourceVersion": "9", "continue": "abc"}
    [item] = slim["items"]
    assert "managedFields" not in item["metadata"] and "uid" not in item["metadata"]
    assert len(json.dumps(item)) < len(json.dumps(whole))
    assert _parse(parse, item) == _parse(parse, whole)


def test_an_object_without_metadata_is_still_rejected_after_slimming() -> None:
    page = json.dumps({"items": [{"spec": {}}]}).encode()
    [item] = parsed.slim_page(parsed.list_decoder(parsed.WireService), page)["items"]
    assert _parse(parsed.parse_service, item)[0].startswith("ObjectError")


def test_a_page_of_another_shape_is_decoded_whole() -> None:
    informer = Informer(
        scoped_spec(None, "endpointslices", ("labelSelector", "kubernetes.io/service-name")),
        queue.Queue(),
    )
    odd = {"metadata": {}, "items": [{"metadata": "not a map"}, "not an object"]}
    assert informer._decode_page(json.dumps(odd).encode()) == odd
    good = {"items": [objects.endpoint_slice("a", "b", "c", "IPv4", [("10.0.0.1", "n")])]}
    decoded = informer._decode_page(json.dumps(good).encode())
    assert "conditions" not in decoded["items"][0]["endpoints"][0]
    with pytest.raises(ValueError):
        informer._decode_page(b"[1, 2]")


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer() as server:
        yield server


def test_raw_calls_get_and_post_through_the_api_client(api: KubeApiServer) -> None:
    api_client = api.api_client()
    api.store.create("namespaces", {"metadata": {"name": "mail"}})
    api.store.create("services", objects.service("mail", "relay", ["192.0.2.1"]), "mail")
    api.store.create("services", objects.service("mail", "other", labelled=False), "mail")
    calls = KubeCalls(api_client)
    response = calls.get("/api/v1/services", [("labelSelector", f"{parsed.REWRITE_LABEL}=true")])
    try:
        body = json.loads(response.data)
    finally:
        response.release_conn()
    assert [item["metadata"]["name"] for item in body["items"]] == ["relay"]
    calls.post(
        "/api/v1/namespaces/mail/events",
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "relay.1", "namespace": "mail"},
            "involvedObject": {"kind": "Service", "namespace": "mail", "name": "relay"},
            "reason": "Test",
            "message": "test",
        },
    )
    assert api.store.list("events", "mail")["items"][0]["reason"] == "Test"
    with pytest.raises(ApiException) as raised:
        calls.get("/api/v1/namespaces/mail/services/missing")
    assert raised.value.status == 404


def test_the_watcher_does_not_import_the_generated_api_classes() -> None:
    code = (
        "import sys\n"
        "from kubernetes import client\n"
        "if 'kubernetes.client.api.core_v1_api' in sys.modules: print('eager'); sys.exit()\n"
        "import metaleg.watcher.main, metaleg.watcher.informer, metaleg.watcher.events\n"
        "from metaleg.watcher.informer import base_specs, scoped_spec\n"
        "from metaleg.watcher.events import EventPoster\n"
        "api = client.ApiClient()\n"
        "base_specs(api, 'metallb-system'); EventPoster(api, 'n1')\n"
        "scoped_spec(api, 'pods:app', ('labelSelector', 'app in (a)'))\n"
        "print(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.')))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    if output.strip() == "eager":
        pytest.skip("this kubernetes client (< 35) imports every API class with the package")
    assert output.strip() == "[]"


def test_the_stores_hold_parsed_objects_only(api: KubeApiServer) -> None:
    driver = ClusterDriver(api.api_client())
    driver.node("n1", "192.0.2.11")
    driver.service("mail", "relay", ["192.0.2.1"])
    driver.endpoints("mail", "relay", "IPv4", [("10.0.0.1", "n1")])
    driver.pod("mail", "p1", "n1", ("10.0.0.1",), {"app": "relay"})
    driver.gateway("mail", "relay", "n1")
    with tempfile.TemporaryDirectory() as run_dir:
        watcher = Watcher(Config(node_name="n1", run_dir=run_dir))
        events: queue.Queue[Event] = queue.Queue()
        feeds = Feeds(
            api.api_client(), events, watcher.tracker, watcher.scope_inputs, "metallb-system"
        )
        feeds.start()
        try:

            def synced() -> bool:
                if (
                    feeds.synced(time.monotonic())
                    and not feeds.pending
                    and feeds.active.keys() >= {"pods:app", "nodes:n1"}
                ):
                    return True
                with contextlib.suppress(queue.Empty):
                    feeds.handle(events.get(timeout=0.2))
                feeds.follow_scopes()
                return False

            wait_until(
                synced,
                timeout=10,
                interval=0,
                message=lambda: f"the feeds synced; active: {sorted(feeds.active)}",
            )
            assert feeds.relisted
            for name, store in feeds.stores.items():
                assert store, name
                assert all(isinstance(v, msgspec.Struct) for v in store.values()), name
            for store in msgspec.structs.asdict(watcher.tracker.cluster).values():
                assert store and all(isinstance(v, msgspec.Struct) for v in store.values())
        finally:
            feeds.stop()


def test_release_memory_does_not_fail() -> None:
    assert release_memory() in (True, False)


def test_heap_trimmer_releases_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    calls: list[float] = []
    monkeypatch.setattr(lifecycle.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(lifecycle, "release_memory", lambda: calls.append(clock[0]) or True)
    trimmer = lifecycle.HeapTrimmer(interval=10.0)
    for step in range(25):  # work every second for 25 s
        clock[0] = 100.0 + step
        trimmer.after_work()
    assert calls == [110.0, 120.0]
    clock[0] = 121.0
    trimmer.after_work(force=True)  # after a re-sync: at once, and the interval restarts
    clock[0] = 130.0
    trimmer.after_work()
    assert calls == [110.0, 120.0, 121.0]


def test_source_ips_sort_numerically_without_a_cache() -> None:
    import ipaddress
    import random

    from metaleg.watcher.desired import ip_sort_key

    rng = random.Random(7)
    ips = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(300)]
    ips += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(300)]
    ips += ["10.244.1.9", "10.244.1.10", "::ffff:10.0.0.1", "fd00::9", "fd00::10", "::"]
    expected = sorted(
        ips, key=lambda ip: (ipaddress.ip_address(ip).version, ipaddress.ip_address(ip))
    )
    assert sorted(ips, key=ip_sort_key) == expected
    assert not hasattr(ip_sort_key, "cache_info")
