"""Structured logging for every metaleg process (LOG_FORMAT json or text, LOG_LEVEL for
metaleg's own loggers, LOG_LEVEL_LIBRARIES for third-party ones).

Context goes in ``extra`` under the names of :data:`CONTEXT_FIELDS`, e.g.
``log.info("gateway changed", extra={"service": "mail/relay", "node": "node-b"})``;
JSON lines carry them as fields, text lines append them as ``key=value``. The SNAT
audit lines carry :data:`AUDIT_FIELDS` the same way.
"""

from __future__ import annotations

import json
import logging
import sys
import time

CONTEXT_FIELDS = ("service", "node", "generation", "backend", "resource", "error", "pid")
AUDIT_FIELDS = (
    "audit",
    "proto",
    "pod_ip",
    "pod_port",
    "snat_ip",
    "snat_port",
    "dst_ip",
    "dst_port",
    "icmp_type",
    "icmp_code",
    "icmp_id",
    "snat_icmp_id",
)
"""The fields of a SNAT audit line besides ``service`` (:mod:`metaleg.audit.records`)."""
LINE_FIELDS = CONTEXT_FIELDS + AUDIT_FIELDS


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process
        self._second = -1
        self._second_text = ""

    def _time(self, record: logging.LogRecord) -> str:
        """``2025-01-07T10:15:02.123Z``; the seconds' text is formatted once per second (the
        audit process writes up to AUDIT_LOG_RATE lines a second)."""
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "process": self.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = record.__dict__
        for field in LINE_FIELDS:
            value = fields.get(field)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + process + ": %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{field}={record.__dict__[field]}"
            for field in LINE_FIELDS
            if record.__dict__.get(field) is not None
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def setup_logging(
    process: str, level: str = "info", log_format: str = "json", libraries_level: str = "warning"
) -> None:
    """Send this process's logs to stderr in the configured format.

    ``level`` (LOG_LEVEL) is the level of metaleg's own loggers (``metaleg.*``);
    every other logger, i.e. the third-party libraries' (pyroute2 logs every netlink
    message at debug; urllib3, kubernetes), takes ``libraries_level``
    (LOG_LEVEL_LIBRARIES): the root logger's level, which they inherit.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if log_format == "json" else TextFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(libraries_level.upper())
    logging.getLogger("metaleg").setLevel(level.upper())
