"""Server-side printing: ``meta.k8s.io/v1`` Table responses, as ``kubectl get`` asks for.

Services get the columns of the real API server (Name, Type, Cluster-IP,
External-IP, Port(s), Age, Selector); other resources get the default
convertor's Name and Created At, like custom resources without printer columns.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from .resources import Object, ResourceType

Column = dict[str, Any]


def wants_table(accept: str | None) -> bool:
    """Whether an Accept header asks for a Table first (``as=Table;...;g=meta.k8s.io``)."""
    if not accept:
        return False
    first = accept.split(",")[0]
    return "as=Table" in first and "g=meta.k8s.io" in first


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC
    )
    seconds = int((datetime.datetime.now(datetime.UTC) - created).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 3600 * 3:
        return f"{seconds // 60}m"
    if seconds < 86400 * 2:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _column(name: str, kind: str = "string", fmt: str = "", priority: int = 0) -> Column:
    return {"name": name, "type": kind, "format": fmt, "description": name, "priority": priority}


def _service_row(obj: Object) -> list[Any]:
    spec = obj.get("spec") or {}
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    external = [i.get("ip") or i.get("hostname") for i in ingress] + list(
        spec.get("externalIPs") or []
    )
    if not external:
        external_text = "<pending>" if spec.get("type") == "LoadBalancer" else "<none>"
    else:
        external_text = ",".join(str(e) for e in external)
    ports = ",".join(
        f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/"
        f"{p.get('protocol', 'TCP')}"
        for p in spec.get("ports") or []
    )
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    return [
        obj["metadata"]["name"],
        spec.get("type", ""),
        spec.get("clusterIP", ""),
        external_text,
        ports or "<none>",
        _age(obj["metadata"].get("creationTimestamp")),
        selector or "<none>",
    ]


_SERVICE_COLUMNS = [
    _column("Name", fmt="name"),
    _column("Type"),
    _column("Cluster-IP"),
    _column("External-IP"),
    _column("Port(s)"),
    _column("Age"),
    _column("Selector", priority=1),
]

_CUSTOM: dict[str, tuple[list[Column], Callable[[Object], list[Any]]]] = {
    "v1/services": (_SERVICE_COLUMNS, _service_row),
}


def to_table(resource: ResourceType, objects: list[Object], list_meta: dict[str, Any]) -> Object:
    """A Table of ``objects``; each row carries the object's metadata for kubectl."""
    columns, row = _CUSTOM.get(
        resource.key,
        (
            [_column("Name", fmt="name"), _column("Created At", kind="date")],
            lambda o: [o["metadata"]["name"], o["metadata"].get("creationTimestamp")],
        ),
    )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns,
        "rows": [
            {
                "cells": row(obj),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
            for obj in objects
        ],
    }
