"""One real agent (``metaleg-supervisor run``) in a network namespace, fed by the API emulator.

Used by :mod:`bench.latency` and :mod:`bench.resources`. :class:`AgentBench`
creates a namespace ``mlb-<pid>-<n>`` (always deleted), gives it a link that
makes the generated gateway nodes' next hops on-link, serves the in-process
:class:`~tests.kubeapi.KubeApiServer` inside it on 127.0.0.1 (as
:class:`tests.lab.agents.EgressLab` does on the lab LAN) and fills the
emulator's store directly (no HTTP, so setting up 5000 Services takes
seconds) with the cluster of :mod:`bench.common`: 15 Nodes, N labelled
Services of 10 dual-stack pods (all on ``node-00``, the agent's node) with
their EndpointSlices and, for those with a gateway, a MetalLB ServiceL2Status.

:class:`KernelPoller` is a process inside the namespace that waits, polling the
kernel directly (libnftables ``get element`` or an ipset ``test`` over netlink;
about 0.1-0.5 ms a probe), until an address shows up in a set or map, and
answers with the ``time.monotonic()`` at which it saw it (the monotonic clock
is the same in every namespace).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import zmq

from bench.common import (
    GATEWAYS,
    NAMESPACE,
    NO_GATEWAY,
    NODE,
    gateway_of,
    lb_ip4,
    lb_ip6,
    next_hop4,
    next_hop6,
    node_name,
    pod_ip4,
    pod_ip6,
    service_name,
    wire_next_hops,
)
from metaleg.firewall.iptables.rules import mark_set_name, rejected_set_name, source_set_name
from metaleg.lifecycle import process_tree
from metaleg.model import Family
from metaleg.supervisor.metrics import descendants
from metaleg.supervisor.status import StatusReport
from tests import cluster_objects as objects
from tests.kubeapi import KubeApiServer, write_kubeconfig
from tests.netns import namespace
from tests.processes import agent_processes

METALLB = "metallb-system"
SUPERVISOR = os.path.join(os.path.dirname(sys.executable), "metaleg-supervisor")
API_PORT = 6443


def slice_name(index: int, family: int) -> str:
    return f"{service_name(index)}-v{family}"


def endpoints(addresses: list[str]) -> list[dict[str, Any]]:
    body = objects.endpoint_slice(NAMESPACE, "x", "x", "IPv4", [(a, NODE) for a in addresses])
    result: list[dict[str, Any]] = body["endpoints"]
    return result


class Cluster:
    """The emulator's store, written directly."""

    def __init__(self, api: KubeApiServer) -> None:
        self.store = api.store

    def create(self, resource: str, body: dict[str, Any], ns: str | None = None) -> None:
        self.store.create(resource, body, ns)

    def status(self, resource: str, name: str, status: dict[str, Any], ns: str | None) -> None:
        self.store.patch(resource, name, {"status": status}, ns, subresource="status")

    def populate(self, n: int, ips: int = 10) -> None:
        for name in (NAMESPACE, METALLB):
            self.create("namespaces", {"metadata": {"name": name}})
        for g in range(GATEWAYS):
            body = objects.node(
                node_name(g),
                next_hop4(g),
                next_hop6(g),
                (f"10.244.{g}.0/24", f"fd00:10:244:{g:x}::/64"),
            )
            self.create("nodes", body)
        for i in range(n):
            self.add_service(i, ips)

    def add_service(self, index: int, ips: int = 10) -> None:
        name = service_name(index)
        body = objects.service(NAMESPACE, name, (lb_ip4(index), lb_ip6(index)))
        # 5000 LoadBalancer Services need more than the 2768 node ports: without them, as a
        # real cluster of that size with MetalLB L2 would be set up.
        body["spec"]["allocateLoadBalancerNodePorts"] = False
        # A given ClusterIP spares the emulator's linear search for a free one.
        body["spec"]["clusterIP"] = str(ipaddress.IPv4Address("10.100.0.0") + index + 1)
        self.create("services", body, NAMESPACE)
        self.status("services", name, body["status"], NAMESPACE)
        for family, address in ((4, pod_ip4), (6, pod_ip6)):
            slice_body = objects.endpoint_slice(
                NAMESPACE,
                slice_name(index, family),
                name,
                f"IPv{family}",
                [(address(index, j, ips), NODE) for j in range(ips)],
            )
            self.create("endpointslices", slice_body, NAMESPACE)
        g = gateway_of(index)
        if g != NO_GATEWAY:
            l2 = objects.l2_status(METALLB, f"l2-{NAMESPACE}-{name}", NAMESPACE, name, node_name(g))
            self.create("servicel2statuses", l2, METALLB)
            self.status("servicel2statuses", l2["metadata"]["name"], l2["status"], METALLB)

    def set_endpoints(self, index: int, family: int, addresses: list[str]) -> None:
        self.store.patch(
            "endpointslices",
            slice_name(index, family),
            {"endpoints": endpoints(addresses)},
            NAMESPACE,
        )


