"""What the watcher watches: scopes derived from the labelled Services and their statuses."""

from __future__ import annotations

from metaleg.watcher.cluster import L2StatusInfo, ServiceInfo
from metaleg.watcher.scopes import SELECTOR_LIMIT, ScopeInputs, valid_label_pair


def service(name: str, selector: dict[str, str], labelled: bool = True) -> ServiceInfo:
    return ServiceInfo("mail", name, labelled, "192.0.2.1", None, tuple(sorted(selector.items())))


def status(name: str, service_name: str, node: str | None) -> L2StatusInfo:
    return L2StatusInfo("metallb-system", name, "mail", service_name, node)


def test_no_labelled_service_watches_only_this_node() -> None:
    inputs = ScopeInputs("node-a", "metallb-system")
    assert inputs.scopes().watches == {"nodes:node-a": ("fieldSelector", "metadata.name=node-a")}


def test_scopes_follow_services_selectors_and_gateways() -> None:
    inputs = ScopeInputs("node-a", "metallb-system")
    inputs.scopes()
    relay = service("relay", {"app": "relay"})
    web = service("web", {"app": "web", "tier": "front"})
    inputs.service(None, relay)
    inputs.service(None, web)
    inputs.service(None, service("other", {"app": "x"}, labelled=False))
    inputs.status("mail/l2-relay", None, status("l2-relay", "relay", "node-b"))
    inputs.status("mail/l2-x", None, status("l2-x", "other", "node-c"))  # not labelled
    assert inputs.changed
    watches = inputs.scopes().watches
    assert watches == {
        "endpointslices": ("labelSelector", "kubernetes.io/service-name in (relay,web)"),
        "pods:app": ("labelSelector", "app in (relay)"),
        "pods:app,tier": ("labelSelector", "app in (web),tier in (front)"),
        "nodes:node-a": ("fieldSelector", "metadata.name=node-a"),
        "nodes:node-b": ("fieldSelector", "metadata.name=node-b"),
    }
    # A change that leaves every name, key and value in place costs no recomputation...
    inputs.service(relay, service("relay", {"app": "relay"}))
    inputs.status(
        "mail/l2-relay",
        status("l2-relay", "relay", "node-b"),
        status("l2-relay", "relay", "node-b"),
    )
    assert not inputs.changed
    # ...and one that comes back to the same scopes leaves them equal.
    inputs.status("mail/l2-relay", status("l2-relay", "relay", "node-b"), None)
    inputs.status("mail/l2-relay", None, status("l2-relay", "relay", "node-b"))
    assert inputs.scopes().watches == watches
    # The gateway moves; the label goes.
    inputs.status(
        "mail/l2-relay",
        status("l2-relay", "relay", "node-b"),
        status("l2-relay", "relay", "node-c"),
    )
    assert inputs.changed
    assert "nodes:node-c" in inputs.scopes().watches
    inputs.service(relay, service("relay", {"app": "relay"}, labelled=False))
    watches = inputs.scopes().watches
    assert "pods:app" not in watches and "nodes:node-c" not in watches
    assert watches["endpointslices"] == ("labelSelector", "kubernetes.io/service-name in (web)")
    # Labelled again: its status is remembered.
    inputs.service(None, relay)
    assert "nodes:node-c" in inputs.scopes().watches


def test_a_selector_the_api_server_would_refuse_is_not_watched() -> None:
    assert valid_label_pair("app.kubernetes.io/name", "mail-relay_1.0")
    assert not valid_label_pair("app", "a,b")
    assert not valid_label_pair("app", "x)")
    assert not valid_label_pair("bad key", "x")
    inputs = ScopeInputs("node-a", "metallb-system")
    inputs.service(None, service("relay", {"app": "a,b"}))
    assert not any(name.startswith("pods:") for name in inputs.scopes().watches)


def test_too_many_names_fall_back_to_every_endpoint_slice() -> None:
    inputs = ScopeInputs("node-a", "metallb-system")
    for index in range(SELECTOR_LIMIT // 30):
        inputs.service(None, service(f"service-with-a-rather-long-name-{index:06d}", {}))
    assert inputs.scopes().watches["endpointslices"] == (
        "labelSelector",
        "kubernetes.io/service-name",
    )
