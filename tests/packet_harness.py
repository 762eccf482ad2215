"""The packet harness of the firewall tests: small topologies of namespaces and the traffic across them.

Both backends' packet tests (``test_firewall_nftables.py``,
``test_firewall_iptables.py``) and the audit's build the same kind of
topology: a node namespace that forwards, a veth to a pod namespace and one to
a peer (the "internet"), the node's own masquerade as kube-router writes it,
and policy routing of marked packets. They then send packets from the pod and
look at the source the peer saw. This module has the wiring (:func:`link`,
:func:`route`, :func:`forward`, :func:`masquerade`, :func:`route_marked`; and
:func:`onlink_test_prefixes` for the routing tests' next hops), the
processes (:func:`script_in`, :func:`wait_listening`) and the probes
(:func:`udp_probe` against :data:`WHO_AM_I_SERVER`, :func:`udp_send`,
:func:`tcp_connect`, :func:`ping_from`); each test module keeps its own
addresses and what it asserts.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any, Literal

from tests.lab.traffic import wait_ready
from tests.netns import sh
from tests.waiting import wait_until

# --- wiring ------------------------------------------------------------------------------


def add_addresses(ns: str, device: str, *cidrs: str) -> None:
    """Put ``cidrs`` on ``device`` in ``ns`` (IPv6 ones without duplicate address detection)."""
    for cidr in cidrs:
        sh("ip", "-n", ns, "addr", "add", cidr, "dev", device, *(["nodad"] if ":" in cidr else []))


def link(
    node: str,
    device: str,
    node_cidrs: tuple[str, ...],
    far: str,
    far_cidrs: tuple[str, ...],
    far_device: str = "eth0",
) -> None:
    """A veth pair, addressed and up: ``device`` in ``node``, ``far_device`` in ``far``."""
    sh("ip", "-n", node, "link", "add", device, "type", "veth", "peer", "name", far_device,
       "netns", far)  # fmt: skip
    for ns, dev, cidrs in ((node, device, node_cidrs), (far, far_device, far_cidrs)):
        add_addresses(ns, dev, *cidrs)
        sh("ip", "-n", ns, "link", "set", dev, "up")


def onlink_test_prefixes(ns: str) -> None:
    """A veth pair v0/v1 inside ``ns``, up, with 192.0.2.1/24 and 2001:db8::1/64 on v0:
    next hops in those prefixes are valid there (the routing tests' gateways)."""
    sh("ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    sh("ip", "-n", ns, "link", "set", "v0", "up")
    sh("ip", "-n", ns, "link", "set", "v1", "up")
    add_addresses(ns, "v0", "192.0.2.1/24", "2001:db8::1/64")


def route(ns: str, destination: str, via: str, *options: str) -> None:
    """``ip route add <destination> via <via>`` in ``ns`` (the family is ``via``'s)."""
    family = ["-6"] if ":" in via else []
    sh("ip", "-n", ns, *family, "route", "add", destination, "via", via, *options)


def forward(ns: str) -> None:
    """Make ``ns`` a router for both families."""
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=ns)
    sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", netns=ns)


def masquerade(ns: str, source: str, exclude: str, mode: Literal["legacy", "nft"]) -> None:
    """The node's own masquerade of its pods' traffic, as kube-router writes it (legacy
    iptables or iptables-nft; the family is ``source``'s). It also has conntrack track
    every flow from the start, as on a node."""
    tool = f"{'ip6tables' if ':' in source else 'iptables'}-{mode}"
    sh(tool, "-t", "nat", "-A", "POSTROUTING", "-s", source, "!", "-d", exclude,
       "-j", "MASQUERADE", netns=ns)  # fmt: skip


def route_marked(ns: str, *table_route: str, mark: str = "0x100000/0xf00000") -> None:
    """Policy routing of packets with gateway slot ``mark`` into table 100, which holds
    ``table_route`` (``"default", "via", <gateway>`` or ``"blackhole", "default"``)."""
    sh("ip", "-n", ns, "rule", "add", "fwmark", mark, "lookup", "100", "priority", "100")
    sh("ip", "-n", ns, "route", "add", *table_route, "table", "100")


# --- processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def script_in(
    ns: str, script: str, *args: str, ready_line: bool = False, **popen: Any
) -> Iterator[subprocess.Popen[str]]:
    """Python ``script`` (source text) running in ``ns``; killed and reaped afterwards.

    With ``ready_line``, wait (bounded) until it prints ``ready``; its stdout is then a pipe.
    """
    if ready_line:
        popen.setdefault("stdout", subprocess.PIPE)
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args], text=True, **popen
    )
    try:
        if ready_line:
            wait_ready(process, f"script in {ns}", timeout=10)
        yield process
    finally:
        process.kill()
        process.wait(5)


