"""The few REST calls the watcher makes, through the ``kubernetes`` client's ``ApiClient``.

The watcher lists and watches five resources and creates Events, always with
raw JSON (``_preload_content=False``). The generated per-group API classes add
nothing to that but memory: ``client.CoreV1Api`` alone imports its ~700
operations and the ~250 pydantic models of their signatures, about 21 MiB of
the watcher's 64 MiB (kubernetes 37). So the calls are made one level lower,
the way the generated methods make them: the same ``ApiClient`` (its
configuration, authentication, TLS, connection pool and ``ApiException``),
``param_serialize`` then ``call_api`` (clients of the OpenAPI generator's
"python" template, kubernetes >= 35) or ``call_api`` alone (the older
"python-legacy" template).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import yaml
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException

KEEPALIVE_IDLE = 15
"""Seconds a connection may be idle before TCP keepalive probes start..."""
KEEPALIVE_INTERVAL = 5
"""...the seconds between probes..."""
KEEPALIVE_COUNT = 3
"""...and the unanswered probes after which the kernel drops it: a connection whose peer is
gone without a FIN or RST (a control-plane VIP moved, a NAT or load balancer forgot the
flow) fails within ~30 s, as client-go notices it by HTTP/2 pings in ~45 s."""


def socket_options() -> list[tuple[int, int, int]]:
    """urllib3's default (no Nagle) and TCP keepalive, with ``TCP_USER_TIMEOUT`` for data
    that is never acknowledged (a request sent into a dead connection)."""
    options = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
    ]
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if user_timeout is not None:
        options.append(
            (socket.IPPROTO_TCP, user_timeout, 1000 * (KEEPALIVE_IDLE + 3 * KEEPALIVE_INTERVAL))
        )
    return options


def api_client(kubeconfig: str | None) -> Any:
    """An ``ApiClient`` from a kubeconfig file, or in-cluster (whose service-account token,
    a projected token that the kubelet rotates, the client re-reads every minute), with
    :func:`socket_options` on every connection."""
    configuration = client.Configuration()
    if kubeconfig:
        kube_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        token_file = _token_file(kubeconfig)
        if token_file is not None:
            configuration.refresh_api_key_hook = TokenFileReader(token_file)
    else:
        kube_config.load_incluster_config(client_configuration=configuration)
    configuration.socket_options = socket_options()
    return client.ApiClient(configuration)


class TokenFileReader:
    """A ``refresh_api_key_hook`` that re-reads a kubeconfig user's ``tokenFile`` when it
    changes: the client reads it once, but a rotated token (a projected service-account
    token, a CI's short-lived token) must be taken up, or every request fails with 401."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None

    def __call__(self, configuration: Any) -> None:
        try:
            status = os.stat(self.path)
        except OSError:
            return  # keep the token we have; the API server says if it is no good
        stamp = (status.st_mtime, status.st_size)
        if stamp == self._stamp:
            return
        try:
            with open(self.path) as file:
                token = file.read().strip()
        except OSError:
            return
        self._stamp = stamp
        if token:
            configuration.api_key["BearerToken"] = f"Bearer {token}"


def _token_file(kubeconfig: str) -> str | None:
    """The current context's user's ``tokenFile`` (relative to the kubeconfig), or None."""
    try:
        with open(kubeconfig) as file:
            document = yaml.safe_load(file)
        contexts = {c["name"]: c["context"] for c in document.get("contexts") or []}
        user_name = contexts[document["current-context"]]["user"]
        users = {u["name"]: u.get("user") or {} for u in document.get("users") or []}
        token_file = users[user_name].get("tokenFile")
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None  # the client's loader reported what is wrong with the file already
    if not isinstance(token_file, str) or not token_file:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(kubeconfig)), token_file)


Query = Sequence[tuple[str, Any]]
"""Query parameters, API spelling (``labelSelector``, ``resourceVersion``); bools as bools."""

_AUTH = ["BearerToken"]


class KubeCalls:
    """GET and POST of JSON through an ``ApiClient``; non-2xx answers raise ``ApiException``."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        self._legacy = not hasattr(api_client, "param_serialize")

    def get(self, path: str, query: Query = (), request_timeout: Any = None) -> Any:
        """``GET path?query``, not read yet: a urllib3 response (``.data``, ``.stream()``,
        ``release_conn()``), as a generated method returns with ``_preload_content=False``."""
        return self._call("GET", path, list(query), None, request_timeout)

    def post(self, path: str, body: dict[str, Any], request_timeout: Any = None) -> None:
        """``POST path`` with a JSON body; the answer is read and discarded."""
        response = self._call("POST", path, [], body, request_timeout)
        try:
            response.read()
        finally:
            response.release_conn()

    def _call(
        self, method: str, path: str, query: list[tuple[str, Any]], body: Any, timeout: Any
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._legacy:
            # python-legacy raises ApiException for non-2xx answers in its REST layer.
            return self.api_client.call_api(
                path,
                method,
                query_params=query,
                header_params=headers,
                body=body,
                auth_settings=_AUTH,
                response_type=None,
                _return_http_data_only=True,
                _preload_content=False,
                _request_timeout=timeout,
            )
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=_AUTH,
        )
        response = self.api_client.call_api(*request, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response
