"""Log levels: LOG_LEVEL for metaleg's own loggers, LOG_LEVEL_LIBRARIES for third-party ones.

pyroute2 logs every netlink message at debug; with ``LOG_LEVEL=debug`` metaleg's
own decisions must show without that flood (nor urllib3's, kubernetes'), unless
``LOG_LEVEL_LIBRARIES`` asks for it. Each case runs a real pyroute2 exchange in a
fresh interpreter with the agent's logging set up as a worker does.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.lab.agents import PACKAGE_ROOT

SCRIPT = """
import logging, sys
from metaleg.logs import setup_logging
setup_logging("routing", sys.argv[1], "json", sys.argv[2])
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.get_links()
logging.getLogger("metaleg.routing.netlink").debug("decided: nothing to do")
logging.getLogger("urllib3.connectionpool").info("connection pool chatter")
logging.getLogger("kubernetes.client.rest").warning("a library warning")
"""


def logged(level: str, libraries: str) -> list[dict[str, str]]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, level, libraries],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PACKAGE_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stderr.splitlines()]


def test_debug_shows_metaleg_decisions_without_library_chatter() -> None:
    lines = logged("debug", "warning")
    assert [(line["logger"], line["msg"]) for line in lines] == [
        ("metaleg.routing.netlink", "decided: nothing to do"),
        ("kubernetes.client.rest", "a library warning"),
    ]


def test_libraries_at_debug_on_request() -> None:
    lines = logged("info", "debug")
    loggers = {line["logger"] for line in lines}
    assert any(name.startswith("pyroute2") for name in loggers)
    assert "urllib3.connectionpool" in loggers
    # metaleg's own debug lines stay off at LOG_LEVEL=info.
    assert "metaleg.routing.netlink" not in loggers


def test_libraries_quieter_than_warning() -> None:
    lines = logged("debug", "error")
    assert [line["logger"] for line in lines] == ["metaleg.routing.netlink"]