def kernel_target(backend: str, index: int, family: int = 4) -> tuple[str, str]:
    """(kind, set) where Service ``index``'s sources of ``family`` live in the kernel."""
    g = gateway_of(index)
    if backend == "iptables":
        # A MARK (REJECT) Service's sources are members of the mark (REJECT) set.
        if g == NO_GATEWAY:
            return "ipset", rejected_set_name(Family(family))
        if g != 0:
            return "ipset", mark_set_name(Family(family))
        return "ipset", source_set_name(Family(family), NAMESPACE, service_name(index))
    kind = "snat" if g == 0 else "reject" if g == NO_GATEWAY else "mark"
    return "nft", f"{kind}{family}"


# --- the kernel poller ------------------------------------------------------------------------------


def _poller_main(conn: Any, netns: str, interval: float) -> None:
    from pyroute2 import netns as pyroute2_netns

    pyroute2_netns.setns(netns, flags=0)
    from pyroute2 import IPSet

    from metaleg.firewall.nftables.libnftables import Nft, NftError

    nft = Nft()
    ipset = IPSet()
    probes = 0
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            if request is None:
                return
            kind, set_name, address, present, timeout = request
            deadline = time.monotonic() + timeout
            found: float | None = None
            while True:
                now = time.monotonic()
                if kind == "nft":
                    try:
                        nft.run(f"get element inet metaleg {set_name} {{ {address} }}")
                        hit = True
                    except NftError:
                        hit = False
                else:
                    family = 10 if ":" in address else 2
                    try:
                        hit = bool(ipset.test(set_name, address, family=family))
                    except Exception:
                        hit = False
                probes += 1
                if hit == present:
                    found = now
                    break
                if now > deadline:
                    break
                time.sleep(interval)
            conn.send((found, time.monotonic(), probes))
    finally:
        nft.close()
        ipset.close()


class KernelPoller:
    """A process in ``netns`` that polls for set/map members (see the module doc)."""

    def __init__(self, netns: str, interval: float = 0.0005) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_poller_main, args=(child, netns, interval))
        self._process.start()
        child.close()

    def wait(
        self, kind: str, set_name: str, address: str, *, present: bool = True, timeout: float = 30.0
    ) -> tuple[float | None, float, int]:
        """Block until ``address`` is (not) in the set: (monotonic time seen or None, poller's
        own time when it answered, probes so far)."""
        self._conn.send((kind, set_name, address, present, timeout))
        result: tuple[float | None, float, int] = self._conn.recv()
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(None)
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


# --- the agent --------------------------------------------------------------------------------------


@dataclass
class LogLine:
    time: float
    """Wall-clock seconds (the log's millisecond timestamp)."""
    process: str
    msg: str
    fields: dict[str, Any]


def parse_log_lines(raw_lines: Iterable[bytes]) -> list[LogLine]:
    """The agent's JSON log lines (others, e.g. tracebacks, are skipped)."""
    lines: list[LogLine] = []
    for raw in raw_lines:
        try:
            entry = json.loads(raw)
            stamp = parse_log_time(entry["time"])
        except (ValueError, KeyError, TypeError):
            continue
        lines.append(LogLine(stamp, entry.get("process", ""), entry.get("msg", ""), entry))
    return lines


