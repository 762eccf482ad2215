"""The supervisor's HTTP endpoints: ``/metrics``, the ``/healthz``/``/readyz`` probes and the
start-up gate ``/egress?ip=`` (:mod:`metaleg.supervisor.gate`).

Each runs in a thread of the supervisor on its own bind address
(METRICS_BIND_ADDRESS, HEALTH_PROBE_BIND_ADDRESS); ``0`` disables it, like the
original. A host of "" listens on every address, IPv6 and IPv4.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from metaleg.config import BindAddress
from metaleg.supervisor.gate import EGRESS_PATH

ProbeResult = tuple[bool, tuple[str, ...]]
EgressAnswer = Callable[[str], tuple[int, bytes]]
"""The start-up gate: a query string -> (HTTP status, JSON body)."""


class _DualStackServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Accept IPv4 too on the wildcard address (:port means every address).
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _server(bind: BindAddress, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    candidates = bind.listen_candidates()
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
    bind: BindAddress,
    healthz: Callable[[], ProbeResult],
    readyz: Callable[[], ProbeResult],
    egress: EgressAnswer | None = None,
) -> ThreadingHTTPServer:
    """``/healthz`` and ``/readyz``: 200 ``ok``, or 503 with one reason per line; with
    ``egress``, ``/egress?ip=<pod IP>``: its status and JSON body (each request in a thread
    of its own: a gate that asks another node does not hold up the probes)."""

    class ProbeHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == EGRESS_PATH and egress is not None:
                try:
                    code, data = egress(query)
                except Exception as error:  # a bug in the gate must show, not hang the pod
                    code = 500
                    reason = f"gate failed: {type(error).__name__}: {error}"
                    fields = ("ip", "service", "role", "gateway_node", "generation")
                    body = {**dict.fromkeys(fields), "reason": reason}
                    data = json.dumps(body).encode() + b"\n"
                self._reply(code, data, "application/json")
                return
            probes = {"/healthz": healthz, "/readyz": readyz}
            probe = probes.get(path)
            if probe is None:
                paths = "/healthz, /readyz or /egress?ip=" if egress else "/healthz or /readyz"
                self._reply(404, f"not found: use {paths}\n")
                return
            try:
                ok, reasons = probe()
            except Exception as error:  # a bug in a probe must show, not hang the kubelet
                ok, reasons = False, (f"probe failed: {error}",)
            self._reply(200 if ok else 503, "ok\n" if ok else "".join(f"{r}\n" for r in reasons))

        def _reply(
            self, code: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8"
        ) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the kubelet probes every few seconds: no log line per probe

    server = _server(bind, ProbeHandler)
    _serve(server, "probes-http")
    return server
