"""Traffic tools of the lab: a recorder on the "internet", one-shot probes and continuous streams.

All of them run as separate processes inside network namespaces
(``ip netns exec <ns> python -I -S <script>``), using two standalone scripts
next to this module:

* ``_recorder_main.py``: the :class:`Recorder` server. It listens on UDP and TCP,
  both families, logs every UDP datagram and every line (and connect/close) of
  every TCP connection as a JSON line (see :class:`Record`), and answers each
  with the source address it saw.
* ``_client_main.py``: :func:`probe` (one datagram or one TCP exchange, reports
  the apparent source, see :class:`ProbeResult`) and :class:`Stream` (N UDP
  datagrams per second plus a TCP connection sending N lines per second).

Timestamps are ``time.time()`` of this machine, so ``since=time.time()`` taken
by a test before an action selects what happened after it.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from tests.waiting import wait_until as wait_until

Family = Literal[4, 6]
Proto = Literal["udp", "tcp"]
Outcome = Literal["ok", "rejected", "timeout", "error"]

HERE = Path(__file__).resolve().parent
RECORDER_SCRIPT = HERE / "_recorder_main.py"
CLIENT_SCRIPT = HERE / "_client_main.py"
#: The interpreter for the helper scripts: ``-I -S`` keeps start-up at ~15 ms.
PYTHON = (sys.executable, "-I", "-S")

_tokens = itertools.count()


def new_token(prefix: str = "t") -> str:
    """A token unique on this machine for this run: ``<prefix><pid>-<counter>``.

    The counter has a fixed width, so that no token is a prefix of another
    (``token_prefix=`` filters rely on that).
    """
    return f"{prefix}{os.getpid()}-{next(_tokens):07d}"


def family_of(address: str) -> Family:
    """4 or 6, from an IP address (or a CIDR)."""
    version = ipaddress.ip_interface(address).version
    return 4 if version == 4 else 6


def netns_command(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed with ``ip netns exec <netns>`` (unchanged when ``netns`` is None)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def stop_process(process: subprocess.Popen[Any], grace: float = 2.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaps the process."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def start_ready(
    netns: str | None, argv: Sequence[str], what: str, timeout: float
) -> subprocess.Popen[str]:
    """Start a helper script (in ``netns``) and wait until it prints ``ready`` (bounded)."""
    process = subprocess.Popen(
        netns_command(netns, argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_ready(process, what, timeout)
    return process


def wait_ready(process: subprocess.Popen[str], what: str, timeout: float) -> None:
    """Wait for the ``ready`` line a helper script prints once it is listening/sending."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stop_process(process)
            raise TimeoutError(f"{what} did not get ready within {timeout}s")
        readable, _, _ = select.select([process.stdout], [], [], remaining)
        if not readable:
            continue
        line = process.stdout.readline()
        if line.strip() == "ready":
            return
        if not line:  # EOF: it died
            stderr = process.stderr.read() if process.stderr else ""
            process.wait()
            raise RuntimeError(f"{what} exited ({process.returncode}): {stderr.strip()}")


# --------------------------------------------------------------------------- recorder


@dataclass(frozen=True)
class Record:
    """One line of a recorder's log."""

    time: float
    proto: Proto
    family: Family
    src: str
    sport: int
    dport: int
    #: ``data`` (a datagram or a TCP line), ``connect`` or ``close`` (TCP only).
    event: Literal["data", "connect", "close"]
    #: The payload (stripped) for ``data``; None for connect/close.
    token: str | None


def read_records(path: Path) -> list[Record]:
    """Every complete record of a recorder log (a partly written last line is skipped)."""
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            fields = json.loads(line)
        except ValueError:
            continue
        records.append(Record(**fields))
    return records


def filter_records(
    records: Iterable[Record],
    *,
    since: float | None = None,
    until: float | None = None,
    proto: Proto | None = None,
    family: Family | None = None,
    event: str | None = "data",
    token: str | None = None,
    token_prefix: str | None = None,
    src: str | None = None,
) -> list[Record]:
    """The records matching every given criterion (``event="data"`` by default; None for all)."""
    return [
        r
        for r in records
        if (since is None or r.time >= since)
        and (until is None or r.time <= until)
        and (proto is None or r.proto == proto)
        and (family is None or r.family == family)
        and (event is None or r.event == event)
        and (token is None or r.token == token)
        and (token_prefix is None or (r.token or "").startswith(token_prefix))
        and (src is None or r.src == src)
    ]


