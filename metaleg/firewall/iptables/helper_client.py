"""The backend's side of the xtables helper processes: start, talk to and stop one per family.

Each helper (:mod:`metaleg.firewall.iptables.helper`) runs as ``python -m
metaleg.firewall.iptables.helper <4|6> <fd> <parent pid>`` with one end of a
socket pair; :class:`XtablesHelper` sends it msgpack-encoded requests
(:mod:`metaleg.firewall.iptables.protocol`) over the other end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec

from metaleg.backend import BackendError
from metaleg.firewall.iptables.protocol import SyncReply, SyncRequest
from metaleg.model import Family

TOOL = {Family.IPV4: "iptables", Family.IPV6: "ip6tables"}
"""The command a family's rules belong to, for messages."""


class XtablesHelper:
    """One long-lived ``metaleg.firewall.iptables.helper`` process for one address family.

    Started on first use and again on the next call after it died; a request
    that fails (helper error, death, timeout) raises :class:`BackendError`.
    """

    def __init__(self, family: Family, timeout: float) -> None:
        self.family = family
        self.label = TOOL[family]
        self._timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The helper's process id while it runs."""
        return (
            self._process.pid
            if self._process is not None and self._process.poll() is None
            else None
        )

    def request(self, request: SyncRequest) -> SyncReply:
        """Send one request and wait for the answer."""
        self.send(request)
        return self.receive()

    def start(self) -> None:
        """Start the helper unless it runs; it loads python-iptables while the caller goes on."""
        if self._process is None or self._process.poll() is not None:
            self.stop()
            self._start()

    def send(self, request: SyncRequest) -> None:
        """Send one request (start the helper if needed); :meth:`receive` gets the answer."""
        self.start()
        assert self._process is not None and self._connection is not None
        try:
            self._connection.send_bytes(msgspec.msgpack.encode(request))
        except OSError as error:
            raise self._died(error) from error

    def receive(self) -> SyncReply:
        """Wait for the answer to the request sent last."""
        if self._process is None or self._connection is None:
            raise BackendError(f"{self.label}: no request pending (helper stopped)")
        try:
            if not self._connection.poll(self._timeout):
                self.stop()
                raise BackendError(
                    f"{self.label}: helper gave no answer within {self._timeout:.0f}s; stopped it"
                )
            data = self._connection.recv_bytes()
        except (EOFError, OSError) as error:
            raise self._died(error) from error
        reply = msgspec.msgpack.decode(data, type=SyncReply)
        if reply.error:
            raise BackendError(f"{self.label}: {reply.error}")
        return reply

    def _died(self, error: BaseException) -> BackendError:
        status = self._process.poll() if self._process is not None else None
        self.stop()
        return BackendError(f"{self.label}: helper process died (exit status {status}): {error!r}")

    def _start(self) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        environment = dict(os.environ)
        # Make sure the helper imports this very metaleg, installed or not.
        root = str(Path(__file__).resolve().parents[3])
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, (root, environment.get("PYTHONPATH")))
        )
        # python-iptables imports distutils.sysconfig; setuptools' distutils shim would
        # pull in setuptools and pkg_resources (~14 MiB per helper). The switch is
        # setuptools' own: stdlib distutils where Python still has it (3.11), otherwise
        # python-iptables falls back to sysconfig.
        environment["SETUPTOOLS_USE_DISTUTILS"] = "stdlib"
        command = [
            sys.executable,
            "-m",
            "metaleg.firewall.iptables.helper",
            str(int(self.family)),
            str(child_end.fileno()),
            str(os.getpid()),
        ]
        try:
            self._process = subprocess.Popen(
                command,
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # python-iptables borrows fd 1 to read extension output
                env=environment,
            )
        except OSError as error:
            parent_end.close()
            raise BackendError(f"{self.label}: cannot start helper process: {error}") from error
        finally:
            child_end.close()
        self._connection = Connection(parent_end.detach())

    def stop(self) -> None:
        """Stop the helper: closing the pipe makes it exit; kill it if it does not."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
