"""The watcher process over real HTTP: the unmodified kubernetes client against the API emulator.

A real ``python -m metaleg.watcher`` process talks to the emulator on
loopback and publishes to a hub socket that stands in for the supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq

from metaleg.config import Config
from metaleg.ipc import Publish, PublishChange, WatcherStatus, bind_supervisor, decode
from metaleg.lifecycle import CONFIG_ENVIRONMENT
from metaleg.model import Action, NodeDesiredState, Role
from metaleg.state_changes import apply_change
from metaleg.watcher.informer import DEFAULT_IDLE_TIMEOUT
from tests.kube import ClusterDriver
from tests.kubeapi import KubeApiServer, write_kubeconfig
from tests.waiting import wait_until

LB = ("198.51.100.200", "2001:db8:1::200")


class WatcherUnderTest:
    """A watcher process, its hub socket and the messages it sent."""

    def __init__(
        self,
        api: KubeApiServer,
        run_dir: str,
        *,
        watch_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        token_file: str | None = None,
    ) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.socket = bind_supervisor(self.context, run_dir)
        kubeconfig = os.path.join(run_dir, "kubeconfig")
        write_kubeconfig(kubeconfig, api.url, token_file=token_file)
        config = Config(
            node_name="node-a",
            run_dir=run_dir,
            kubeconfig=kubeconfig,
            log_format="text",
            log_level="debug",
            watch_idle_timeout=watch_idle_timeout,
        )
        env = {**os.environ, CONFIG_ENVIRONMENT: msgspec.json.encode(config).decode()}
        self.log_path = os.path.join(run_dir, "watcher.log")
        with open(self.log_path, "w") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "metaleg.watcher"], env=env, stderr=log_file
            )
        self.published: list[Publish] = []
        """Every state the watcher sent, complete or as a change."""
        self.sequence = -1
        self.changes = 0
        self.statuses: list[WatcherStatus] = []

    def pump(self, timeout: float) -> None:
        if self.socket.poll(int(timeout * 1000)):
            while True:
                try:
                    identity, frame = self.socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                assert identity == b"watcher"
                message = decode(frame)
                if isinstance(message, Publish):
                    self.published.append(message)
                elif isinstance(message, PublishChange):
                    # The supervisor's part: the change applies to the state held.
                    last = self.published[-1]
                    assert message.base_sequence == self.sequence, "a change was lost"
                    self.published.append(
                        Publish(
                            apply_change(last.state, message.delta),
                            last.problems if message.problems is None else message.problems,
                            message.sequence,
                        )
                    )
                    self.changes += 1
                if isinstance(message, Publish | PublishChange):
                    self.sequence = message.sequence
                elif isinstance(message, WatcherStatus):
                    self.statuses.append(message)

    def wait_for(
        self, predicate: Callable[[NodeDesiredState], bool], timeout: float = 10.0
    ) -> NodeDesiredState:

        def matching_state() -> NodeDesiredState | None:
            if self.published and predicate(self.published[-1].state):
                return self.published[-1].state
            self.pump(0.2)
            return None

        def last_state() -> str:
            last = self.published[-1].state if self.published else None
            return f"a matching state; last state: {last}\nlog:\n{self.log()}"

        return wait_until(matching_state, timeout, interval=0, message=last_state)

    def wait_for_status(
        self, predicate: Callable[[WatcherStatus], bool], timeout: float = 10.0, since: int = 0
    ) -> WatcherStatus:
        """The first status from the ``since``-th on that meets ``predicate``."""

        def matching_status() -> WatcherStatus | None:
            status = next(filter(predicate, self.statuses[since:]), None)
            if status is None:
                self.pump(0.2)
            return status

        return wait_until(
            matching_status,
            timeout,
            interval=0,
            message=lambda: f"a matching watcher status: {self.statuses}\n{self.log()}",
        )

    def log(self) -> str:
        with open(self.log_path) as file:
            return file.read()[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.socket.close(0)
        self.context.term()


def relay(state: NodeDesiredState) -> Any:
    return next((s for s in state.services if s.key == "mail/relay"), None)


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(bookmark_interval=1.0) as server:
        yield server


@pytest.fixture
def cluster(api: KubeApiServer) -> ClusterDriver:
    driver = ClusterDriver(api.api_client())
    driver.node("node-a", "198.51.100.11", "2001:db8:1::11")
    driver.node("node-b", "198.51.100.12", "2001:db8:1::12")
    return driver


@pytest.fixture
def watcher(api: KubeApiServer, cluster: ClusterDriver) -> Iterator[WatcherUnderTest]:
    with tempfile.TemporaryDirectory(prefix="mlwt") as run_dir:
        process = WatcherUnderTest(api, run_dir)
        try:
            yield process
        finally:
            process.stop()


def add_relay(cluster: ClusterDriver, gateway: str | None = "node-b") -> None:
    cluster.service("mail", "relay", LB)
    cluster.endpoints(
        "mail", "relay", "IPv4", [("10.244.1.10", "node-a"), ("10.244.2.10", "node-b")]
    )
    cluster.endpoints("mail", "relay", "IPv6", [("fd00:10:244:1::10", "node-a")])
    cluster.gateway("mail", "relay", gateway)


def test_publishes_the_desired_state_and_follows_changes(
    watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    initial = watcher.wait_for(lambda s: True)
    assert initial.services == ()  # synced, nothing labelled yet
    add_relay(cluster)
    state = watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.FORWARDER)
    service = relay(state)
    assert [f.source_ips for f in service.families] == [("10.244.1.10",), ("fd00:10:244:1::10",)]
    assert state.routes[0].node == "node-b" and state.routes[0].next_hop_ipv4 == "198.51.100.12"

    cluster.gateway("mail", "relay", "node-a")
    state = watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.GATEWAY)
    assert relay(state).families[0].source_ips == ("10.244.1.10", "10.244.2.10")
    assert state.routes == ()

    cluster.gateway("mail", "relay", None)
    state = watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.REJECT)
    assert {f.action for f in relay(state).families} == {Action.REJECT}

    cluster.label_service("mail", "relay", "false")  # leaves the label selector: a DELETED event
    watcher.wait_for(lambda s: relay(s) is None)
    cluster.label_service("mail", "relay", True)
    watcher.wait_for(lambda s: relay(s) is not None)
    cluster.delete_service("mail", "relay")
    watcher.wait_for(lambda s: relay(s) is None)


def test_relists_after_410_gone_and_sees_what_changed_meanwhile(
    api: KubeApiServer, watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    add_relay(cluster)
    watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.FORWARDER)
    api.set_latency(0.0)
    # Cut the watches and compact the history while changes happen: resuming from the old
    # resourceVersion then answers 410 Gone and only a relist can see the change.
    api.stop()
    api.store.patch(
        "servicel2statuses",
        "l2-mail-relay",
        {"status": {"node": "node-a"}},
        namespace="metallb-system",
        subresource="status",
    )
    api.store.compact()
    api.start()
    state = watcher.wait_for(
        lambda s: relay(s) is not None and relay(s).role == Role.GATEWAY, timeout=20
    )
    assert relay(state).gateway_node == "node-a"
    assert "410" in watcher.log() or "relisting" in watcher.log()


def test_api_outage_keeps_publishing_the_last_good_state(
    api: KubeApiServer, watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    add_relay(cluster)
    good = watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.FORWARDER)
    api.stop()
    watcher.wait_for_status(lambda st: "cannot reach the API server" in st.error, timeout=15)
    count = len(watcher.published)
    watcher.pump(1.0)
    assert all(p.state == good for p in watcher.published[count:])  # never an emptied state
    api.start(keep_history=True)
    cluster.endpoints(
        "mail", "relay", "IPv4", [("10.244.1.10", "node-a"), ("10.244.1.11", "node-a")]
    )
    state = watcher.wait_for(
        lambda s: relay(s) is not None and "10.244.1.11" in relay(s).families[0].source_ips,
        timeout=30,
    )
    assert relay(state).role == Role.FORWARDER
    # The error clears once the API answers again, for every resource (most see no event
    # after the outage), and only statuses sent after it count.
    since = next(i for i, st in enumerate(watcher.statuses) if "cannot reach" in st.error)
    watcher.wait_for_status(lambda st: st.synced and not st.error, timeout=10, since=since)


def test_missing_servicel2status_crd_is_reported_and_nothing_is_published_until_it_appears(
    api: KubeApiServer, cluster: ClusterDriver
) -> None:
    add_relay(cluster)
    api.set_group_available("metallb.io", False)
    with tempfile.TemporaryDirectory(prefix="mlwt") as run_dir:
        watcher = WatcherUnderTest(api, run_dir)
        try:
            watcher.wait_for_status(
                lambda st: "ServiceL2Status CRD" in st.error and "MetalLB >= 0.14" in st.error,
                timeout=15,
            )
            assert watcher.published == []  # a half-synced view would tear down working rules
            api.set_group_available("metallb.io", True)
            state = watcher.wait_for(lambda s: relay(s) is not None, timeout=40)
            assert relay(state).role == Role.FORWARDER
        finally:
            watcher.stop()


def test_bursts_are_coalesced(
    watcher: WatcherUnderTest, cluster: ClusterDriver, api: KubeApiServer
) -> None:
    add_relay(cluster, gateway="node-a")
    watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.GATEWAY)
    before = len(watcher.published)
    # A burst (e.g. a Deployment scaled up): 40 slice updates that reach the watcher while it
    # is busy. A lone event is handled at once, so to be sure they arrive together the
    # watcher is paused (SIGSTOP) while they are written.
    os.kill(watcher.process.pid, signal.SIGSTOP)
    try:
        for index in range(40):
            endpoints = [
                {"addresses": [f"10.244.1.{10 + i}"], "nodeName": "node-a"}
                for i in range(index + 1)
            ]
            api.store.patch(
                "endpointslices", "relay-v4", {"endpoints": endpoints}, namespace="mail"
            )
    finally:
        os.kill(watcher.process.pid, signal.SIGCONT)
    state = watcher.wait_for(
        lambda s: relay(s) is not None and len(relay(s).families[0].source_ips) == 40, timeout=20
    )
    assert relay(state).families[0].source_ips[-1] == "10.244.1.49"
    # Handled one by one, the 40 updates would be 40 publications (each changes the state).
    # How many arrive together depends on how the informer thread's reads of the buffered
    # stream interleave with the main thread, i.e. on the machine's load: 1-3 here, 6 once
    # on a loaded CI machine. The bound asks for coalescing, not for a figure.
    assert len(watcher.published) - before <= 20


def test_invalid_objects_are_reported_not_fatal(
    watcher: WatcherUnderTest, cluster: ClusterDriver, api: KubeApiServer
) -> None:
    add_relay(cluster, gateway="node-a")
    api.store.patch(
        "endpointslices",
        "relay-v4",
        {
            "endpoints": [
                {"addresses": ["10.244.1.999"], "nodeName": "node-a"},
                {"addresses": ["10.244.1.12"], "nodeName": "node-a"},
            ]
        },
        namespace="mail",
    )
    state = watcher.wait_for(
        lambda s: relay(s) is not None and relay(s).families[0].source_ips == ("10.244.1.12",)
    )
    assert any("10.244.1.999" in p for p in watcher.published[-1].problems)
    assert watcher.process.poll() is None
    assert relay(state).role == Role.GATEWAY


def test_watches_only_what_the_labelled_services_need(
    api: KubeApiServer, watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    add_relay(cluster, gateway="node-a")
    # Unrelated objects: an unlabelled Service with its slice and pods, another Node.
    cluster.service("web", "front", ("198.51.100.201",), labelled=False)
    cluster.endpoints("web", "front", "IPv4", [("10.244.2.77", "node-b")])
    cluster.pod("web", "front-1", "node-b", ("10.244.2.77",), {"app": "front"})
    cluster.node("node-z", "198.51.100.99")
    # A pod of the relay on another node, not yet in any EndpointSlice: the gateway takes it.
    cluster.pod("mail", "relay-new", "node-b", ("10.244.2.20",), {"app": "relay"})
    state = watcher.wait_for(
        lambda s: relay(s) is not None and "10.244.2.20" in relay(s).families[0].source_ips
    )
    assert relay(state).role == Role.GATEWAY
    watches = {
        (w["resource"], w["labelSelector"], w["fieldSelector"]) for w in api.store.open_watches()
    }
    scoped = {w for w in watches if not w[0].endswith(("services", "servicel2statuses"))}
    assert scoped == {
        ("discovery.k8s.io/v1/endpointslices", "kubernetes.io/service-name in (relay)", ""),
        ("v1/pods", "app in (relay)", ""),
        ("v1/nodes", "", "metadata.name=node-a"),
    }, watches


def test_scopes_follow_new_services_and_gateways_without_a_gap(
    api: KubeApiServer, watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    add_relay(cluster, gateway="node-a")
    watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.GATEWAY)
    cluster.node("node-c", "198.51.100.13", "2001:db8:1::13")
    published_before = len(watcher.published)
    # While a new Service's scopes (its EndpointSlices, its Pods, its gateway's Node) are
    # replaced in, the relay's slice keeps changing: no change may be missed.
    # (MetalLB's status and the slice exist before the label: a Service labelled later.)
    cluster.ensure_namespace("web")
    cluster.gateway("web", "front", "node-c")
    cluster.endpoints("web", "front", "IPv4", [("10.244.1.30", "node-a")])
    cluster.service("web", "front", ("198.51.100.201",))
    for index in range(20):
        endpoints = [
            {"addresses": [f"10.244.1.{10 + i}"], "nodeName": "node-a"} for i in range(index + 1)
        ]
        api.store.patch("endpointslices", "relay-v4", {"endpoints": endpoints}, namespace="mail")
    cluster.pod("web", "front-new", "node-a", ("10.244.1.31",), {"app": "front"})

    def done(state: NodeDesiredState) -> bool:
        front = next((s for s in state.services if s.key == "web/front"), None)
        return (
            front is not None
            and front.families[0].source_ips == ("10.244.1.30", "10.244.1.31")
            and relay(state).families[0].source_ips[-1] == "10.244.1.29"
        )

    state = watcher.wait_for(done, timeout=20)
    front = next(s for s in state.services if s.key == "web/front")
    assert front.role == Role.FORWARDER and state.routes[0].next_hop_ipv4 == "198.51.100.13"
    assert len(relay(state).families[0].source_ips) == 20

    # The gateway's Node was not watched before; until its watch had listed, nothing was
    # published, so the Service never read as "gateway unknown".
    def gateway_unknown(publish: Publish) -> bool:
        return any(
            "known gateway node" in family.reason
            for service in publish.state.services
            for family in service.families
        )

    assert not any(map(gateway_unknown, watcher.published[published_before:]))
    # A gateway move to yet another node that is not watched: straight to the new gateway.
    cluster.node("node-d", "198.51.100.14", "2001:db8:1::14")
    published_before = len(watcher.published)
    cluster.gateway("web", "front", "node-d")
    state = watcher.wait_for(
        lambda s: any(r.node == "node-d" for r in s.routes) and len(s.routes) == 1
    )
    assert not any(map(gateway_unknown, watcher.published[published_before:]))
    # The Node no gateway needs any more is no longer watched.
    wait_until(
        api.store.open_watches,
        timeout=10,
        message="the watch of node-c to close",
        accept=lambda watches: all(w["fieldSelector"] != "metadata.name=node-c" for w in watches),
    )


def test_a_hostnetwork_endpoint_is_a_problem_not_a_source(
    watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    add_relay(cluster, gateway="node-a")
    cluster.endpoints(
        "mail", "relay", "IPv4", [("10.244.1.10", "node-a"), ("198.51.100.12", "node-b")]
    )
    cluster.pod(
        "mail", "relay-host", "node-b", ("198.51.100.12",), {"app": "relay"}, host_network=True
    )
    state = watcher.wait_for(
        lambda s: (
            relay(s) is not None
            and relay(s).families[0].source_ips == ("10.244.1.10",)
            and any(
                "198.51.100.12 is a node's address" in p for p in watcher.published[-1].problems
            )
        )
    )
    assert state.transit_guard_ipv4 == ()


@pytest.fixture
def run_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mlwt") as path:
        yield path


def test_a_silently_dead_watch_is_replaced_and_a_change_made_meanwhile_arrives(
    api: KubeApiServer, cluster: ClusterDriver, run_dir: str
) -> None:
    # The emulator sends a bookmark every second (the fixture), a real API server about once a
    # minute: the idle timeout is scaled down alike (75 s by default, see the next test).
    watcher = WatcherUnderTest(api, run_dir, watch_idle_timeout=4.0)
    try:
        add_relay(cluster)
        watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.FORWARDER)
        watcher.pump(6.0)  # healthy idle watches outlive the idle timeout: bookmarks keep them
        assert "cannot reach" not in watcher.log()
        # Every open watch goes silent without a FIN; new connections would work.
        api.silence_watches()
        cluster.gateway("mail", "relay", "node-a")
        state = watcher.wait_for(
            lambda s: relay(s) is not None and relay(s).role == Role.GATEWAY, timeout=30
        )
        assert relay(state).gateway_node == "node-a"
        with open(watcher.log_path) as file:
            log = file.read()
        assert "Read timed out" in log, log[-3000:]
    finally:
        watcher.stop()


def test_the_default_timeouts_notice_a_dead_connection_within_a_minute() -> None:
    from metaleg.config import load_config
    from metaleg.watcher import kubeclient

    # A connection whose peer is gone (no FIN, no RST: packets are dropped) fails by TCP
    # keepalive: idle, then unanswered probes.
    keepalive = (
        kubeclient.KEEPALIVE_IDLE + kubeclient.KEEPALIVE_COUNT * kubeclient.KEEPALIVE_INTERVAL
    )
    assert keepalive <= 60
    # A connection that stays up but carries nothing: past the API server's bookmark interval
    # (about a minute), with a margin so that healthy idle watches are not recycled.
    config = load_config({"NODE_NAME": "n1"})
    assert config.watch_idle_timeout == DEFAULT_IDLE_TIMEOUT == 75.0
    options = {(level, name): value for level, name, value in kubeclient.socket_options()}
    import socket

    assert options[(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] == 1
    assert options[(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)] == kubeclient.KEEPALIVE_IDLE
    assert options[(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)] == kubeclient.KEEPALIVE_COUNT


def test_the_api_client_keeps_connections_alive(api: KubeApiServer, run_dir: str) -> None:
    from metaleg.watcher.kubeclient import api_client, socket_options

    kubeconfig = write_kubeconfig(os.path.join(run_dir, "kubeconfig"), api.url)
    client = api_client(kubeconfig)
    assert client.rest_client.pool_manager.connection_pool_kw["socket_options"] == socket_options()


def test_watches_that_end_at_once_are_resumed_with_back_off(
    api: KubeApiServer, watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    add_relay(cluster)
    watcher.wait_for(lambda s: relay(s) is not None)
    api.end_watches_at_once = True
    api.drop_watches()
    before = api.watch_requests
    watcher.pump(6.0)
    requests = api.watch_requests - before
    # Six watches (services, statuses, slices, pods, two nodes) resumed without a pause would
    # make thousands of requests in 6 s; with back-off from 0.5 s doubling, at most ~5 each.
    assert requests <= 6 * 6, requests
    api.end_watches_at_once = False
    cluster.gateway("mail", "relay", "node-a")
    watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.GATEWAY, timeout=40)


def test_429_and_5xx_are_retried_and_reported_until_the_api_answers(
    api: KubeApiServer, watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    add_relay(cluster)
    watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.FORWARDER)
    since = len(watcher.statuses)
    # (watch requests only: the test's own writes must not take the failures). urllib3 itself
    # retries a 429 with Retry-After up to three times, after the delay it asks for: only the
    # fifth answer reaches the informer, which waits as asked too.
    api.fail_requests(429, count=6, retry_after=1, path_contains="servicel2statuses", watch=True)
    api.fail_requests(503, count=2, path_contains="endpointslices", watch=True)
    api.drop_watches()
    watcher.wait_for_status(lambda st: "429" in st.error, timeout=15, since=since)
    cluster.gateway("mail", "relay", "node-a")
    cluster.endpoints("mail", "relay", "IPv4", [("10.244.1.12", "node-a")])
    state = watcher.wait_for(
        lambda s: (
            relay(s) is not None
            and relay(s).role == Role.GATEWAY
            and relay(s).families[0].source_ips == ("10.244.1.12",)
        ),
        timeout=40,
    )
    assert relay(state).gateway_node == "node-a"
    errors = [st.error for st in watcher.statuses[since:]]
    assert any("503" in e for e in errors), errors
    last_error = max(i for i, st in enumerate(watcher.statuses) if st.error)
    watcher.wait_for_status(lambda st: st.synced and not st.error, since=last_error)


def test_a_rotated_token_is_read_again(api: KubeApiServer, run_dir: str) -> None:
    token_file = os.path.join(run_dir, "token")
    with open(token_file, "w") as file:
        file.write("first-token\n")
    # The test's own client carries the current token too.
    driver_client = api.api_client()
    driver_client.configuration.api_key["BearerToken"] = "Bearer first-token"
    cluster = ClusterDriver(driver_client)
    api.token = "first-token"
    cluster.node("node-a", "198.51.100.11", "2001:db8:1::11")
    cluster.node("node-b", "198.51.100.12", "2001:db8:1::12")
    watcher = WatcherUnderTest(api, run_dir, token_file=token_file)
    try:
        add_relay(cluster)
        watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.FORWARDER)
        # The token is rotated (the kubelet rewrites a projected token file); the old one is
        # refused from now on, and the streams that used it end.
        with open(token_file + ".new", "w") as file:
            file.write("second-token\n")
        os.replace(token_file + ".new", token_file)
        driver_client.configuration.api_key["BearerToken"] = "Bearer second-token"
        api.token = "second-token"
        api.drop_watches()
        since = len(watcher.statuses)
        cluster.gateway("mail", "relay", "node-a")
        state = watcher.wait_for(
            lambda s: relay(s) is not None and relay(s).role == Role.GATEWAY, timeout=30
        )
        assert relay(state).gateway_node == "node-a"
        assert not any("401" in st.error for st in watcher.statuses[since:])
    finally:
        api.token = None
        watcher.stop()


def test_a_deleted_servicel2status_crd_fails_closed_and_is_reported(
    api: KubeApiServer, watcher: WatcherUnderTest, cluster: ClusterDriver
) -> None:
    add_relay(cluster)
    watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.FORWARDER)
    # MetalLB uninstalled: its objects are deleted (DELETED events), then the resource is gone.
    api.delete_custom_resource_definition("metallb.io")
    state = watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.REJECT)
    assert {f.action for f in relay(state).families} == {Action.REJECT}
    watcher.wait_for_status(lambda st: "ServiceL2Status CRD" in st.error, timeout=15)
    api.set_group_available("metallb.io", True)
    cluster.gateway("mail", "relay", "node-b")
    watcher.wait_for(lambda s: relay(s) is not None and relay(s).role == Role.FORWARDER, timeout=40)