def wait_listening(ns: str, port: int, proto: Literal["tcp", "udp"], timeout: float = 10) -> None:
    """Wait until something listens on ``port`` in ``ns`` (as ``ss`` shows it)."""
    wait_until(
        lambda: sh("ss", "-ltn" if proto == "tcp" else "-lun", netns=ns),
        timeout,
        message=f"{proto} :{port} listening in {ns}",
        accept=lambda listening: f":{port}" in listening,
    )


# --- probes ------------------------------------------------------------------------------

WHO_AM_I_PORT = 9999
WHO_AM_I_SERVER = textwrap.dedent(
    """
    import select, socket, sys
    socks = []
    # One socket per address, so that a reply leaves from the address asked.
    for address in sys.argv[1:]:
        s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((address, 9999))
        socks.append(s)
    print("ready", flush=True)
    while True:
        for s in select.select(socks, [], [])[0]:
            data, peer = s.recvfrom(2048)
            s.sendto(peer[0].encode(), peer)
    """
)
"""A UDP server on port 9999 of each address given that answers with the source it saw
(run it with :func:`script_in`, ``ready_line=True``; probe it with :func:`udp_probe`)."""


def udp_probe(source: str, destination: str, sport: int) -> str:
    """Send a datagram from ``source`` to the :data:`WHO_AM_I_SERVER` at ``destination`` and
    return what it saw as the source (run it in the pod's namespace, ``run_in_netns``).

    Returns ``"rejected:<errno name>"`` when an ICMP error comes back instead, ``"timeout"``
    when nothing does.
    """
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((source, sport))
        s.connect((destination, WHO_AM_I_PORT))
        s.settimeout(0.5)
        for _ in range(6):
            try:
                s.send(b"who am i")
                return s.recv(100).decode()
            except TimeoutError:
                continue
            except OSError as error:
                return f"rejected:{errno.errorcode.get(error.errno or 0, error.errno)}"
    return "timeout"


def udp_send(source: str, sport: int, destination: str, dport: int) -> None:
    """One datagram from ``source``:``sport`` (run it in the sender's namespace)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((source, sport))
        s.sendto(b"from the pod", (destination, dport))


TCP_LISTENER = """
import socket
server = socket.create_server(("0.0.0.0", 8080))
while True:
    connection, _ = server.accept()
    connection.close()
"""
"""Accepts (and closes) TCP connections on port 8080 (IPv4)."""

TCP_CLIENT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 8080), timeout=2).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as error:
    print(type(error).__name__)
"""


def tcp_connect(ns: str, address: str) -> str:
    """Connect from ``ns`` to port 8080 of ``address``: ``connected``, ``refused`` (a TCP
    reset or an ICMP port unreachable) or the error's name (``TimeoutError``)."""
    return sh(sys.executable, "-c", TCP_CLIENT, address, netns=ns).strip()


def ping_from(ns: str, address: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``ping -n <options> -W 1 <address>`` from ``ns`` (one reply waited for a second)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-n", *options, "-W", "1", address],
        capture_output=True,
        text=True,
        timeout=20,
    )