class Recorder:
    """A recorder server (``_recorder_main.py``) running in a namespace, logging to ``log_path``.

    Use as a context manager, or :meth:`start` / :meth:`stop`. The lab starts one
    on its ``internet`` host; tests may start more (e.g. in a pod, to see the
    source of pod-to-pod traffic).
    """

    def __init__(
        self,
        netns: str,
        log_path: Path,
        *,
        udp_port: int,
        tcp_port: int,
        families: Sequence[Family] = (4, 6),
    ) -> None:
        self.netns = netns
        self.log_path = Path(log_path)
        self.udp_port = udp_port
        self.tcp_port = tcp_port
        self.families = tuple(families)
        self.process: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> Recorder:
        """Start the server and wait until all its sockets are bound."""
        argv = [
            *PYTHON,
            str(RECORDER_SCRIPT),
            "--log",
            str(self.log_path),
            "--udp-port",
            str(self.udp_port),
            "--tcp-port",
            str(self.tcp_port),
            "--families",
            ",".join(str(f) for f in self.families),
        ]
        self.log_path.touch()
        self.process = start_ready(self.netns, argv, f"recorder in {self.netns}", timeout)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and reap it; idempotent."""
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> Recorder:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def records(self, **criteria: Any) -> list[Record]:
        """The logged records matching ``criteria`` (see :func:`filter_records`)."""
        return filter_records(read_records(self.log_path), **criteria)

    def sources_seen(self, **criteria: Any) -> collections.Counter[str]:
        """How many data records each source address sent (see :func:`filter_records`)."""
        return collections.Counter(r.src for r in self.records(**criteria))


# --------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class ProbeResult:
    """What a one-shot probe learned."""

    #: The source address the recorder saw (its answer), None unless ``outcome == "ok"``.
    source: str | None
    #: ``ok``: answered; ``rejected``: ICMP error or local refusal (unreachable route,
    #: REJECT, RST); ``timeout``: no answer; ``error``: anything else (see ``error``).
    outcome: Outcome
    #: The source port the recorder saw.
    sport: int | None = None
    #: The probe socket's own address (the pod's IP, normally).
    local: str | None = None
    #: The exception text for anything but ``ok``.
    error: str | None = None
    #: The payload sent; find it in the recorder's log with ``token_prefix=token``.
    token: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def probe(
    netns: str,
    target: str,
    port: int,
    *,
    proto: Proto = "udp",
    timeout: float = 2.0,
    token: str | None = None,
) -> ProbeResult:
    """Send one probe from ``netns`` to a recorder at ``target:port`` and report the outcome."""
    token = token or new_token("p")
    argv = [
        *PYTHON,
        str(CLIENT_SCRIPT),
        "probe",
        "--family",
        str(family_of(target)),
        "--proto",
        proto,
        "--target",
        target,
        "--port",
        str(port),
        "--token",
        token,
        "--timeout",
        str(timeout),
    ]
    completed = subprocess.run(
        netns_command(netns, argv), capture_output=True, text=True, timeout=timeout + 15
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"probe in {netns} failed ({completed.returncode}): {completed.stderr.strip()}"
        )
    fields = json.loads(completed.stdout)
    return ProbeResult(
        source=fields["source"],
        outcome=fields["outcome"],
        sport=fields["sport"],
        local=fields["local"],
        error=fields["error"],
        token=token,
    )


# --------------------------------------------------------------------------- stream


@dataclass(frozen=True)
class StreamEvent:
    """One line of a stream client's log."""

    time: float
    proto: Proto | None
    #: ``sent``, ``reply``, ``error``, ``connect`` (TCP), ``started``, ``stopped``.
    event: str
    seq: int | None = None
    token: str | None = None
    #: For replies: the source address the recorder saw.
    src: str | None = None
    error: str | None = None
    #: For TCP connects: ``[address, port]`` of the client socket.
    local: list[Any] | None = None


class Stream:
    """Continuous traffic from a namespace to a recorder, until stopped.

    Sends ``rate`` UDP datagrams per second (tokens ``<prefix>-u-<seq>``) and keeps
    a TCP connection sending ``rate`` lines per second (``<prefix>-t-<seq>``),
    reconnecting when it breaks or gets no answer for ``stall`` seconds. The
    client logs what it sent and the answers (with the source the recorder saw)
    to ``out_path``; the recorder logs what arrived, so both sides can be
    counted. Pass ``udp_port=None`` or ``tcp_port=None`` to leave one out.
    """

    def __init__(
        self,
        netns: str,
        target: str,
        out_path: Path,
        *,
        udp_port: int | None,
        tcp_port: int | None,
        rate: float = 20.0,
        stall: float = 2.0,
        prefix: str | None = None,
    ) -> None:
        self.netns = netns
        self.target = target
        self.family: Family = family_of(target)
        self.out_path = Path(out_path)
        self.udp_port = udp_port
        self.tcp_port = tcp_port
        self.rate = rate
        self.stall = stall
        self.prefix = prefix or new_token("s")
        self.process: subprocess.Popen[str] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> Stream:
        argv = [
            *PYTHON,
            str(CLIENT_SCRIPT),
            "stream",
            "--family",
            str(self.family),
            "--target",
            self.target,
            "--udp-port",
            str(self.udp_port or 0),
            "--tcp-port",
            str(self.tcp_port or 0),
            "--rate",
            str(self.rate),
            "--stall",
            str(self.stall),
            "--prefix",
            self.prefix,
            "--out",
            str(self.out_path),
        ]
        self.process = start_ready(self.netns, argv, f"stream in {self.netns}", timeout)
        return self

    def stop(self) -> None:
        """Stop sending (SIGTERM, then SIGKILL) and reap the client; idempotent."""
        if self.process is not None:
            stop_process(self.process, grace=3.0)

    def __enter__(self) -> Stream:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def events(
        self,
        *,
        proto: Proto | None = None,
        event: str | None = None,
        since: float | None = None,
    ) -> list[StreamEvent]:
        """The client's logged events matching the criteria."""
        result = []
        try:
            text = self.out_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            try:
                item = StreamEvent(**json.loads(line))
            except (ValueError, TypeError):
                continue
            if (
                (proto is None or item.proto == proto)
                and (event is None or item.event == event)
                and (since is None or item.time >= since)
            ):
                result.append(item)
        return result

    def sent(self, proto: Proto | None = None, since: float | None = None) -> int:
        """How many datagrams/lines were sent."""
        return len(self.events(proto=proto, event="sent", since=since))

    def reply_sources(
        self, proto: Proto | None = None, since: float | None = None
    ) -> collections.Counter[str]:
        """How many answers came back, per source address the recorder reported."""
        return collections.Counter(
            e.src or "?" for e in self.events(proto=proto, event="reply", since=since)
        )

    def errors(self, proto: Proto | None = None, since: float | None = None) -> list[StreamEvent]:
        return self.events(proto=proto, event="error", since=since)
