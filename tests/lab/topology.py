"""A reusable lab of network namespaces: a LAN of three Kubernetes-like nodes, a router, the internet.

::

    with Lab(masquerade="nft") as lab:
        pod = lab.add_pod("node-b", "client")
        assert lab.probe(pod, family=4, proto="udp").source == lab.node("node-b").ipv4
        lab.announce(LB_IP4, "node-a")        # MetalLB L2: the router's ARP entry -> node-a

Topology (every namespace is named ``<prefix>-<role>``, ``prefix = mll<pid>x<n>``)::

                      internet 203.0.113.10 / 2001:db8:2::10   (recorder: UDP 5000, TCP 5001)
                         | eth0
                         | wan 203.0.113.1 / 2001:db8:2::1
                      router   (forwards; no route to the pod CIDRs)
                         | wan2 192.0.2.1 / 2001:db8:3::1
                         | eth0
                      mirror 192.0.2.10 / 2001:db8:3::10   (a second internet host, no recorder
                                                           unless a test starts one)
                         | lan 198.51.100.1 / 2001:db8:1::1
      switch (bridge br0): LAN 198.51.100.0/24, 2001:db8:1::/64
         |                 |                 |                 |
       api .5           node-a .11        node-b .12        node-c .13     (eth0; ::5, ::11 ...)
                        kube-bridge       kube-bridge       kube-bridge
                        10.244.1.1/24     10.244.2.1/24     10.244.3.1/24
                        fd00:10:244:1::1  fd00:10:244:2::1  fd00:10:244:3::1   (/64)
                         |  pods .10, .11 ... (::10, ::11 ...)

Each node: IPv4/IPv6 forwarding, ``rp_filter`` loose, routes to the other nodes'
pod CIDRs via their node IPs, default routes via the router, and kube-router's
masquerade (``-s <cluster pod CIDR> ! -d <cluster pod CIDR> -j MASQUERADE``, both
families) plus ``KUBE-ROUTER-INPUT/FORWARD/OUTPUT`` filter chains, written with
the legacy or the nft flavour of iptables (``masquerade=``). The cluster pod
CIDRs (10.244.0.0/16, fd00:10:244::/48) are used as kube-router uses its
``kube-router-pod-subnets`` set, so pod-to-pod traffic across nodes keeps pod IPs.

Nothing is done in the root namespace: links are created directly inside the
lab's namespaces; all sysctls are set inside them. Everything (namespaces, their
processes, the working directory) is removed on exit, also after a failure or a
KeyboardInterrupt, and by an ``atexit`` hook for a lab never closed.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from tests.lab.traffic import (
    Family,
    ProbeResult,
    Proto,
    Record,
    Recorder,
    Stream,
    netns_command,
    probe,
    stop_process,
)
from tests.waiting import wait_until

MasqueradeMode = Literal["legacy", "nft", "none"]

# --------------------------------------------------------------------------- addresses

LAN4 = "198.51.100.0/24"
LAN6 = "2001:db8:1::/64"
WAN4 = "203.0.113.0/24"
WAN6 = "2001:db8:2::/64"
ROUTER_LAN4 = "198.51.100.1"
ROUTER_LAN6 = "2001:db8:1::1"
ROUTER_WAN4 = "203.0.113.1"
ROUTER_WAN6 = "2001:db8:2::1"
INTERNET4 = "203.0.113.10"
INTERNET6 = "2001:db8:2::10"
#: A second internet host (another destination: a package mirror, say), behind its own
#: router interface.
ROUTER_WAN2_4 = "192.0.2.1"
ROUTER_WAN2_6 = "2001:db8:3::1"
MIRROR4 = "192.0.2.10"
MIRROR6 = "2001:db8:3::10"
API4 = "198.51.100.5"
API6 = "2001:db8:1::5"
#: The MetalLB LoadBalancer IPs the tests use (on the LAN, owned by no one).
LB_IP4 = "198.51.100.200"
LB_IP6 = "2001:db8:1::200"
#: The cluster's pod CIDRs (every node's pod CIDR is inside).
CLUSTER_CIDR4 = "10.244.0.0/16"
CLUSTER_CIDR6 = "fd00:10:244::/48"
#: The recorder's ports on the internet host.
UDP_PORT = 5000
TCP_PORT = 5001
NODE_NAMES = ("node-a", "node-b", "node-c")
#: Pods get host numbers from here up (.10, .11 ... and ::10, ::11 ...).
FIRST_POD_HOST = 10
#: Interface names.
NODE_LAN_IF = "eth0"
POD_BRIDGE = "kube-bridge"
POD_IF = "eth0"
ROUTER_LAN_IF = "lan"
ROUTER_WAN_IF = "wan"
ROUTER_WAN2_IF = "wan2"
SWITCH_BRIDGE = "br0"


def _mac(*octets: int) -> str:
    """A locally administered unicast MAC ``02:00:<octets>``."""
    return ":".join(f"{b:02x}" for b in (0x02, 0x00, *octets))


def _mac_for_ipv4(address: str) -> str:
    return _mac(*ipaddress.IPv4Address(address).packed)


@dataclass(frozen=True)
class Host:
    """A non-node namespace of the lab: ``switch``, ``router``, ``internet``, ``mirror`` or
    ``api``."""

    role: str
    netns: str
    #: The address on the LAN (router: its LAN side; internet: its own), None for the switch.
    ipv4: str | None = None
    ipv6: str | None = None
    #: MAC of ``interface``.
    mac: str | None = None
    interface: str | None = None


@dataclass(frozen=True)
class Node:
    """A Kubernetes node: a namespace on the LAN with a ``kube-bridge`` for its pods."""

    #: The Kubernetes node name (``node-a`` ...).
    name: str
    netns: str
    #: LAN addresses (``eth0``).
    ipv4: str
    ipv6: str
    #: MAC of ``eth0`` (what MetalLB would announce for this node).
    mac: str
    pod_cidr4: str
    pod_cidr6: str
    #: The pods' gateways: the addresses of ``kube-bridge``.
    gateway4: str
    gateway6: str
    #: 1, 2, 3 for node-a, -b, -c (third octet of the pod CIDR).
    index: int
    interface: str = NODE_LAN_IF
    bridge: str = POD_BRIDGE


@dataclass(frozen=True)
class Pod:
    """A pod: a namespace with ``eth0`` plugged into its node's ``kube-bridge``."""

    name: str
    #: The node's name.
    node: str
    netns: str
    ipv4: str
    ipv6: str
    mac: str
    #: The host end of the pod's veth, in the node's namespace.
    host_interface: str
    interface: str = POD_IF