def parse_log_time(text: str) -> float:
    """Wall-clock seconds of a JSON log timestamp (``2026-01-02T03:04:05.678Z``, UTC)."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


class AgentBench:
    """The namespace, the emulator in it, and the agent; a context manager."""

    def __init__(
        self,
        n: int,
        backend: str,
        *,
        ips: int = 10,
        populate: Callable[[Cluster], None] | None = None,
        **env: str,
    ) -> None:
        """``n`` labelled Services (:meth:`wait_ready` waits for that many); ``populate``
        fills the store instead of :meth:`Cluster.populate` (a cluster of its own)."""
        self.n = n
        self.ips = ips
        self.backend = backend
        self.env = env
        self.populate = populate
        self.api = KubeApiServer(bookmark_interval=60.0)
        self.cluster = Cluster(self.api)
        self.netns = ""
        self.workdir = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._stack = contextlib.ExitStack()
        self._log_offset = 0

    def __enter__(self) -> AgentBench:
        try:
            self.netns = self._stack.enter_context(namespace("mlb"))
            self.workdir = tempfile.mkdtemp(prefix="mlb-")
            self._stack.callback(shutil.rmtree, self.workdir, True)
            wire_next_hops(self.netns)
            self.api.start()
            self._stack.callback(self.api.stop)
            self.api.add_listener("127.0.0.1", API_PORT, netns=self.netns)
            if self.populate is not None:
                self.populate(self.cluster)
            else:
                self.cluster.populate(self.n, self.ips)
            write_kubeconfig(self.kubeconfig, f"http://127.0.0.1:{API_PORT}")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self._stack.close()

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.workdir, "kubeconfig")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.workdir, "run")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "agent.log")

    def start(self) -> None:
        environment = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "NODE_NAME": NODE,
            "KUBECONFIG": self.kubeconfig,
            "METALEG_RUN_DIR": self.run_dir,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            "FIREWALL_BACKEND": self.backend,
            **self.env,
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "env",
                    "-i",
                    *(f"{k}={v}" for k, v in environment.items()),
                    SUPERVISOR,
                    "run",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                # Not the caller's directory: `python -m metaleg.<worker>` puts the working
                # directory first on sys.path, ahead of a PYTHONPATH given in ``env``.
                cwd=self.workdir,
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def status(self, timeout: float = 5.0) -> StatusReport | None:
        """The supervisor's status over its control socket (None: no answer)."""
        path = os.path.join(self.run_dir, "control.sock")
        if not os.path.exists(path):
            return None
        context: zmq.Context[Any] = zmq.Context.instance()
        request = context.socket(zmq.REQ)
        request.setsockopt(zmq.LINGER, 0)
        try:
            request.connect(f"ipc://{path}")
            request.send(b"status")
            if not request.poll(int(timeout * 1000)):
                return None
            return msgspec.json.decode(request.recv(), type=StatusReport)
        finally:
            request.close(0)

    def wait_ready(self, timeout: float = 300.0) -> StatusReport:
        """Until the agent is ready with every Service in its state; returns the status."""
        deadline = time.monotonic() + timeout
        report: StatusReport | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the agent exited: {self.log_tail()}")
            report = self.status()
            if report is not None and report.ready and len(report.services) >= self.n:
                return report
            time.sleep(0.2)
        raise TimeoutError(f"agent not ready after {timeout:.0f}s: {report}\n{self.log_tail()}")

    def pids(self) -> dict[str, int]:
        """supervisor, its fork server (``forkserver``), watcher, firewall, routing, audit
        and any children of the workers (e.g. the xtables helpers, as ``firewall/<pid>``)."""
        assert self.process is not None
        result = {"supervisor": self.process.pid, **agent_processes(self.process.pid)}
        children = process_tree()
        for worker in ("watcher", "firewall", "routing", "audit"):
            if worker in result:
                for grandchild in descendants(result[worker], children):
                    result[f"{worker}/{_short(_cmdline(grandchild))}-{grandchild}"] = grandchild
        return result

    def log_lines(self, since_start: bool = False) -> list[LogLine]:
        """JSON log lines written since the last call (all with ``since_start``)."""
        with open(self.log_path, "rb") as file:
            if not since_start:
                file.seek(self._log_offset)
            data = file.read()
            self._log_offset = file.tell()
        return parse_log_lines(data.splitlines())

    def log_tail(self, size: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as file:
                return file.read()[-size:]
        except OSError:
            return ""


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _short(argv: str) -> str:
    if "metaleg.firewall.iptables.helper" in argv:
        words = argv.split()
        index = (
            words.index("metaleg.firewall.iptables.helper")
            if "metaleg.firewall.iptables.helper" in words
            else -1
        )
        family = words[index + 1] if 0 <= index < len(words) - 1 else "?"
        return f"xtables{family}"
    return os.path.basename(argv.split()[0]) if argv else "?"
