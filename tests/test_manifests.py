"""The deployment manifests in ``k8s/``: rendered by kustomize, checked against the code.

``kubectl kustomize k8s`` renders them (skipped when kubectl is missing); the
rendered objects must validate against the Kubernetes OpenAPI schemas
(``kubernetes-validate``, which bundles them: no network), and they must agree
with the code they deploy:

- the DaemonSet's environment is :data:`metaleg.config.ENVIRONMENT` with its
  defaults, minus ``KUBECONFIG`` (the one exception: in-cluster configuration);
- the ClusterRole grants exactly :data:`metaleg.rbac.PERMISSIONS`;
- the API calls the watcher really makes (its informers, run against the API
  emulator with the request path of every call recorded) are all covered by
  ``PERMISSIONS``, and every permission is used by one of them;
- ports, probes, security context, volumes and scheduling are as documented.
"""

from __future__ import annotations

import copy
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from metaleg import rbac
from metaleg.config import ENVIRONMENT, load_config, parse_bind_address
from metaleg.firewall.iptables.helper import DEFAULT_LOCK_PATH
from metaleg.watcher.informer import Event, Informer, base_specs, scoped_spec
from tests.kubeapi import KubeApiServer
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
NAMESPACE = "metallb-system"
NAME = "metaleg-agent"
NODE = "node-a"
IMAGE = "ghcr.io/metaleg/metaleg-agent:0.1.0"
LABELS = {"app.kubernetes.io/name": "metaleg", "app.kubernetes.io/component": "agent"}
#: The only variable of ENVIRONMENT the DaemonSet leaves unset: without it the
#: agent uses in-cluster configuration (its ServiceAccount).
NOT_IN_DAEMONSET = {"KUBECONFIG"}
#: Variables set from the downward API rather than to a literal default.
FROM_DOWNWARD_API = {"NODE_NAME": "spec.nodeName", "METALLB_NAMESPACE": "metadata.namespace"}

Object = dict[str, Any]
Triple = tuple[str, str, str]  # (api group, resource, verb)


