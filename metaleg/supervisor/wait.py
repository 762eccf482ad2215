"""``metaleg-supervisor wait-egress``: block until a pod's egress is in place (an init container).

It asks the agent on the pod's node (``GET /egress?ip=<pod IP>`` on its health
port, :mod:`metaleg.supervisor.gate`) every :data:`POLL_INTERVAL` seconds, each
request bounded by :data:`REQUEST_TIMEOUT`, until the answer is 200 (exit 0) or
``--timeout`` has passed (the last reason on stderr, exit 1). A 404 (the agent
does not know the pod yet), a 503 and no answer at all keep it waiting; each new
reason is printed once on stderr. Bad arguments: one line, exit 2.

Defaults come from the downward API: ``POD_IP`` (``status.podIP``) and
``HOST_IP`` (``status.hostIP``); the port from HEALTH_PROBE_BIND_ADDRESS (every
node's agent uses the same).
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from metaleg.config import ENVIRONMENT, parse_bind_address, parse_go_duration
from metaleg.supervisor.gate import EGRESS_PATH, reason_of

PROG = "metaleg-supervisor wait-egress"
EXIT_READY = 0
EXIT_TIMEOUT = 1
EXIT_USAGE = 2
POLL_INTERVAL = 0.5
REQUEST_TIMEOUT = 3.0
"""A bound on one request: the agent may itself wait up to about a second for the gateway node."""
DEFAULT_TIMEOUT = "60s"

Answer = tuple[int | None, str]
"""(HTTP status, reason); status None: no answer (the reason says why)."""


class UsageError(ValueError):
    """A bad argument or environment variable; the message is the one line to print."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class WaitTarget:
    """What to ask, where, and for how long."""

    ip: str
    host: str
    port: int
    timeout: float


def build_parser() -> argparse.ArgumentParser:
    """The options of ``wait-egress`` (errors raise :class:`UsageError`)."""
    parser = _OneLineParser(
        prog=PROG,
        description="wait until this pod's egress via its Service's LoadBalancer IP works",
    )
    parser.add_argument("--ip", help="the pod's IP (default: $POD_IP)")
    parser.add_argument("--node-address", help="the address of the pod's node (default: $HOST_IP)")
    parser.add_argument(
        "--port",
        help="the agent's health port (default: the port of $HEALTH_PROBE_BIND_ADDRESS, 21794)",
    )
    parser.add_argument(
        "--timeout",
        default=DEFAULT_TIMEOUT,
        help=f"give up after this Go duration (default {DEFAULT_TIMEOUT})",
    )
    return parser


def resolve(arguments: argparse.Namespace, environ: Mapping[str, str]) -> WaitTarget:
    """The target from the options and the downward-API variables, or :class:`UsageError`."""
    ip_text = arguments.ip if arguments.ip is not None else environ.get("POD_IP", "")
    if not ip_text:
        raise UsageError("no pod IP: give --ip or set POD_IP (downward API status.podIP)")
    try:
        ip = str(ipaddress.ip_address(ip_text.strip()))
    except ValueError:
        raise UsageError(f"invalid pod IP {ip_text!r}: not an IPv4 or IPv6 address") from None
    host = arguments.node_address if arguments.node_address is not None else environ.get("HOST_IP")
    if not host:
        raise UsageError(
            "no node address: give --node-address or set HOST_IP (downward API status.hostIP)"
        )
    host = host.strip().removeprefix("[").removesuffix("]")
    if arguments.port is not None:
        if not arguments.port.isdigit() or not 1 <= int(arguments.port) <= 65535:
            raise UsageError(f"invalid --port {arguments.port!r}: expected 1-65535")
        port = int(arguments.port)
    else:
        default = ENVIRONMENT["HEALTH_PROBE_BIND_ADDRESS"] or ""
        raw = environ.get("HEALTH_PROBE_BIND_ADDRESS", default)
        try:
            bind = parse_bind_address(raw.strip())
        except ValueError as error:
            raise UsageError(f"invalid HEALTH_PROBE_BIND_ADDRESS={raw!r}: {error}") from None
        if bind is None:
            raise UsageError("HEALTH_PROBE_BIND_ADDRESS=0 disables the agent's probes: give --port")
        port = bind.port
    try:
        timeout = parse_go_duration(arguments.timeout.strip())
    except ValueError as error:
        raise UsageError(f"invalid --timeout {arguments.timeout!r}: {error}") from None
    if timeout <= 0:
        raise UsageError(f"invalid --timeout {arguments.timeout!r}: must be positive")
    return WaitTarget(ip=ip, host=host, port=port, timeout=timeout)


def ask(target: WaitTarget, timeout: float) -> Answer:
    """One ``GET /egress?ip=`` to the node's agent, bounded by ``timeout`` (connect, read)."""
    connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        connection.request("GET", f"{EGRESS_PATH}?{urllib.parse.urlencode({'ip': target.ip})}")
        response = connection.getresponse()
        data = response.read(65536)
    except (OSError, http.client.HTTPException) as error:
        return None, f"no answer from {_url(target)}: {error or type(error).__name__}"
    finally:
        connection.close()
    return response.status, reason_of(data)


def _url(target: WaitTarget) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"http://{host}:{target.port}{EGRESS_PATH}"


def wait_for_egress(
    target: WaitTarget,
    *,
    ask: Callable[[WaitTarget, float], Answer] = ask,
    interval: float = POLL_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] = lambda line: None,
) -> Answer:
    """Ask until the answer is 200, a 400, or ``target.timeout`` has passed; the last answer.

    ``progress`` gets each new reason once (a pod's init log shows what it waits for).
    """
    deadline = clock() + target.timeout
    shown = ""
    while True:
        remaining = deadline - clock()
        status, reason = ask(target, max(0.05, min(REQUEST_TIMEOUT, remaining)))
        if status in (200, 400):
            return status, reason
        if reason != shown:
            shown = reason
            progress(f"{status or 'no answer'}: {reason}")
        remaining = deadline - clock()
        if remaining <= 0:
            return status, reason
        sleep(min(interval, remaining))


def main(argv: list[str], environ: Mapping[str, str] | None = None) -> int:
    """``metaleg-supervisor wait-egress [options]``; returns the exit status."""
    environ = os.environ if environ is None else environ
    try:
        target = resolve(build_parser().parse_args(argv), environ)
    except UsageError as error:
        sys.stderr.write(f"{PROG}: {error}\n")
        return EXIT_USAGE

    def progress(line: str) -> None:
        sys.stderr.write(f"{PROG}: {target.ip}: waiting: {line}\n")
        sys.stderr.flush()

    status, reason = wait_for_egress(target, progress=progress)
    if status == 200:
        sys.stdout.write(f"{target.ip}: egress ready: {reason}\n")
        return EXIT_READY
    if status == 400:
        sys.stderr.write(f"{PROG}: the agent refused the question: {reason}\n")
        return EXIT_USAGE
    sys.stderr.write(f"{PROG}: {target.ip}: timed out after {target.timeout:g}s: {reason}\n")
    return EXIT_TIMEOUT
