"""One agent per node: find a running neighbour before anything is touched.

``metaleg-supervisor run`` calls :func:`claim_node` after validating the
configuration and before it wipes the metrics directory, binds a socket or
starts a worker. Three kinds of neighbour are refused:

1. **another supervisor with the same METALEG_RUN_DIR**: it holds an exclusive
   ``flock`` on ``<run dir>/supervisor.lock`` (held for the supervisor's life,
   released by the kernel when it dies, however it dies; the workers do not
   inherit it);
2. **another supervisor on this node with another METALEG_RUN_DIR**: it has
   bound the abstract Unix socket ``@metaleg-agent``. Abstract socket names
   belong to a network namespace, and the agent runs in the node's (hostNetwork),
   so the name is node-wide without any shared file: two pods with different
   hostPath directories, or a copy started by hand on the node, still meet there.
   Like the lock, the name goes away with the process. The socket listens, so
   the second agent learns the first one's pid (``SO_PEERCRED``);
3. **the Go original (MetalEG v0.2.1)**, as far as it can be seen from here: it
   serves its metrics and probes on the same default ports (``:21793``,
   ``:21794``) in the node's network namespace. A configured address that
   another process already listens on is refused; when that process answers
   ``/metrics`` with Go runtime or controller-runtime series, it is named as
   probably the Go original. The limits: a Go original started with other
   ports, or with both disabled, is not seen at start (its process is in
   another pod's PID namespace; its chains cannot tell a running original from
   the leftovers that an upgrade leaves and metaleg removes).

A refusal is one line on stderr and exit status 4 (``EXIT_NEIGHBOUR``), and a
Warning Event on this node's Node object where the API server can be reached
(:func:`metaleg.node_events.post_node_event`; the Events of a Node are in namespace ``default``,
``kubectl describe node`` shows them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import urllib.request

from metaleg.config import BindAddress, Config, ConfigError

LOCK_FILE = "supervisor.lock"
NODE_SOCKET = "metaleg-agent"
"""The abstract Unix socket name (``@metaleg-agent``) a running supervisor holds."""
PROBE_TIMEOUT = 1.0
GO_SIGNS = (b"go_goroutines", b"controller_runtime_", b"go_memstats_")
"""Series that a Go program's metrics endpoint (prometheus client_golang,
controller-runtime) serves and metaleg's never does."""


EVENT_REASON = "SecondAgentRefused"
"""The reason of the Warning Event a refusal posts on the Node
(:func:`metaleg.node_events.post_node_event`)."""


class NeighbourFound(RuntimeError):
    """Another agent is active on this node; the message says which and how it was found."""


class NodeClaim:
    """What the running supervisor holds so that the next one finds it: the lock and the
    abstract socket. Both are released by the kernel when the process ends."""

    def __init__(self, lock_fd: int, node_socket: socket.socket) -> None:
        self.lock_fd = lock_fd
        self.node_socket = node_socket

    def release(self) -> None:
        self.node_socket.close()
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


def claim_node(
    config: Config, *, node_socket: str = NODE_SOCKET, check_ports: bool = True
) -> NodeClaim:
    """Take the run directory's lock and the node-wide socket name, or raise
    :class:`NeighbourFound`; then check that no other process serves on the metrics and
    probe addresses (:class:`NeighbourFound` for a Go program, :class:`ConfigError` for
    any other). The run directory must exist. Changes nothing but the lock file's content
    (the pid)."""
    lock_fd = _lock(config.run_dir)
    try:
        bound = _bind_node_socket(node_socket, config.run_dir)
    except BaseException:
        os.close(lock_fd)
        raise
    claim = NodeClaim(lock_fd, bound)
    try:
        if check_ports:
            for variable, address in (
                ("METRICS_BIND_ADDRESS", config.metrics_bind_address),
                ("HEALTH_PROBE_BIND_ADDRESS", config.health_probe_bind_address),
            ):
                if address is not None:
                    _check_port(variable, address)
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        claim.release()
        raise
    return claim


def _lock(run_dir: str) -> int:
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise NeighbourFound(
            f"another metaleg supervisor{who} runs with METALEG_RUN_DIR={run_dir} "
            f"(it holds {path}); refusing to start a second one"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _bind_node_socket(name: str, run_dir: str) -> socket.socket:
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        bound.bind("\0" + name)
        bound.listen(64)
    except OSError as error:
        bound.close()
        if error.errno != errno.EADDRINUSE:
            raise
        pid = _holder_pid(name)
        who = f" (pid {pid})" if pid else ""
        raise NeighbourFound(
            f"another metaleg agent{who} runs on this node with another METALEG_RUN_DIR than "
            f"{run_dir} (it holds the abstract socket @{name} of the host network namespace); "
            "refusing to start a second one"
        ) from None
    return bound


def _holder_pid(name: str) -> int:
    """The pid of the process that listens on the abstract socket ``name`` (0: unknown,
    e.g. in a PID namespace where it is not visible)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect("\0" + name)
        credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", credentials)[0]
        return pid
    except OSError:
        return 0
    finally:
        probe.close()


def _check_port(variable: str, address: BindAddress) -> None:
    """Refuse an address another process listens on (tried as the HTTP servers bind it,
    :mod:`metaleg.supervisor.http`)."""
    candidates = address.listen_candidates()
    in_use = False
    for candidate, family in candidates:
        trial = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                trial.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            trial.bind((candidate, address.port))
            return
        except OSError as error:
            in_use = in_use or error.errno == errno.EADDRINUSE
        finally:
            trial.close()
    if not in_use:
        return  # e.g. an address not on this node: the server reports it when it binds
    if _serves_go_metrics(address):
        raise NeighbourFound(
            f"{variable}={str(address)!r} is served by a Go program, probably the Go original "
            "MetalEG still running on this node; remove it first (docs/deployment.md, "
            "migration)"
        )
    raise ConfigError(variable, str(address), "in use by another process on this node")


def _serves_go_metrics(address: BindAddress) -> bool:
    host = address.host or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    shown = f"[{host}]" if ":" in host else host
    try:
        # No proxy from the environment: the address is on this node.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(
            f"http://{shown}:{address.port}/metrics", timeout=PROBE_TIMEOUT
        ) as response:
            body: bytes = response.read(1 << 20)
    except (OSError, ValueError):
        return False
    return any(sign in body for sign in GO_SIGNS)