Target = Pod | Node | Host | str

# --------------------------------------------------------------------------- process helpers


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30) -> str:
    result = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip()
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {detail}")
    return result.stdout


def _run_parallel(
    commands: Iterable[tuple[Sequence[str], str | None]], timeout: float = 30
) -> None:
    """Run ``(argv, stdin)`` commands concurrently; raise for the first one that failed."""
    started = []
    for argv, stdin in commands:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((argv, stdin, process))
    errors = []
    for argv, stdin, process in started:
        try:
            _, stderr = process.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            errors.append(f"{' '.join(argv)} timed out")
            continue
        if process.returncode != 0:
            script = f"\n--- input:\n{stdin}" if stdin else ""
            errors.append(
                f"{' '.join(argv)} failed ({process.returncode}): {stderr.strip()}{script}"
            )
    if errors:
        raise RuntimeError("\n".join(errors))


def _netns_inodes(names: Iterable[str]) -> dict[tuple[int, int], str]:
    inodes = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(f"/run/netns/{name}")
            inodes[(st.st_dev, st.st_ino)] = name
    return inodes


def pids_in_namespaces(names: Iterable[str]) -> dict[int, str]:
    """Live (non-zombie) processes whose network namespace is one of ``names``: ``{pid: name}``."""
    inodes = _netns_inodes(names)
    found: dict[int, str] = {}
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone, or a zombie
        name = inodes.get((st.st_dev, st.st_ino))
        if name is not None:
            found[int(entry)] = name
    return found


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    output = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def destroy_namespaces(names: Sequence[str], grace: float = 1.0) -> None:
    """Stop every process in the namespaces (SIGTERM, SIGKILL after ``grace``), then delete them."""
    names = list(names)
    if not names:
        return
    pids = pids_in_namespaces(names)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        pids = wait_until(
            lambda: pids_in_namespaces(names),
            grace,
            interval=0.02,
            message="the processes to exit on SIGTERM",
            accept=lambda pids: not pids,
        )
    except TimeoutError:
        pids = pids_in_namespaces(names)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input="".join(f"netns del {name}\n" for name in names),
        capture_output=True,
        text=True,
        timeout=60,
    )