# --- rendering ----------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[Object]:
    """``kubectl kustomize DIRECTORY``, parsed; skips the test when kubectl is missing."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[Object]:
    return kustomize(K8S)


def the(objects: list[Object], kind: str) -> Object:
    matches = [obj for obj in objects if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def pod_spec(rendered: list[Object]) -> Object:
    spec: Object = the(rendered, "DaemonSet")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod_spec: Object) -> Object:
    containers = pod_spec["containers"]
    assert len(containers) == 1
    assert "initContainers" not in pod_spec
    result: Object = containers[0]
    return result


def test_kustomization_renders_the_agent_objects(rendered: list[Object]) -> None:
    kinds = sorted((obj["kind"], obj["metadata"]["name"]) for obj in rendered)
    assert kinds == [
        ("ClusterRole", NAME),
        ("ClusterRoleBinding", NAME),
        ("DaemonSet", NAME),
        ("ServiceAccount", NAME),
    ]
    for obj in rendered:
        assert obj["metadata"]["labels"] == LABELS, obj["kind"]
        if obj["kind"] in ("ServiceAccount", "DaemonSet"):
            assert obj["metadata"]["namespace"] == NAMESPACE
        else:
            assert "namespace" not in obj["metadata"], f"{obj['kind']} is cluster-scoped"


# --- schema validation --------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket or resolve a name fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _validator() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install '.[test]')"
    )


def test_objects_validate_against_the_kubernetes_schemas_offline(
    rendered: list[Object], no_network: None
) -> None:
    kubernetes_validate = _validator()
    from kubernetes_validate.utils import all_versions, latest_version

    versions = sorted({all_versions()[0], latest_version()})
    for version in versions:
        for obj in rendered:
            # strict: unknown fields (typos such as readOnlyRootFileSystem) are errors too
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                pytest.fail(
                    f"{obj['kind']} invalid for Kubernetes {version}: {path}: {error.message}"
                )


def test_the_schema_validation_catches_mistakes(rendered: list[Object], no_network: None) -> None:
    kubernetes_validate = _validator()
    daemonset = the(rendered, "DaemonSet")
    mistakes: list[Callable[[Object], None]] = [
        lambda ds: ds["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(
            readOnlyRootFileSystem=True
        ),
        lambda ds: ds["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
            containerPort="21793"
        ),
        lambda ds: ds["spec"].pop("selector"),
    ]
    for mistake in mistakes:
        broken = copy.deepcopy(daemonset)
        mistake(broken)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, "1.30", strict=True)


# --- environment --------------------------------------------------------------------------------


def test_daemonset_environment_is_the_config_table_with_its_defaults(container: Object) -> None:
    env = container["env"]
    names = [item["name"] for item in env]
    assert len(names) == len(set(names)), f"duplicate variables: {names}"
    assert set(names) == set(ENVIRONMENT) - NOT_IN_DAEMONSET
    assert "envFrom" not in container
    for item in env:
        name = item["name"]
        if name in FROM_DOWNWARD_API:
            assert "value" not in item, name
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": FROM_DOWNWARD_API[name]}}
        else:
            assert "valueFrom" not in item, name
            assert isinstance(item["value"], str), name
            assert item["value"] == ENVIRONMENT[name], name


def test_daemonset_environment_loads_to_the_default_config(
    rendered: list[Object], container: Object
) -> None:
    # What the kubelet passes (downward API resolved) is a valid configuration,
    # equal to the defaults: the manifest pins no value of its own.
    namespace = the(rendered, "DaemonSet")["metadata"]["namespace"]
    resolved = {"spec.nodeName": NODE, "metadata.namespace": namespace}
    environ = {
        item["name"]: item.get("value") or resolved[item["valueFrom"]["fieldRef"]["fieldPath"]]
        for item in container["env"]
    }
    assert load_config(environ) == load_config({"NODE_NAME": NODE})


# --- RBAC ---------------------------------------------------------------------------------------


def _permission_triples() -> set[Triple]:
    return {(p.api_group, p.resource, verb) for p in rbac.PERMISSIONS for verb in p.verbs}


def test_cluster_role_grants_exactly_the_permissions(rendered: list[Object]) -> None:
    role = the(rendered, "ClusterRole")
    granted: set[Triple] = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    granted.add((group, resource, verb))
    wanted = _permission_triples()
    assert granted - wanted == set(), "the ClusterRole grants more than metaleg.rbac.PERMISSIONS"
    assert wanted - granted == set(), "the ClusterRole lacks some of metaleg.rbac.PERMISSIONS"
    assert "aggregationRule" not in role


def test_binding_gives_the_role_to_the_daemonset_service_account(
    rendered: list[Object], pod_spec: Object
) -> None:
    binding = the(rendered, "ClusterRoleBinding")
    account = the(rendered, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": the(rendered, "ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert pod_spec["serviceAccountName"] == account["metadata"]["name"]
    assert pod_spec.get("automountServiceAccountToken", True) is True


def request_triple(method: str, url: str, query: dict[str, list[str]]) -> Triple:
    """Map an API request to the (group, resource, verb) that RBAC checks."""
    parts = [part for part in urlsplit(url).path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        raise AssertionError(f"not a resource request: {method} {url}")
    if rest[:1] == ["watch"]:  # the deprecated /watch/ form
        rest, query = rest[1:], {**query, "watch": ["true"]}
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]  # namespaced: namespaces/<ns>/<resource>[/<name>[/<sub>]]
    resource = rest[0]
    named = len(rest) >= 2
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    watching = query.get("watch", ["false"])[-1].lower() in ("true", "1")
    verb = {
        "GET": "watch" if watching else ("get" if named else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }[method.upper()]
    return group, resource, verb


def test_request_triple_mapping() -> None:
    assert request_triple("GET", "http://h/api/v1/services?limit=5", {}) == (
        "",
        "services",
        "list",
    )
    assert request_triple(
        "GET", "http://h/api/v1/namespaces/a/services/b", {"watch": ["false"]}
    ) == ("", "services", "get")
    assert request_triple(
        "GET", "http://h/apis/metallb.io/v1beta1/namespaces/x/servicel2statuses", {"watch": ["1"]}
    ) == ("metallb.io", "servicel2statuses", "watch")
    assert request_triple("GET", "http://h/api/v1/watch/nodes", {}) == ("", "nodes", "watch")
    assert request_triple("POST", "http://h/api/v1/namespaces/a/events", {}) == (
        "",
        "events",
        "create",
    )
    assert request_triple("PATCH", "http://h/api/v1/namespaces/a/services/b/status", {}) == (
        "",
        "services/status",
        "patch",
    )


class RecordedRequests:
    """Every request an ``ApiClient`` sends, as (method, url, query), recorded client-side."""

    def __init__(self, api_client: Any) -> None:
        self.calls: list[tuple[str, str, dict[str, list[str]]]] = []
        self._lock = threading.Lock()
        rest_client = api_client.rest_client
        original = rest_client.request

        def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            query = parse_qs(urlsplit(url).query)
            # older clients pass the query separately
            for key, value in kwargs.get("query_params") or []:
                query.setdefault(key, []).append(str(value).lower())
            with self._lock:
                self.calls.append((method, url, query))
            return original(method, url, *args, **kwargs)

        rest_client.request = request

    def triples(self) -> set[Triple]:
        with self._lock:
            return {request_triple(method, url, query) for method, url, query in self.calls}


def exercise_informers(api: KubeApiServer, api_client: Any, recorded: RecordedRequests) -> None:
    """Run the watcher's real informers until each has listed and started watching."""
    # The base informers and one scope of each kind the watcher starts (metaleg.watcher.scopes).
    specs = [
        *base_specs(api_client, NAMESPACE),
        scoped_spec(
            api_client, "endpointslices", ("labelSelector", "kubernetes.io/service-name in (a)")
        ),
        scoped_spec(api_client, "pods:app", ("labelSelector", "app in (a)")),
        scoped_spec(api_client, f"nodes:{NODE}", ("fieldSelector", f"metadata.name={NODE}")),
    ]
    events: queue.Queue[Event] = queue.Queue()
    informers = [Informer(spec, events) for spec in specs]
    for informer in informers:
        informer.start()
    try:
        wait_until(
            lambda: [verb for *_, verb in recorded.triples()],
            timeout=20,
            message=lambda: (
                f"a list and {len(specs)} watches; informer events: {list(events.queue)}"
            ),
            accept=lambda verbs: "list" in verbs and verbs.count("watch") >= len(specs),
        )
        errors = []
        while not events.empty():
            event = events.get_nowait()
            if event.kind == "error":
                errors.append(event.message)
        assert errors == [], f"informer errors against the emulator: {errors}"
    finally:
        for informer in informers:
            informer.stop()
        api.drop_watches(abort=True)  # ends the watches the informers are blocked in
        for informer in informers:
            informer.join(timeout=10)
        assert not any(informer.is_alive() for informer in informers), "an informer did not stop"


