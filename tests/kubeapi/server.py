"""The HTTP front of the emulator: Kubernetes REST paths, watch streams, fault control.

:class:`KubeApiServer` serves one :class:`~.store.Store` on one or more
listeners (stdlib ``ThreadingHTTPServer``, HTTP/1.1, a thread per
connection). A listener may live in another network namespace: its socket is
created by a helper thread that entered the namespace, so the rest of the
process stays where it is.

Paths served:

* discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/<g>``,
  ``/apis/<g>/<v>``; ``/healthz``, ``/livez``, ``/readyz``;
* resources: ``/api/v1[/namespaces/<ns>]/<plural>[/<name>[/<sub>]]`` and
  ``/apis/<g>/<v>/...`` alike (plus the legacy ``.../watch/...`` form), with
  GET (get, list, watch), POST, PUT, PATCH, DELETE (one or a collection);
* control (not Kubernetes): ``GET /_emulator/state`` and
  ``POST /_emulator/<action>`` with a JSON body of keyword arguments, for
  ``compact``, ``drop_watches`` (``abort``), ``set_group_available``
  (``group``, ``available``), ``set_latency`` (``seconds``) and ``restart``
  (``downtime``, ``keep_history``; answered before the restart begins).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import errors
from .errors import ApiError
from .patch import PATCH_TYPES
from .resources import Object, ResourceType
from .selectors import SelectorError
from .store import Store, Watch
from .table import to_table, wants_table

VERSION_INFO = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-metaleg-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
#: how often an idle watch checks that its client is still connected
_LIVENESS_INTERVAL = 0.5


def _split_host_port(address: str) -> tuple[str, int]:
    """``"127.0.0.1:0"`` / ``"[::1]:6443"`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _socket_in_netns(netns: str | None, family: int) -> socket.socket:
    """A TCP socket created in network namespace ``netns`` (None: this one).

    A network namespace is a per-thread attribute and a socket keeps the one
    it was created in, so a short-lived thread enters the namespace and
    creates the socket; the calling thread never moves.
    """
    if netns is None:
        return socket.socket(family, socket.SOCK_STREAM)
    result: dict[str, Any] = {}

    def create() -> None:
        try:
            from pyroute2 import netns as pyroute2_netns

            pyroute2_netns.setns(netns, flags=0)  # flags=0: never create the namespace
            result["socket"] = socket.socket(family, socket.SOCK_STREAM)
        except BaseException as error:
            result["error"] = error

    thread = threading.Thread(target=create, name=f"kubeapi-setns-{netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise OSError(f"cannot create a socket in netns {netns}: {result['error']}")
    sock: socket.socket = result["socket"]
    return sock


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    listener: Listener

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can
        # hang in a namespace without DNS; the name is not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class Listener:
    """One listening socket of the emulator, possibly inside a network namespace."""

    def __init__(self, emulator: KubeApiServer, host: str, port: int, netns: str | None) -> None:
        self.emulator = emulator
        self.host = host
        self.port = port
        self.netns = netns
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._watching: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind (the same port again after a stop) and serve in a background thread."""
        if self._httpd is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        httpd = _HTTPServer((self.host, self.port), _Handler, bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = _socket_in_netns(self.netns, family)
        httpd.address_family = family
        httpd.listener = self
        try:
            httpd.server_bind()
            httpd.server_activate()
        except BaseException:
            httpd.server_close()
            raise
        self.port = httpd.server_port
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"kubeapi-{self.host}:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and cut every open connection of this listener."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._watching.discard(connection)

    def set_watching(self, connection: socket.socket, watching: bool) -> None:
        """Mark a connection as carrying a watch stream (or no longer)."""
        with self._lock:
            if watching:
                self._watching.add(connection)
            else:
                self._watching.discard(connection)

    def cut_watches(self) -> None:
        """Shut down every connection that carries a watch stream."""
        with self._lock:
            connections = list(self._watching)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def describe(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "netns": self.netns, "url": self.url}


class KubeApiServer:
    """A Kubernetes API server emulator over real HTTP.

    Usage::

        with KubeApiServer() as api:          # 127.0.0.1, a free port
            client = api.api_client()         # a kubernetes.client.ApiClient
            ...
            api.compact()                     # old resourceVersions now get 410
            api.stop(); api.start()           # an API server restart, same port
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        store: Store | None = None,
        resources: Iterable[ResourceType] | None = None,
        history_size: int = 10000,
        require_namespaces: bool = True,
        bootstrap: bool = True,
        bookmark_interval: float = 60.0,
        watch_timeout: float = 1800.0,
        verbose: bool = False,
    ) -> None:
        """Create a server (not yet listening: call :meth:`start` or use ``with``).

        :param store: serve an existing store instead of creating one from
            ``resources``, ``history_size``, ``require_namespaces``, ``bootstrap``
        :param bookmark_interval: seconds between BOOKMARK events of watches
            that allow them
        :param watch_timeout: how long a watch without ``timeoutSeconds`` lasts
        :param verbose: log every request to stderr
        """
        self.store = store or Store(
            resources,
            history_size=history_size,
            require_namespaces=require_namespaces,
            bootstrap=bootstrap,
        )
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.verbose = verbose
        self.latency = 0.0
        self.token: str | None = None
        """When set, API requests must carry ``Authorization: Bearer <token>`` (else 401)."""
        self.watch_requests = 0
        """Watch requests served so far (a client's reconnect rate, for tests)."""
        self.end_watches_at_once = False
        self._faults: list[_Fault] = []
        self._faults_lock = threading.Lock()
        self._last_stream = 0
        self._silenced_upto = 0
        self.listeners: list[Listener] = [Listener(self, host, port, None)]
        self.restarts = 0
        self._started_before = False
        self._running = False
        self._lifecycle = threading.Lock()

    # --- lifecycle ------------------------------------------------------------

    def add_listener(self, host: str, port: int = 0, *, netns: str | None = None) -> Listener:
        """Serve the same store on another address, optionally inside network namespace ``netns``."""
        listener = Listener(self, host, port, netns)
        self.listeners.append(listener)
        if self._running:
            listener.start()
        return listener

    def start(self, *, keep_history: bool = False) -> KubeApiServer:
        """Start listening; after a :meth:`stop` on the same ports with the same store.

        A restarted API server rebuilds its watch cache, so by default the
        history is dropped and watches from a resourceVersion older than the
        restart get 410; ``keep_history=True`` keeps it.
        """
        with self._lifecycle:
            if self._running:
                return self
            if self._started_before and not keep_history:
                self.store.compact()
            started: list[Listener] = []
            try:
                for listener in self.listeners:
                    listener.start()
                    started.append(listener)
            except BaseException:
                for listener in started:
                    listener.stop()
                raise
            if self._started_before:
                self.restarts += 1
            self._started_before = True
            self._running = True
            return self

    def stop(self, *, abort: bool = True) -> None:
        """Stop listening and cut every connection, as a crashing API server does.

        With ``abort=False`` open watch streams are first ended cleanly (as a
        gracefully terminating API server does) before connections are closed.
        """
        with self._lifecycle:
            if not self._running:
                return
            if not abort:
                self.store.drop_watches()
                self.store.wait_for_watches_closed(timeout=2.0)
            self._running = False
            for listener in self.listeners:
                listener.stop()
            self.store.drop_watches()

    def restart(self, downtime: float = 0.0, *, keep_history: bool = False) -> None:
        """:meth:`stop`, wait ``downtime`` seconds, :meth:`start`."""
        self.stop()
        time.sleep(downtime)
        self.start(keep_history=keep_history)

    @property
    def running(self) -> bool:
        return self._running

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self.listeners[0].host

    @property
    def port(self) -> int:
        return self.listeners[0].port

    @property
    def url(self) -> str:
        """Base URL of the first listener, e.g. ``http://127.0.0.1:41234``."""
        return self.listeners[0].url

    # --- faults -------------------------------------------------------------

    def compact(self) -> int:
        """Drop the watch history: watches from any older resourceVersion get 410 Expired."""
        return self.store.compact()

    def set_group_available(self, group: str, available: bool) -> None:
        """Make an API group vanish (404, absent from discovery, its watches end) or return."""
        self.store.set_group_available(group, available)

    def drop_watches(self, *, abort: bool = False) -> None:
        """End every open watch stream: cleanly (final chunk) or, with ``abort``, by cutting the connection."""
        if abort:
            for listener in self.listeners:
                listener.cut_watches()
        self.store.drop_watches()

    def set_latency(self, seconds: float) -> None:
        """Delay every API request (not the control endpoints) by ``seconds``."""
        self.latency = max(0.0, float(seconds))

    def silence_watches(self) -> None:
        """The watch streams open now stop carrying anything (no event, no bookmark) without
        closing, as when a NAT, a load balancer or a moved VIP forgot their flows while the
        client's side still looks open; new requests are served as usual."""
        with self._faults_lock:
            self._silenced_upto = self._last_stream

    def fail_requests(
        self,
        code: int,
        count: int = 1,
        *,
        retry_after: int | None = None,
        path_contains: str = "",
        watch: bool | None = None,
    ) -> None:
        """Answer the next ``count`` API requests whose path contains ``path_contains`` (and
        that are watches, or not, if ``watch`` says so) with ``code`` and a Status body, as an
        overloaded (429, with ``Retry-After`` seconds) or failing (5xx) API server does."""
        with self._faults_lock:
            self._faults.append(_Fault(code, count, retry_after, path_contains, watch))

    def take_fault(self, path: str, is_watch: bool) -> _Fault | None:
        """The injected failure the request with this path gets, if any (used by handlers)."""
        with self._faults_lock:
            for fault in self._faults:
                if fault.path_contains not in path:
                    continue
                if fault.watch is not None and fault.watch != is_watch:
                    continue
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def next_stream(self) -> int:
        """Number a new watch stream (see :meth:`silence_watches`)."""
        with self._faults_lock:
            self._last_stream += 1
            self.watch_requests += 1
            return self._last_stream

    def silenced(self, stream: int) -> bool:
        return stream <= self._silenced_upto

    def delete_custom_resource_definition(self, group: str) -> None:
        """Delete a CRD's group as the API server does: every object of its resources is
        deleted (watchers get DELETED events), then the resources are gone (404, watches
        end). :meth:`set_group_available` brings the group back, empty."""
        for resource in self.store.resource_types():
            if resource.group == group:
                self.store.delete_collection(resource)
        self.store.set_group_available(group, False)

    def state(self) -> dict[str, Any]:
        """What ``GET /_emulator/state`` answers."""
        return {
            "resourceVersion": str(self.store.resource_version),
            "oldestResourceVersion": str(self.store.oldest_resource_version),
            "groups": self.store.groups(),
            "watches": self.store.open_watches(),
            "latency": self.latency,
            "running": self._running,
            "restarts": self.restarts,
            "listeners": [listener.describe() for listener in self.listeners],
        }

    def wait_for_watches(
        self, count: int = 1, resource: ResourceType | str | None = None, timeout: float = 10.0
    ) -> None:
        """Block until ``count`` watches (on ``resource``, e.g. ``"services"``) are open."""
        self.store.wait_for_watches(count, resource, timeout)

    # --- clients --------------------------------------------------------------

    def write_kubeconfig(self, path: str) -> str:
        """Write a kubeconfig for this server (see :func:`.control.write_kubeconfig`)."""
        from .control import write_kubeconfig

        return write_kubeconfig(path, self.url)

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` talking to this server."""
        from .control import api_client

        return api_client(self.url)


@dataclass
class _Fault:
    """An injected failure (see :meth:`KubeApiServer.fail_requests`)."""

    code: int
    count: int
    retry_after: int | None
    path_contains: str
    watch: bool | None


_FAULT_REASONS = {
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: injected failure"),
    503: ("ServiceUnavailable", "The server is currently unable to handle the request"),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    #: the current watch sends one-row Tables (kubectl get -w)
    _table_watch = False
    _table_headers_sent = False

    # --- plumbing -------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.listener.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.listener.untrack(self.connection)

    @property
    def emulator(self) -> KubeApiServer:
        return self.server.listener.emulator

    def log_message(self, format: str, *args: Any) -> None:
        if self.emulator.verbose:
            sys.stderr.write(f"kubeapi: {self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _send_body(self, code: int, data: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, code: int, body: Any) -> None:
        self._send_body(code, json.dumps(body, separators=(",", ":")).encode() + b"\n")

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as error:
            raise errors.bad_request(f"invalid JSON in request body: {error}") from None

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [unquote(p) for p in url.path.split("/") if p]
        try:
            body = self._read_body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            if parts[:1] == ["_emulator"]:
                self._control(method, parts[1:], body)
                return
            if self.emulator.latency:
                time.sleep(self.emulator.latency)
            token = self.emulator.token
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            fault = self.emulator.take_fault(url.path, query.get("watch", "") in _TRUE)
            if fault is not None:
                self._send_fault(fault)
                return
            self._route(method, parts, query, body)
        except ApiError as error:
            self._send_json(error.code, error.status())
        except SelectorError as error:
            self._send_json(400, errors.bad_request(str(error)).status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:
            traceback.print_exc()
            self._send_json(500, ApiError(500, "InternalError", f"{error}").status())

    def _send_fault(self, fault: _Fault) -> None:
        reason, message = _FAULT_REASONS.get(fault.code, ("InternalError", "injected failure"))
        details: dict[str, Any] = {}
        if fault.retry_after is not None:
            details = {"retryAfterSeconds": fault.retry_after}
        data = json.dumps(ApiError(fault.code, reason, message, details).status()).encode()
        self.send_response(fault.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if fault.retry_after is not None:
            self.send_header("Retry-After", str(fault.retry_after))
        self.end_headers()
        self.wfile.write(data)

    # --- routing --------------------------------------------------------------

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: Any) -> None:
        store = self.emulator.store
        if method == "GET" and len(parts) == 1 and parts[0] in ("healthz", "livez", "readyz"):
            self._send_body(200, b"ok", "text/plain; charset=utf-8")
            return
        if method == "GET" and parts == ["version"]:
            self._send_json(200, VERSION_INFO)
            return
        if parts == ["api"]:
            self._send_json(200, self._api_versions())
            return
        if parts == ["apis"]:
            self._send_json(200, self._group_list())
            return
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) == 2 and parts[0] == "apis":
            self._send_json(200, self._group(parts[1]))
            return
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise errors.no_such_path()
        if not rest:
            self._send_json(200, self._resource_list(group, version))
            return
        watch = False
        if rest[0] == "watch":
            watch, rest = True, rest[1:]
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            candidate = store.lookup(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise errors.no_such_path()
        resource = store.lookup(group, version, rest[0])
        if resource is None or (len(rest) > 1 and resource.namespaced and namespace is None):
            raise errors.no_such_path()
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource is not None and subresource not in resource.subresources:
            raise errors.no_such_path()
        watch = watch or query.get("watch", "") in _TRUE
        if method == "GET":
            if watch:
                if subresource is not None:
                    raise errors.method_not_allowed(method)
                self._watch(resource, namespace, name, query)
            elif name is None:
                self._list(resource, namespace, query)
            else:
                obj = store.get(resource, name, namespace)
                if wants_table(self.headers.get("Accept")):
                    self._send_json(200, to_table(resource, [obj], {}))
                else:
                    self._send_json(200, obj)
        elif method == "POST" and name is None:
            if resource.namespaced and namespace is None:
                raise errors.method_not_allowed(method)
            self._send_json(201, store.create(resource, body, namespace))
        elif method == "PUT" and name is not None:
            self._send_json(
                200, store.update(resource, name, body, namespace, subresource=subresource)
            )
        elif method == "PATCH" and name is not None:
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type not in PATCH_TYPES:
                raise errors.unsupported_media_type(content_type)
            self._send_json(
                200,
                store.patch(
                    resource,
                    name,
                    body,
                    namespace,
                    content_type=content_type,
                    subresource=subresource,
                ),
            )
        elif method == "DELETE" and subresource is None:
            if name is None:
                self._send_json(
                    200,
                    store.delete_collection(
                        resource,
                        namespace,
                        label_selector=query.get("labelSelector"),
                        field_selector=query.get("fieldSelector"),
                    ),
                )
                return
            preconditions = (body or {}).get("preconditions") if isinstance(body, dict) else None
            obj, gone = store.delete(resource, name, namespace, preconditions=preconditions)
            if gone and not resource.return_deleted_object:
                details: dict[str, Any] = {"name": name}
                if resource.group:
                    details["group"] = resource.group
                details["kind"] = resource.plural
                details["uid"] = obj["metadata"].get("uid")
                obj = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": details,
                }
            self._send_json(200, obj)
        else:
            raise errors.method_not_allowed(method)

    # --- discovery --------------------------------------------------------------

    def _api_versions(self) -> dict[str, Any]:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {
                    "clientCIDR": "0.0.0.0/0",
                    "serverAddress": f"{self.server.server_name}:{self.server.server_port}",
                }
            ],
        }

    def _group_versions(self) -> dict[str, list[str]]:
        versions: dict[str, list[str]] = {}
        for resource in self.emulator.store.resource_types():
            if resource.group and resource.version not in versions.setdefault(resource.group, []):
                versions[resource.group].append(resource.version)
        return versions

    @staticmethod
    def _group_entry(group: str, versions: list[str]) -> dict[str, Any]:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _group_list(self) -> dict[str, Any]:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group_entry(g, v) for g, v in sorted(self._group_versions().items())],
        }

    def _group(self, group: str) -> dict[str, Any]:
        versions = self._group_versions().get(group)
        if not versions:
            raise errors.no_such_path()
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_entry(group, versions)}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = [
            r
            for r in self.emulator.store.resource_types()
            if (r.group, r.version) == (group, version)
        ]
        if not resources:
            raise errors.no_such_path()
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": resources[0].api_version,
            "resources": [entry for r in resources for entry in r.discovery()],
        }

    # --- list and watch -----------------------------------------------------------

    def _list(self, resource: ResourceType, namespace: str | None, query: dict[str, str]) -> None:
        limit_text = query.get("limit") or "0"
        try:
            limit = int(limit_text)
        except ValueError:
            raise errors.bad_request(f'limit: Invalid value: "{limit_text}"') from None
        listed = self.emulator.store.list(
            resource,
            namespace,
            label_selector=query.get("labelSelector"),
            field_selector=query.get("fieldSelector"),
            limit=limit if limit > 0 else None,
            continue_token=query.get("continue") or None,
            resource_version=query.get("resourceVersion"),
            resource_version_match=query.get("resourceVersionMatch"),
        )
        if wants_table(self.headers.get("Accept")):
            self._send_json(200, to_table(resource, listed["items"], listed["metadata"]))
        else:
            self._send_json(200, listed)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _send_event(self, event_type: str, obj: Object) -> None:
        line = json.dumps({"type": event_type, "object": obj}, separators=(",", ":"))
        self._write_chunk(line.encode() + b"\n")

    def _send_object_event(self, watch: Watch, event_type: str, obj: Object) -> None:
        """An ADDED/MODIFIED/DELETED event; as a one-row Table when the client asked for Tables."""
        if self._table_watch:
            table = to_table(
                watch.resource, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]}
            )
            if self._table_headers_sent:
                table["columnDefinitions"] = []
            self._table_headers_sent = True
            obj = table
        self._send_event(event_type, obj)

    def _hold_silent(self) -> None:
        """Keep a silenced stream open, sending nothing, until the client gives up on it."""
        while self.emulator.running and not self._client_gone():
            time.sleep(0.1)
        raise ConnectionAbortedError("silenced watch: the client went away")

    def _client_gone(self) -> bool:
        """True once the client closed its end (checked while a watch is idle)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _watch(
        self, resource: ResourceType, namespace: str | None, name: str | None, query: dict[str, str]
    ) -> None:
        field_selector = query.get("fieldSelector") or ""
        if name is not None:
            field_selector = ",".join(filter(None, [field_selector, f"metadata.name={name}"]))
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        except ValueError:
            raise errors.bad_request(
                f'timeoutSeconds: Invalid value: "{query["timeoutSeconds"]}"'
            ) from None
        bookmarks = query.get("allowWatchBookmarks", "") in _TRUE
        send_initial = query.get("sendInitialEvents", "") in _TRUE
        if send_initial and (query.get("resourceVersionMatch") != "NotOlderThan" or not bookmarks):
            raise errors.invalid(
                "ListOptions",
                "",
                "",
                "resourceVersionMatch",
                "FieldValueForbidden",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch to "
                "NotOlderThan and allowWatchBookmarks",
            )
        emulator = self.emulator
        watch = emulator.store.watch(
            resource,
            namespace,
            label_selector=query.get("labelSelector"),
            field_selector=field_selector,
            resource_version=query.get("resourceVersion"),
            send_initial_events=send_initial or None,
        )
        self._table_watch = wants_table(self.headers.get("Accept"))
        self._table_headers_sent = False
        listener = self.server.listener
        listener.set_watching(self.connection, True)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            stream = emulator.next_stream()
            if watch.expired is not None:
                self._send_event("ERROR", watch.expired.status())
            elif not emulator.end_watches_at_once:
                self._stream(
                    watch, timeout or emulator.watch_timeout, bookmarks, send_initial, stream
                )
            self._write_chunk(b"")  # the terminating zero-length chunk
        except OSError:
            self.close_connection = True  # cut: the client sees a broken stream
        finally:
            watch.close()
            listener.set_watching(self.connection, False)

    def _bookmark(self, watch: Watch, initial_end: bool = False) -> None:
        metadata: dict[str, Any] = {"resourceVersion": str(watch.pos), "creationTimestamp": None}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        self._send_event(
            "BOOKMARK",
            {
                "kind": watch.resource.kind,
                "apiVersion": watch.resource.api_version,
                "metadata": metadata,
            },
        )

    def _stream(
        self, watch: Watch, timeout: float, bookmarks: bool, send_initial: bool, stream: int = 0
    ) -> None:
        """Send the initial objects, then events until timeout, a fault or the client leaves."""
        emulator = self.emulator
        deadline = time.monotonic() + timeout
        for obj in watch.initial:
            self._send_object_event(watch, "ADDED", obj)
        if send_initial:
            self._bookmark(watch, initial_end=True)
        next_bookmark = time.monotonic() + emulator.bookmark_interval
        while True:
            if emulator.silenced(stream):
                self._hold_silent()
            now = time.monotonic()
            if now >= deadline:
                return
            wake = min(deadline, now + _LIVENESS_INTERVAL)
            if bookmarks:
                wake = min(wake, next_bookmark)
            events = watch.wait(max(0.0, wake - now))
            if emulator.silenced(stream):
                self._hold_silent()  # what arrived meanwhile is never sent
            if events is None:
                if not emulator.running:
                    raise ConnectionAbortedError("API server stopped")
                return
            for event_type, obj in events:
                self._send_object_event(watch, event_type, obj)
            if bookmarks and time.monotonic() >= next_bookmark:
                self._bookmark(watch)
                next_bookmark = time.monotonic() + emulator.bookmark_interval
            if not events and self._client_gone():
                raise ConnectionAbortedError("watch client went away")

    # --- control --------------------------------------------------------------

    def _control(self, method: str, parts: list[str], body: Any) -> None:
        emulator = self.emulator
        kwargs = body if isinstance(body, dict) else {}
        action = parts[0] if len(parts) == 1 else ""
        if method == "GET" and action == "state":
            self._send_json(200, emulator.state())
            return
        if method != "POST":
            raise errors.method_not_allowed(method)
        if action == "compact":
            emulator.compact()
        elif action == "drop_watches":
            emulator.drop_watches(abort=bool(kwargs.get("abort", False)))
        elif action == "set_group_available":
            emulator.set_group_available(str(kwargs["group"]), bool(kwargs["available"]))
        elif action == "set_latency":
            emulator.set_latency(float(kwargs.get("seconds", 0)))
        elif action == "restart":
            downtime = float(kwargs.get("downtime", 0))
            keep_history = bool(kwargs.get("keep_history", False))
            self.close_connection = True
            self._send_json(202, emulator.state())
            threading.Thread(
                target=emulator.restart,
                args=(downtime,),
                kwargs={"keep_history": keep_history},
                name="kubeapi-restart",
                daemon=True,
            ).start()
            return
        else:
            raise errors.no_such_path()
        self._send_json(200, emulator.state())