# --------------------------------------------------------------------------- the lab

#: In a default workdir: keep it (``keep_workdir=True``), even after its process died.
KEEP_MARKER = ".keep"
_PREFIX_RE = re.compile(r"^mll(\d+)x\d+-")
_instances = itertools.count()
_open_labs: set[Lab] = set()


@atexit.register
def _close_forgotten_labs() -> None:
    for lab in list(_open_labs):
        with contextlib.suppress(Exception):
            lab.close()


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, e.g. a killed process not reaped yet, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cleanup_stale_namespaces() -> list[str]:
    """Delete lab namespaces (``mll<pid>x<n>-*``) left by processes that no longer exist.

    Their default working directories (``<tmp>/mll<pid>x<n>-*``) go too, except
    those of labs made with ``keep_workdir=True``. Returns
    the namespaces deleted. ``Lab.start`` calls it.
    """
    stale = []
    for name in list_namespaces():
        match = _PREFIX_RE.match(name)
        if match and not _process_alive(int(match.group(1))):
            stale.append(name)
    destroy_namespaces(stale)
    with contextlib.suppress(OSError):
        for entry in Path(tempfile.gettempdir()).iterdir():
            match = _PREFIX_RE.match(entry.name)
            if (
                match
                and entry.is_dir()
                and not (entry / KEEP_MARKER).exists()
                and not _process_alive(int(match.group(1)))
            ):
                shutil.rmtree(entry, ignore_errors=True)
    return stale