def exercise_events(api: KubeApiServer, api_client: Any, recorded: RecordedRequests) -> None:
    """Post one Event on a Service the way the watcher does."""
    from metaleg.watcher.events import EventPoster, ServiceEvent

    poster = EventPoster(api_client, NODE)
    poster.start()
    poster.post(ServiceEvent("default", "kubernetes", "EgressGateway", f"{NODE}: test", False))
    wait_until(
        recorded.triples,
        timeout=10,
        message="a request on events",
        accept=lambda triples: any(resource == "events" for _, resource, _ in triples),
    )


#: Code paths that call the API, each run against the emulator with every request
#: recorded. Code that needs a new permission adds its exerciser here.
EXERCISERS: tuple[Callable[[KubeApiServer, Any, RecordedRequests], None], ...] = (
    exercise_informers,
    exercise_events,
)


@pytest.fixture(scope="module")
def used_triples() -> Iterator[set[Triple]]:
    with KubeApiServer() as api:
        api_client = api.api_client()
        recorded = RecordedRequests(api_client)
        for exercise in EXERCISERS:
            exercise(api, api_client, recorded)
        triples = recorded.triples()
    yield triples


def test_every_api_call_of_the_agent_is_permitted(used_triples: set[Triple]) -> None:
    assert used_triples, "nothing was recorded"
    for group, resource, verb in sorted(used_triples):
        assert rbac.allowed(group, resource, verb), (
            f"the agent calls {verb} on {group or 'core'}/{resource} but metaleg.rbac.PERMISSIONS "
            "does not grant it: add a Permission (and its ClusterRole rule)"
        )


