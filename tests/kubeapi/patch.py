"""The three patch formats of ``kubectl patch`` / ``PATCH`` requests.

* JSON merge patch (RFC 7386, ``application/merge-patch+json``);
* strategic merge patch (``application/strategic-merge-patch+json``), applied
  here as a merge patch after dropping the ``$``-directives: lists are replaced
  wholesale instead of merged by their merge key (simplification);
* JSON patch (RFC 6902, ``application/json-patch+json``) with JSON pointers
  (RFC 6901).
"""

from __future__ import annotations

import copy
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PATCH_TYPES = (MERGE_PATCH, STRATEGIC_MERGE_PATCH, JSON_PATCH)


class PatchError(ValueError):
    """A patch that cannot be applied.

    ``malformed`` distinguishes a patch document that is not a valid patch
    (400 BadRequest) from a valid patch that fails on this object (422).
    """

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(message)
        self.malformed = malformed


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 merge patch; ``target`` is not modified."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strip_directives(patch: Any) -> Any:
    if isinstance(patch, dict):
        return {
            key: _strip_directives(value) for key, value in patch.items() if not key.startswith("$")
        }
    if isinstance(patch, list):
        return [_strip_directives(item) for item in patch if not _is_directive(item)]
    return patch


def _is_directive(item: Any) -> bool:
    return isinstance(item, dict) and "$patch" in item


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, simplified to a merge patch without ``$`` directives."""
    if not isinstance(patch, dict):
        raise PatchError("strategic merge patch must be a JSON object", malformed=True)
    return merge_patch(target, _strip_directives(patch))


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchError(f"invalid JSON pointer: {path!r}", malformed=True)
    if path == "":
        return []
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"invalid array index: {token!r}")
    index = int(token)
    limit = len(container) if for_add else len(container) - 1
    if index > limit:
        raise PatchError(f"array index {index} out of bounds")
    return index


def _parent(document: Any, parts: list[str]) -> Any:
    current = document
    for token in parts[:-1]:
        if isinstance(current, dict):
            if token not in current:
                raise PatchError(f"path component {token!r} not found")
            current = current[token]
        elif isinstance(current, list):
            current = current[_index(current, token, for_add=False)]
        else:
            raise PatchError(f"cannot descend into a scalar at {token!r}")
    return current


def _get(document: Any, parts: list[str]) -> Any:
    if not parts:
        return document
    parent = _parent(document, parts)
    token = parts[-1]
    if isinstance(parent, dict):
        if token not in parent:
            raise PatchError(f"path {'/' + '/'.join(parts)!r} not found")
        return parent[token]
    if isinstance(parent, list):
        return parent[_index(parent, token, for_add=False)]
    raise PatchError("cannot index a scalar")


def _add(document: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _parent(document, parts)
    token = parts[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, token, for_add=True), value)
    else:
        raise PatchError("cannot add to a scalar")
    return document


def _remove(document: Any, parts: list[str]) -> tuple[Any, Any]:
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent = _parent(document, parts)
    token = parts[-1]
    if isinstance(parent, dict):
        if token not in parent:
            raise PatchError(f"unable to remove nonexistent key: {token}")
        return document, parent.pop(token)
    if isinstance(parent, list):
        return document, parent.pop(_index(parent, token, for_add=False))
    raise PatchError("cannot remove from a scalar")


def json_patch(target: Any, operations: Any) -> Any:
    """Apply an RFC 6902 JSON patch; ``target`` is not modified."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations", malformed=True)
    document = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation:
            raise PatchError(f"invalid operation: {operation!r}", malformed=True)
        op = operation["op"]
        parts = _pointer(operation.get("path"))
        if op in ("add", "replace", "test") and "value" not in operation:
            raise PatchError(f"{op} operation does not have a value", malformed=True)
        if op == "add":
            document = _add(document, parts, copy.deepcopy(operation["value"]))
        elif op == "remove":
            document, _ = _remove(document, parts)
        elif op == "replace":
            _get(document, parts)  # the target must exist
            if parts:
                document, _ = _remove(document, parts)
            document = _add(document, parts, copy.deepcopy(operation["value"]))
        elif op in ("move", "copy"):
            source = _pointer(operation.get("from"))
            if op == "move":
                document, value = _remove(document, source)
            else:
                value = copy.deepcopy(_get(document, source))
            document = _add(document, parts, value)
        elif op == "test":
            if _get(document, parts) != operation["value"]:
                raise PatchError(f"testing value {operation.get('path')} failed: test failed")
        else:
            raise PatchError(f"unexpected operation {op!r}", malformed=True)
    return document


def apply_patch(content_type: str, target: Any, patch: Any) -> Any:
    """Apply ``patch`` of the given media type (one of :data:`PATCH_TYPES`)."""
    if content_type == JSON_PATCH:
        return json_patch(target, patch)
    if content_type == STRATEGIC_MERGE_PATCH:
        return strategic_merge_patch(target, patch)
    if not isinstance(patch, dict):
        raise PatchError("merge patch must be a JSON object", malformed=True)
    return merge_patch(target, patch)