class Lab:
    """The lab: build it with ``with Lab(...) as lab`` (or :meth:`start` / :meth:`close`).

    Parameters:
        masquerade: which iptables flavour writes kube-router's masquerade and
            chains on the nodes: ``"legacy"`` (``iptables-legacy``), ``"nft"``
            (``iptables-nft``) or ``"none"`` (no rules at all).
        rp_filter: the nodes' ``net.ipv4.conf.{all,default}.rp_filter`` (2 = loose).
        recorder: start the recorder on the internet host.
        workdir: where logs go (default: a new short directory in /tmp, removed
            on close unless ``keep_workdir``; a given one is never removed).
            Short on purpose: agents' Unix sockets may live under it (107-byte
            limit). Before :meth:`start` it is a placeholder path.
        ready_timeout: bound for the wait until everything is reachable.

    Attributes (after start): ``prefix``, ``workdir``, ``nodes`` (name -> :class:`Node`),
    ``pods`` (name -> :class:`Pod`), ``switch``, ``router``, ``internet``, ``mirror``,
    ``api`` (:class:`Host`), ``recorder`` (:class:`Recorder` on the internet host),
    ``setup_seconds``.
    """

    def __init__(
        self,
        masquerade: MasqueradeMode = "legacy",
        *,
        rp_filter: int = 2,
        recorder: bool = True,
        workdir: Path | str | None = None,
        keep_workdir: bool = False,
        ready_timeout: float = 15.0,
    ) -> None:
        if masquerade not in ("legacy", "nft", "none"):
            raise ValueError(f"masquerade must be 'legacy', 'nft' or 'none', not {masquerade!r}")
        self.masquerade: MasqueradeMode = masquerade
        self.rp_filter = rp_filter
        self.ready_timeout = ready_timeout
        self.keep_workdir = keep_workdir
        self._want_recorder = recorder
        self._given_workdir = Path(workdir) if workdir is not None else None
        existing = set(list_namespaces())
        while True:
            self.prefix = f"mll{os.getpid()}x{next(_instances)}"
            if not any(name.startswith(self.prefix + "-") for name in existing):
                break
        ns = self._ns
        self.switch = Host("switch", ns("switch"))
        self.router = Host(
            "router",
            ns("router"),
            ROUTER_LAN4,
            ROUTER_LAN6,
            _mac_for_ipv4(ROUTER_LAN4),
            ROUTER_LAN_IF,
        )
        self.internet = Host(
            "internet", ns("internet"), INTERNET4, INTERNET6, _mac_for_ipv4(INTERNET4), "eth0"
        )
        self.mirror = Host("mirror", ns("mirror"), MIRROR4, MIRROR6, _mac_for_ipv4(MIRROR4), "eth0")
        self.api = Host("api", ns("api"), API4, API6, _mac_for_ipv4(API4), "eth0")
        self.nodes: dict[str, Node] = {}
        for index, name in enumerate(NODE_NAMES, start=1):
            ipv4 = f"198.51.100.{10 + index}"
            self.nodes[name] = Node(
                name=name,
                netns=ns(name),
                ipv4=ipv4,
                ipv6=f"2001:db8:1::{10 + index}",
                mac=_mac_for_ipv4(ipv4),
                pod_cidr4=f"10.244.{index}.0/24",
                pod_cidr6=f"fd00:10:244:{index}::/64",
                gateway4=f"10.244.{index}.1",
                gateway6=f"fd00:10:244:{index}::1",
                index=index,
            )
        self.pods: dict[str, Pod] = {}
        self.recorder: Recorder | None = None
        self.workdir: Path = self._given_workdir or Path("/nonexistent")
        self.setup_seconds: float | None = None
        self._created: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._recorders: list[Recorder] = []
        self._streams: list[Stream] = []
        self._pod_hosts: dict[str, set[int]] = {name: set() for name in NODE_NAMES}
        self._veths = itertools.count()
        self._started = False
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Lab:
        """Build everything and wait until it is reachable; on any failure, tear down and re-raise."""
        if self._started:
            raise RuntimeError("a Lab can be started only once")
        self._started = True
        _open_labs.add(self)
        began = time.monotonic()
        try:
            cleanup_stale_namespaces()
            self._build()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - began
        return self

    def close(self) -> None:
        """Stop every process, delete every namespace and the workdir. Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            for stream in self._streams:
                with contextlib.suppress(Exception):
                    stream.stop()
            for recorder in self._recorders:
                with contextlib.suppress(Exception):
                    recorder.stop()
            for process in self._processes:
                with contextlib.suppress(Exception):
                    stop_process(process, grace=1.0)
            names = set(self._created)
            with contextlib.suppress(Exception):
                names.update(n for n in list_namespaces() if n.startswith(self.prefix + "-"))
            # Pods first, so that nothing runs in them when their nodes go.
            ordered = sorted(names, key=lambda n: (0 if "-pod-" in n else 1, n))
            with contextlib.suppress(Exception):
                destroy_namespaces(ordered)
            if not self.keep_workdir and self._given_workdir is None and self.workdir.is_dir():
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            _open_labs.discard(self)

    def _ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    # ----------------------------------------------------------------- build

    def _infra_namespaces(self) -> list[str]:
        return [
            self.switch.netns,
            self.router.netns,
            self.internet.netns,
            self.mirror.netns,
            self.api.netns,
            *(node.netns for node in self.nodes.values()),
        ]

    def _create_namespaces(self, names: Sequence[str], sysctls: dict[str, list[str]]) -> None:
        self._created.extend(names)
        _run(["ip", "-batch", "-"], input="".join(f"netns add {name}\n" for name in names))
        common = [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_ra=0",
            "net.ipv6.conf.default.accept_ra=0",
        ]
        commands: list[tuple[Sequence[str], str | None]] = []
        for name in names:
            argv = ["sysctl", "-qw", *common, *sysctls.get(name, [])]
            commands.append((netns_command(name, argv), None))
            commands.append((["ip", "-n", name, "link", "set", "lo", "up"], None))
        _run_parallel(commands)

    def _build(self) -> None:
        if self._given_workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
            if self.keep_workdir:
                (self.workdir / KEEP_MARKER).touch()
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)

        forwarding = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        rp_off = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        rp_node = [
            f"net.ipv4.conf.all.rp_filter={self.rp_filter}",
            f"net.ipv4.conf.default.rp_filter={self.rp_filter}",
        ]
        sysctls = {
            self.switch.netns: [
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
            # The router must forward packets with pod sources it cannot route back to.
            self.router.netns: [*forwarding, *rp_off],
            self.internet.netns: rp_off,
            self.mirror.netns: rp_off,
            self.api.netns: rp_off,
        }
        for node in self.nodes.values():
            sysctls[node.netns] = [*forwarding, *rp_node]
        self._create_namespaces(self._infra_namespaces(), sysctls)

        # Links, created directly inside the lab's namespaces (one ip process).
        sw = self.switch.netns
        bridge_opts = "type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
        links = [
            f"link add {SWITCH_BRIDGE} netns {sw} {bridge_opts}",
            f"link add {ROUTER_LAN_IF} netns {self.router.netns} address {self.router.mac} "
            f"type veth peer name router netns {sw}",
            f"link add {ROUTER_WAN_IF} netns {self.router.netns} address {_mac_for_ipv4(ROUTER_WAN4)} "
            f"type veth peer name eth0 netns {self.internet.netns} address {self.internet.mac}",
            f"link add {ROUTER_WAN2_IF} netns {self.router.netns} "
            f"address {_mac_for_ipv4(ROUTER_WAN2_4)} "
            f"type veth peer name eth0 netns {self.mirror.netns} address {self.mirror.mac}",
            f"link add eth0 netns {self.api.netns} address {self.api.mac} "
            f"type veth peer name api netns {sw}",
        ]
        for node in self.nodes.values():
            links.append(
                f"link add {NODE_LAN_IF} netns {node.netns} address {node.mac} "
                f"type veth peer name {node.name} netns {sw}"
            )
            links.append(
                f"link add {POD_BRIDGE} netns {node.netns} address {_mac(10, 244, node.index, 1)} "
                f"{bridge_opts}"
            )
        _run(["ip", "-batch", "-"], input="\n".join(links) + "\n")

        # Addresses, ports, routes: one ip process per namespace, all at once.
        scripts: dict[str, list[str]] = {}
        ports = ["router", "api", *self.nodes]
        scripts[sw] = [
            *(f"link set {port} master {SWITCH_BRIDGE}" for port in ports),
            *(f"link set {port} up" for port in ports),
            f"link set {SWITCH_BRIDGE} up",
        ]
        scripts[self.router.netns] = [
            f"addr add {ROUTER_LAN4}/24 dev {ROUTER_LAN_IF}",
            f"addr add {ROUTER_LAN6}/64 dev {ROUTER_LAN_IF} nodad",
            f"addr add {ROUTER_WAN4}/24 dev {ROUTER_WAN_IF}",
            f"addr add {ROUTER_WAN6}/64 dev {ROUTER_WAN_IF} nodad",
            f"addr add {ROUTER_WAN2_4}/24 dev {ROUTER_WAN2_IF}",
            f"addr add {ROUTER_WAN2_6}/64 dev {ROUTER_WAN2_IF} nodad",
            f"link set {ROUTER_LAN_IF} up",
            f"link set {ROUTER_WAN_IF} up",
            f"link set {ROUTER_WAN2_IF} up",
        ]
        scripts[self.internet.netns] = [
            f"addr add {INTERNET4}/24 dev eth0",
            f"addr add {INTERNET6}/64 dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {ROUTER_WAN4}",
            f"route add ::/0 via {ROUTER_WAN6}",
        ]
        scripts[self.mirror.netns] = [
            f"addr add {MIRROR4}/24 dev eth0",
            f"addr add {MIRROR6}/64 dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {ROUTER_WAN2_4}",
            f"route add ::/0 via {ROUTER_WAN2_6}",
        ]
        scripts[self.api.netns] = [
            f"addr add {API4}/24 dev eth0",
            f"addr add {API6}/64 dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {ROUTER_LAN4}",
            f"route add ::/0 via {ROUTER_LAN6}",
        ]
        for node in self.nodes.values():
            lines = [
                f"addr add {node.ipv4}/24 dev {NODE_LAN_IF}",
                f"addr add {node.ipv6}/64 dev {NODE_LAN_IF} nodad",
                f"link set {NODE_LAN_IF} up",
                f"addr add {node.gateway4}/24 dev {POD_BRIDGE}",
                f"addr add {node.gateway6}/64 dev {POD_BRIDGE} nodad",
                f"link set {POD_BRIDGE} up",
            ]
            for other in self.nodes.values():
                if other is not node:
                    lines.append(f"route add {other.pod_cidr4} via {other.ipv4}")
                    lines.append(f"route add {other.pod_cidr6} via {other.ipv6}")
            lines.append(f"route add default via {ROUTER_LAN4}")
            lines.append(f"route add ::/0 via {ROUTER_LAN6}")
            scripts[node.netns] = lines
        commands: list[tuple[Sequence[str], str | None]] = [
            (["ip", "-n", name, "-batch", "-"], "\n".join(lines) + "\n")
            for name, lines in scripts.items()
        ]
        for node in self.nodes.values():
            commands.extend(self._masquerade_commands(node))
        _run_parallel(commands)

        if self._want_recorder:
            self.recorder = self.start_recorder(
                self.internet, log_path=self.workdir / "internet.jsonl"
            )
        self._wait_reachable()

    def _masquerade_commands(self, node: Node) -> list[tuple[Sequence[str], str | None]]:
        if self.masquerade == "none":
            return []
        commands: list[tuple[Sequence[str], str | None]] = []
        for family, cidr in ((4, CLUSTER_CIDR4), (6, CLUSTER_CIDR6)):
            binary = f"{'ip' if family == 4 else 'ip6'}tables-{self.masquerade}-restore"
            rules = kube_router_rules(cidr)
            commands.append((netns_command(node.netns, [binary, "-w", "10", "--noflush"]), rules))
        return commands

    def _wait_reachable(self) -> None:
        """Ping along every path the lab promises until all answer (bounded)."""
        checks: list[tuple[str, str]] = []
        for node in self.nodes.values():
            checks += [(node.netns, INTERNET4), (node.netns, INTERNET6)]
            checks += [(node.netns, MIRROR4), (node.netns, MIRROR6)]
            checks += [
                (node.netns, other.ipv6) for other in self.nodes.values() if other is not node
            ]
        checks += [(self.api.netns, ROUTER_LAN4), (self.api.netns, ROUTER_LAN6)]
        checks += [(self.api.netns, n.ipv4) for n in self.nodes.values()]
        self._ping_all(checks, self.ready_timeout)

    def _ping_all(self, checks: Sequence[tuple[str, str]], timeout: float) -> None:
        pending = list(checks)

        def failed_pings() -> list[tuple[str, str]]:
            nonlocal pending
            processes = [
                (
                    check,
                    subprocess.Popen(
                        netns_command(
                            check[0], ["ping", "-n", "-q", "-c", "1", "-W", "1", check[1]]
                        ),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
                for check in pending
            ]
            pending = [check for check, process in processes if process.wait() != 0]
            return pending

        wait_until(
            failed_pings,
            timeout,
            message="every ping of the lab to answer (last seen: the failed ones)",
            accept=lambda failed: not failed,
        )

    # ----------------------------------------------------------------- lookup

    def node(self, name: str) -> Node:
        """The node named ``name`` (``node-a``, ``node-b``, ``node-c``)."""
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r}; nodes: {sorted(self.nodes)}") from None

    def pod(self, name: str) -> Pod:
        return self.pods[name]

    def netns_names(self) -> list[str]:
        """Every namespace of the lab that exists now (infrastructure, nodes, pods)."""
        return sorted(n for n in list_namespaces() if n.startswith(self.prefix + "-"))

    def netns_of(self, target: Target) -> str:
        """The namespace name of a Pod/Node/Host, or of a role (``router``, ``node-a``, a pod's
        name); any other string is taken as a namespace name."""
        if isinstance(target, Pod | Node | Host):
            return target.netns
        hosts = (self.switch, self.router, self.internet, self.mirror, self.api)
        roles = {h.role: h.netns for h in hosts}
        if target in roles:
            return roles[target]
        if target in self.nodes:
            return self.nodes[target].netns
        if target in self.pods:
            return self.pods[target].netns
        return target

    # ----------------------------------------------------------------- commands

    def exec(
        self,
        target: Target,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 30,
    ) -> str:
        """Run ``argv`` inside ``target``'s namespace and return its stdout (raise on failure if ``check``)."""
        command = netns_command(self.netns_of(target), argv)
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout

    def spawn(self, target: Target, *argv: str, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``target``'s namespace (``subprocess.Popen`` arguments allowed).

        The process is stopped (SIGTERM, then SIGKILL) and reaped on close; stop it
        earlier with :func:`tests.lab.traffic.stop_process`.
        """
        process: subprocess.Popen[Any] = subprocess.Popen(
            netns_command(self.netns_of(target), argv), **popen_kwargs
        )
        self._processes.append(process)
        return process

    # ----------------------------------------------------------------- pods

    def add_pod(self, node: str, name: str, *, wait: bool = True) -> Pod:
        """Create pod ``name`` on ``node``: next free host number, both families, default routes.

        With ``wait``, returns once the pod reaches its gateway in both families.
        """
        host = self.node(node)
        if name in self.pods:
            raise ValueError(f"pod {name!r} exists already")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"pod name {name!r}: use letters, digits, '.', '_', '-'")
        used = self._pod_hosts[node]
        number = next(n for n in itertools.count(FIRST_POD_HOST) if n not in used)
        if number > 254:
            raise RuntimeError(f"no free pod address on {node}")
        used.add(number)
        pod = Pod(
            name=name,
            node=node,
            netns=self._ns(f"pod-{name}"),
            ipv4=f"10.244.{host.index}.{number}",
            ipv6=f"fd00:10:244:{host.index}::{number}",
            mac=_mac(10, 244, host.index, number),
            host_interface=f"veth{next(self._veths):x}",
        )
        self.pods[name] = pod
        try:
            self._create_namespaces([pod.netns], {})
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    pod.host_interface,
                    "netns",
                    host.netns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    POD_IF,
                    "netns",
                    pod.netns,
                    "address",
                    pod.mac,
                ]
            )
            _run_parallel(
                [
                    (
                        ["ip", "-n", host.netns, "-batch", "-"],
                        f"link set {pod.host_interface} master {POD_BRIDGE}\n"
                        f"link set {pod.host_interface} up\n",
                    ),
                    (
                        ["ip", "-n", pod.netns, "-batch", "-"],
                        f"addr add {pod.ipv4}/24 dev {POD_IF}\n"
                        f"addr add {pod.ipv6}/64 dev {POD_IF} nodad\n"
                        f"link set {POD_IF} up\n"
                        f"route add default via {host.gateway4}\n"
                        f"route add ::/0 via {host.gateway6}\n",
                    ),
                ]
            )
            if wait:
                self._ping_all([(pod.netns, host.gateway4), (pod.netns, host.gateway6)], 10.0)
        except BaseException:
            self.remove_pod(pod)
            raise
        return pod

    def remove_pod(self, pod: Pod | str) -> None:
        """Delete a pod: stop its processes, delete its namespace (and so its veth), free its IPs."""
        if isinstance(pod, str):
            pod = self.pods[pod]
        for stream in [s for s in self._streams if s.netns == pod.netns]:
            stream.stop()
        for recorder in [r for r in self._recorders if r.netns == pod.netns]:
            recorder.stop()
        destroy_namespaces([pod.netns])
        with contextlib.suppress(ValueError):
            self._created.remove(pod.netns)
        self.pods.pop(pod.name, None)
        number = int(pod.ipv4.rsplit(".", 1)[1])
        self._pod_hosts[pod.node].discard(number)

    # ----------------------------------------------------------------- MetalLB L2

    def announce(self, lb_ip: str, node: str) -> None:
        """Simulate MetalLB's L2 announcement: the router's neighbour entry for ``lb_ip`` -> ``node``'s MAC."""
        mac = self.node(node).mac
        self.exec(
            self.router,
            "ip",
            "neigh",
            "replace",
            lb_ip,
            "lladdr",
            mac,
            "dev",
            ROUTER_LAN_IF,
            "nud",
            "permanent",
        )

    def withdraw(self, lb_ip: str) -> None:
        """Remove the router's neighbour entry for ``lb_ip`` (no error when there is none)."""
        self.exec(self.router, "ip", "neigh", "del", lb_ip, "dev", ROUTER_LAN_IF, check=False)

    def neighbour(self, address: str) -> str | None:
        """The router's LAN neighbour MAC for ``address`` (None when it has no usable entry)."""
        output = self.exec(self.router, "ip", "neigh", "show", "to", address, "dev", ROUTER_LAN_IF)
        for line in output.splitlines():
            fields = line.split()
            if "lladdr" in fields and "FAILED" not in fields:
                return fields[fields.index("lladdr") + 1]
        return None

    def announced_node(self, lb_ip: str) -> str | None:
        """The node whose MAC the router has for ``lb_ip``, if any."""
        mac = self.neighbour(lb_ip)
        return next((n.name for n in self.nodes.values() if n.mac == mac), None)

    # ----------------------------------------------------------------- traffic

    def start_recorder(
        self,
        target: Target,
        *,
        log_path: Path | None = None,
        udp_port: int = UDP_PORT,
        tcp_port: int = TCP_PORT,
        families: Sequence[Family] = (4, 6),
    ) -> Recorder:
        """Start a recorder (UDP+TCP listener answering with the source it saw) in ``target``."""
        netns = self.netns_of(target)
        if log_path is None:
            log_path = (
                self.workdir / f"recorder-{netns.removeprefix(self.prefix + '-')}-{udp_port}.jsonl"
            )
        recorder = Recorder(
            netns, log_path, udp_port=udp_port, tcp_port=tcp_port, families=families
        )
        self._recorders.append(recorder)
        return recorder.start()

    def _internet_target(self, family: Family) -> str:
        return INTERNET4 if family == 4 else INTERNET6

    def probe(
        self,
        source: Target,
        family: Family = 4,
        proto: Proto = "udp",
        timeout: float = 2.0,
        *,
        target: str | None = None,
        port: int | None = None,
    ) -> ProbeResult:
        """One probe from ``source`` to the internet recorder (or a recorder at ``target``).

        Returns the source address the recorder saw (``.source``), and ``.outcome``
        (``ok``/``rejected``/``timeout``/``error``). ``family`` is ignored when
        ``target`` is given (taken from the address).
        """
        if target is None:
            target = self._internet_target(family)
        if port is None:
            port = UDP_PORT if proto == "udp" else TCP_PORT
        return probe(self.netns_of(source), target, port, proto=proto, timeout=timeout)

    def stream(
        self,
        source: Target,
        family: Family = 4,
        *,
        rate: float = 20.0,
        udp: bool = True,
        tcp: bool = True,
        stall: float = 2.0,
        target: str | None = None,
    ) -> Stream:
        """Start continuous UDP and/or TCP traffic from ``source`` to the internet recorder.

        Stopped on close or by :meth:`Stream.stop` (also a context manager).
        """
        netns = self.netns_of(source)
        stream = Stream(
            netns,
            target or self._internet_target(family),
            self.workdir / f"stream-{len(self._streams)}.jsonl",
            udp_port=UDP_PORT if udp else None,
            tcp_port=TCP_PORT if tcp else None,
            rate=rate,
            stall=stall,
        )
        self._streams.append(stream)
        return stream.start()

    def _internet_recorder(self) -> Recorder:
        if self.recorder is None:
            raise RuntimeError("this lab runs no recorder (recorder=False)")
        return self.recorder

    def records(self, **criteria: Any) -> list[Record]:
        """The internet recorder's records (``since=``, ``proto=``, ``family=``, ``event=``,
        ``token_prefix=``, ``src=``; see :func:`tests.lab.traffic.filter_records`)."""
        return self._internet_recorder().records(**criteria)

    def sources_seen(self, since: float | None = None, **criteria: Any) -> collections.Counter[str]:
        """Per source address, how many datagrams/TCP lines the internet host received."""
        return self._internet_recorder().sources_seen(since=since, **criteria)

    def wait_for_sources(
        self, expected: str, since: float | None = None, timeout: float = 5.0, **criteria: Any
    ) -> collections.Counter[str]:
        """Wait until the internet host has seen ``expected`` as a source; return all sources seen."""

        def seen() -> collections.Counter[str] | None:
            sources = self.sources_seen(since, **criteria)
            return sources if expected in sources else None

        return wait_until(
            seen,
            timeout,
            message=lambda: f"{expected} among {dict(self.sources_seen(since, **criteria))}",
        )


def kube_router_rules(cluster_cidr: str) -> str:
    """kube-router's masquerade and netpol chain skeleton, as ``iptables-restore --noflush`` input."""
    return (
        "*filter\n"
        ":KUBE-ROUTER-INPUT - [0:0]\n"
        ":KUBE-ROUTER-FORWARD - [0:0]\n"
        ":KUBE-ROUTER-OUTPUT - [0:0]\n"
        '-I INPUT 1 -m comment --comment "kube-router netpol - 4IA2OSFRMVNDXBVV" '
        "-j KUBE-ROUTER-INPUT\n"
        '-I FORWARD 1 -m comment --comment "kube-router netpol - TEMCG2JMHZYE7H7T" '
        "-j KUBE-ROUTER-FORWARD\n"
        '-I OUTPUT 1 -m comment --comment "kube-router netpol - VEAAIY32XVBHCSCY" '
        "-j KUBE-ROUTER-OUTPUT\n"
        f'-A KUBE-ROUTER-FORWARD -s {cluster_cidr} -m comment --comment "allow pod traffic" -j ACCEPT\n'
        f'-A KUBE-ROUTER-FORWARD -d {cluster_cidr} -m comment --comment "allow pod traffic" -j ACCEPT\n'
        "COMMIT\n"
        "*nat\n"
        f"-A POSTROUTING -s {cluster_cidr} ! -d {cluster_cidr} "
        '-m comment --comment "SNAT for outbound traffic from cluster" -j MASQUERADE\n'
        "COMMIT\n"
    )