def test_every_permission_is_used(used_triples: set[Triple]) -> None:
    used = {(group, resource) for group, resource, _ in used_triples}
    for permission in rbac.PERMISSIONS:
        assert (permission.api_group, permission.resource) in used, (
            f"{permission} is granted but no exercised code path uses it: remove it, or add the "
            "code that needs it to EXERCISERS in tests/test_manifests.py"
        )
        # an informer's list and watch, each of which must have happened
        for verb in {"list", "watch"} & set(permission.verbs):
            assert (permission.api_group, permission.resource, verb) in used_triples, (
                permission,
                verb,
            )


def test_the_watched_resources_are_exactly_the_read_permissions(used_triples: set[Triple]) -> None:
    watched = {(group, resource) for group, resource, verb in used_triples if verb == "watch"}
    readable = {
        (p.api_group, p.resource) for p in rbac.PERMISSIONS if set(rbac.READ) <= set(p.verbs)
    }
    assert watched == readable


def test_permissions_are_well_formed() -> None:
    seen = set()
    for permission in rbac.PERMISSIONS:
        assert permission.verbs, permission
        assert len(set(permission.verbs)) == len(permission.verbs), permission
        assert permission.resource == permission.resource.lower(), permission
        key = (permission.api_group, permission.resource)
        assert key not in seen, f"two Permissions for {key}: merge them"
        seen.add(key)


# --- the pod ------------------------------------------------------------------------------------


def test_daemonset_shape(rendered: list[Object], pod_spec: Object, container: Object) -> None:
    daemonset = the(rendered, "DaemonSet")
    spec = daemonset["spec"]
    assert spec["selector"] == {"matchLabels": LABELS}
    assert spec["template"]["metadata"]["labels"] == LABELS
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert pod_spec["hostNetwork"] is True
    assert pod_spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod_spec["priorityClassName"] == "system-node-critical"
    assert pod_spec["tolerations"] == [{"operator": "Exists"}]
    assert pod_spec["terminationGracePeriodSeconds"] == 30
    assert "nodeSelector" not in pod_spec and "affinity" not in pod_spec
    assert container["image"] == IMAGE
    assert container["command"] == ["metaleg-supervisor", "run"]
    assert "args" not in container
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "200Mi"},
        "limits": {"memory": "512Mi"},
    }


def test_container_security(pod_spec: Object, container: Object) -> None:
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    seccomp = security.get("seccompProfile") or pod_spec["securityContext"]["seccompProfile"]
    assert seccomp == {"type": "RuntimeDefault"}
    assert not pod_spec.get("hostPID") and not pod_spec.get("hostIPC")


def test_ports_and_probes_follow_the_configured_addresses(container: Object) -> None:
    metrics = parse_bind_address(str(ENVIRONMENT["METRICS_BIND_ADDRESS"]))
    health = parse_bind_address(str(ENVIRONMENT["HEALTH_PROBE_BIND_ADDRESS"]))
    assert metrics is not None and health is not None
    ports = {port["name"]: port for port in container["ports"]}
    assert ports == {
        "metrics": {"name": "metrics", "containerPort": metrics.port, "protocol": "TCP"},
        "health": {"name": "health", "containerPort": health.port, "protocol": "TCP"},
    }
    assert (metrics.port, health.port) == (21793, 21794)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}, probe
        assert 1 <= container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"]


