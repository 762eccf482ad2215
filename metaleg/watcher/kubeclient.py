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

from collections.abc import Sequence
from typing import Any

from kubernetes.client.rest import ApiException

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
