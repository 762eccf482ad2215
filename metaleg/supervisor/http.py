"""The supervisor's HTTP endpoints: ``/metrics`` and the ``/healthz``/``/readyz`` probes.

Each runs in a thread of the supervisor on its own bind address
(METRICS_BIND_ADDRESS, HEALTH_PROBE_BIND_ADDRESS); ``0`` disables it, like the
original. A host of "" listens on every address, IPv6 and IPv4.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from metaleg.config import BindAddress

ProbeResult = tuple[bool, tuple[str, ...]]


class _DualStackServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Accept IPv4 too on the wildcard address (:port means every address).
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _server(bind: BindAddress, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    host = bind.host
    if host in ("", "::"):
        candidates = [("::", socket.AF_INET6), ("0.0.0.0", socket.AF_INET)]
    elif ":" in host:
        candidates = [(host, socket.AF_INET6)]
    else:
        candidates = [(host, socket.AF_INET)]
    last_error: OSError | None = None
    for address, family in candidates:
        server_class: type[ThreadingHTTPServer] = type(
            "Server", (_DualStackServer,), {"address_family": family}
        )
        try:
            return server_class((address, bind.port), handler)
        except OSError as error:  # no IPv6 on this node: fall back to IPv4
            last_error = error
    assert last_error is not None
    raise OSError(f"cannot listen on {bind}: {last_error}") from last_error


def _serve(server: ThreadingHTTPServer, name: str) -> None:
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()


def serve_metrics(bind: BindAddress, registry: CollectorRegistry) -> ThreadingHTTPServer:
    server = _server(bind, MetricsHandler.factory(registry))
    _serve(server, "metrics-http")
    return server


def serve_probes(
    bind: BindAddress, healthz: Callable[[], ProbeResult], readyz: Callable[[], ProbeResult]
) -> ThreadingHTTPServer:
    """``/healthz`` and ``/readyz``: 200 ``ok``, or 503 with one reason per line."""

    class ProbeHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            probes = {"/healthz": healthz, "/readyz": readyz}
            probe = probes.get(self.path.split("?", 1)[0])
            if probe is None:
                self._reply(404, "not found: use /healthz or /readyz\n")
                return
            try:
                ok, reasons = probe()
            except Exception as error:  # a bug in a probe must show, not hang the kubelet
                ok, reasons = False, (f"probe failed: {error}",)
            self._reply(200 if ok else 503, "ok\n" if ok else "".join(f"{r}\n" for r in reasons))

        def _reply(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the kubelet probes every few seconds: no log line per probe

    server = _server(bind, ProbeHandler)
    _serve(server, "probes-http")
    return server