def test_volumes(pod_spec: Object, container: Object) -> None:
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    run_dir = str(ENVIRONMENT["METALEG_RUN_DIR"])
    expected_host_paths = {
        # the mark allocation survives pod restarts: a directory on the host
        run_dir: {"path": "/run/metaleg", "type": "DirectoryOrCreate"},
        # the lock shared with iptables, kube-proxy and kube-router
        DEFAULT_LOCK_PATH: {"path": DEFAULT_LOCK_PATH, "type": "FileOrCreate"},
    }
    for mount_path, host_path in expected_host_paths.items():
        mount = mounts[mount_path]
        assert not mount.get("readOnly", False), mount_path
        assert "subPath" not in mount, mount_path
        assert volumes[mount["name"]]["hostPath"] == host_path, mount_path
    for mount in mounts.values():
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            assert mount["mountPath"] in expected_host_paths, f"unexpected hostPath {volume}"


# --- image overrides ----------------------------------------------------------------------------


def _image_of(objects: list[Object]) -> str:
    image: str = the(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    return image


def test_image_override_as_flux_does_it(tmp_path: Path) -> None:
    # Flux's kustomize-controller replaces the entry of the same name in the
    # kustomization.yaml at spec.path (and appends one when there is none).
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    kustomization_file = copy_dir / "kustomization.yaml"
    kustomization = yaml.safe_load(kustomization_file.read_text())
    names = [image["name"] for image in kustomization["images"]]
    assert names == ["metaleg-agent"]
    kustomization["images"] = [
        {"name": "metaleg-agent", "newName": "registry.example.org/mirror/metaleg", "newTag": "9.9"}
    ]
    kustomization_file.write_text(yaml.safe_dump(kustomization))
    assert _image_of(kustomize(copy_dir)) == "registry.example.org/mirror/metaleg:9.9"


def test_image_override_in_an_overlay(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S, overlay)],
                "images": [
                    {
                        "name": IMAGE.rpartition(":")[0],
                        "newName": "registry.example.org/mirror/metaleg",
                        "newTag": "9.9",
                    }
                ],
            }
        )
    )
    assert _image_of(kustomize(overlay)) == "registry.example.org/mirror/metaleg:9.9"


def test_environment_override_in_an_overlay(tmp_path: Path) -> None:
    # The strategic-merge patch of docs/deployment.md: env entries merge by name.
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    patch = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": NAME},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "env": [{"name": "FIREWALL_EXCLUDE_DST_CIDRS", "value": "10.0.0.0/8"}],
                        }
                    ]
                }
            }
        },
    }
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S, overlay)],
                "patches": [{"patch": yaml.safe_dump(patch)}],
            }
        )
    )
    daemonset = the(kustomize(overlay), "DaemonSet")
    env = daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {item["name"] for item in env} == set(ENVIRONMENT) - NOT_IN_DAEMONSET
    values = {item["name"]: item.get("value") for item in env}
    assert values["FIREWALL_EXCLUDE_DST_CIDRS"] == "10.0.0.0/8"
    assert values["FIREWALL_MASK"] == ENVIRONMENT["FIREWALL_MASK"]


def test_kubernetes_objects_in_the_deployment_guide_validate(no_network: None) -> None:
    kubernetes_validate = _validator()
    from kubernetes_validate.utils import SchemaNotFoundError, latest_version

    text = (ROOT / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL)
    validated = []
    for indent, block in blocks:
        body = "\n".join(line.removeprefix(indent) for line in block.splitlines())
        for document in yaml.safe_load_all(body):
            if not isinstance(document, dict) or "kind" not in document:
                continue
            try:
                kubernetes_validate.validate(document, latest_version(), strict=True)
            except SchemaNotFoundError:
                continue  # Flux and kustomize kinds: not in the Kubernetes schemas
            validated.append(document["kind"])
    assert "Pod" in validated, "the cleanup Pod of the uninstall section"
