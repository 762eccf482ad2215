"""API errors rendered as Kubernetes ``Status`` objects.

Each constructor mirrors the message, ``reason`` and ``code`` that the real
API server (``k8s.io/apimachinery/pkg/api/errors``) produces, so client code
that inspects ``ApiException.status``/``.reason`` or the JSON body behaves as
it would against a cluster.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A failed API request; :meth:`status` is the response body."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        """The ``Status`` object the API server sends for this error."""
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


def qualified_resource(plural: str, group: str) -> str:
    """``services`` for the core group, ``servicel2statuses.metallb.io`` otherwise."""
    return f"{plural}.{group}" if group else plural


def _details(plural: str, group: str, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = plural
    return details


def not_found(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{qualified_resource(plural, group)} "{name}" not found',
        _details(plural, group, name),
    )


def no_such_path() -> ApiError:
    """What the server answers for a path it does not serve (unknown group or resource)."""
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{qualified_resource(plural, group)} "{name}" already exists',
        _details(plural, group, name),
    )


def conflict(plural: str, group: str, name: str, detail: str | None = None) -> ApiError:
    detail = detail or (
        "the object has been modified; please apply your changes to the latest version "
        "and try again"
    )
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified_resource(plural, group)} "{name}": {detail}',
        _details(plural, group, name),
    )


def invalid(kind: str, group: str, name: str, field: str, cause_reason: str, text: str) -> ApiError:
    """422 Invalid with a single field cause, e.g. ``metadata.name: Required value: ...``."""
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = kind
    details["causes"] = [{"reason": cause_reason, "message": text, "field": field}]
    return ApiError(
        422,
        "Invalid",
        f'{kind}.{group} "{name}" is invalid: {field}: {text}'
        if group
        else f'{kind} "{name}" is invalid: {field}: {text}',
        details,
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def method_not_allowed(method: str) -> ApiError:
    return ApiError(
        405,
        "MethodNotAllowed",
        f"the server does not allow this method on the requested resource ({method})",
        {},
    )


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f'the body of the request was in an unknown format - accepted media types include: application/json, application/merge-patch+json, application/strategic-merge-patch+json, application/json-patch+json (got "{content_type}")',
        {},
    )


def unprocessable(message: str) -> ApiError:
    """422 without field causes (what a failing JSON patch ``test`` operation yields)."""
    return ApiError(422, "Invalid", message)
