"""The lab's traffic client: a standalone script run inside a pod's namespace.

Started by :mod:`tests.lab.traffic`; imports nothing from the project so that
it starts fast with ``python -I -S``. Two modes:

``probe``
    send one token over UDP (or one line over a TCP connection) to a recorder,
    wait for its answer and print one JSON object on stdout::

        {"outcome": "ok", "source": "198.51.100.11", "sport": 40000, "local": "10.244.1.10", "error": null}

    ``outcome`` is ``ok``, ``rejected`` (an ICMP error or a local refusal such as
    an ``unreachable`` route), ``timeout`` or ``error`` (anything else).

``stream``
    until SIGTERM, send ``--rate`` UDP datagrams per second and/or keep a TCP
    connection sending ``--rate`` lines per second (reconnecting when it breaks
    or stalls); log every event as a JSON line to ``--out``::

        {"time": ..., "proto": "udp", "event": "sent", "seq": 3, "token": "s1-u-3"}
        {"time": ..., "proto": "udp", "event": "reply", "seq": 3, "token": "s1-u-3", "src": "198.51.100.200"}
        {"time": ..., "proto": "tcp", "event": "error", "error": "ConnectionRefusedError: ..."}
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

# Linux values; Python's socket module does not export them.
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
REJECTED_ERRNOS = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EACCES,
    errno.EPERM,
    errno.ECONNRESET,
}


def _socket(family: int, kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, kind)
    if kind == socket.SOCK_DGRAM:
        # Report every ICMP error on the socket, not only the "hard" ones.
        if family == 4:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    return sock


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def probe(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "outcome": "error",
        "source": None,
        "sport": None,
        "local": None,
        "error": None,
    }
    kind = socket.SOCK_DGRAM if args.proto == "udp" else socket.SOCK_STREAM
    deadline = time.monotonic() + args.timeout
    try:
        with _socket(args.family, kind) as sock:
            sock.settimeout(args.timeout)
            sock.connect((args.target, args.port))
            result["local"] = sock.getsockname()[0]
            if kind == socket.SOCK_DGRAM:
                sock.send(args.token.encode())
                while True:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    answer = json.loads(sock.recv(65535))
                    if answer.get("token") == args.token:
                        break  # an answer to an earlier probe could arrive first: skip it
            else:
                sock.sendall(args.token.encode() + b"\n")
                with sock.makefile("rb") as reader:
                    line = reader.readline()
                if not line:
                    raise ConnectionResetError(
                        errno.ECONNRESET, "connection closed without an answer"
                    )
                answer = json.loads(line)
                if answer.get("token") != args.token:
                    raise ValueError(f"answer for another token: {answer}")
            result.update(outcome="ok", source=answer["src"], sport=answer["sport"])
    except TimeoutError as error:
        result.update(outcome="timeout", error=_describe(error))
    except OSError as error:
        rejected = error.errno in REJECTED_ERRNOS
        result.update(outcome="rejected" if rejected else "error", error=_describe(error))
    except (ValueError, KeyError) as error:
        result.update(outcome="error", error=_describe(error))
    return result


class _Out:
    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        self._lock = threading.Lock()

    def write(self, **fields: Any) -> None:
        fields["time"] = time.time()
        line = json.dumps(fields)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


def _udp_stream(args: argparse.Namespace, out: _Out, stop: threading.Event) -> None:
    interval = 1.0 / args.rate
    sock = _socket(args.family, socket.SOCK_DGRAM)
    sock.connect((args.target, args.udp_port))

    def receive() -> None:
        while not stop.is_set():
            try:
                answer = json.loads(sock.recv(65535))
                token = answer.get("token", "")
                seq = int(token.rsplit("-", 1)[-1])
                out.write(proto="udp", event="reply", seq=seq, token=token, src=answer.get("src"))
            except OSError as error:
                if stop.is_set():
                    return
                out.write(proto="udp", event="error", error=_describe(error))
            except (ValueError, KeyError) as error:
                out.write(proto="udp", event="error", error=_describe(error))

    threading.Thread(target=receive, daemon=True).start()
    seq = 0
    next_send = time.monotonic()
    while not stop.is_set():
        token = f"{args.prefix}-u-{seq}"
        try:
            sock.send(token.encode())
            out.write(proto="udp", event="sent", seq=seq, token=token)
        except OSError as error:
            out.write(proto="udp", event="error", seq=seq, token=token, error=_describe(error))
        seq += 1
        next_send += interval
        stop.wait(max(0.0, next_send - time.monotonic()))


def _tcp_stream(args: argparse.Namespace, out: _Out, stop: threading.Event) -> None:
    interval = 1.0 / args.rate
    seq = 0
    while not stop.is_set():
        sock = _socket(args.family, socket.SOCK_STREAM)
        last_reply = [time.monotonic()]
        broken = threading.Event()
        try:
            sock.settimeout(args.stall)
            sock.connect((args.target, args.tcp_port))
            sock.settimeout(None)
            out.write(proto="tcp", event="connect", local=list(sock.getsockname()[:2]))
        except OSError as error:
            out.write(proto="tcp", event="error", error=_describe(error))
            sock.close()
            stop.wait(min(0.5, args.stall))
            continue

        def receive(
            sock: socket.socket = sock,
            last_reply: list[float] = last_reply,
            broken: threading.Event = broken,
        ) -> None:
            try:
                with sock.makefile("rb") as reader:
                    for line in reader:
                        answer = json.loads(line)
                        token = answer.get("token", "")
                        seq = int(token.rsplit("-", 1)[-1])
                        last_reply[0] = time.monotonic()
                        out.write(
                            proto="tcp", event="reply", seq=seq, token=token, src=answer.get("src")
                        )
            except (OSError, ValueError) as error:
                if not broken.is_set() and not stop.is_set():
                    out.write(proto="tcp", event="error", error=_describe(error))
            broken.set()

        threading.Thread(target=receive, daemon=True).start()
        next_send = time.monotonic()
        while not stop.is_set() and not broken.is_set():
            token = f"{args.prefix}-t-{seq}"
            try:
                sock.sendall(token.encode() + b"\n")
                out.write(proto="tcp", event="sent", seq=seq, token=token)
            except OSError as error:
                out.write(proto="tcp", event="error", seq=seq, token=token, error=_describe(error))
                break
            seq += 1
            if time.monotonic() - last_reply[0] > args.stall:
                out.write(proto="tcp", event="error", error=f"stalled: no answer for {args.stall}s")
                break
            next_send += interval
            stop.wait(max(0.0, next_send - time.monotonic()))
        broken.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def stream(args: argparse.Namespace) -> None:
    out = _Out(args.out)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = []
    if args.udp_port:
        threads.append(threading.Thread(target=_udp_stream, args=(args, out, stop), daemon=True))
    if args.tcp_port:
        threads.append(threading.Thread(target=_tcp_stream, args=(args, out, stop), daemon=True))
    for thread in threads:
        thread.start()
    out.write(proto=None, event="started")
    print("ready", flush=True)
    while not stop.wait(3600):
        pass
    for thread in threads:
        thread.join(2)
    out.write(proto=None, event="stopped")
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--family", type=int, choices=(4, 6), required=True)
    p.add_argument("--proto", choices=("udp", "tcp"), required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--timeout", type=float, default=2.0)
    s = sub.add_parser("stream")
    s.add_argument("--family", type=int, choices=(4, 6), required=True)
    s.add_argument("--target", required=True)
    s.add_argument("--udp-port", type=int, default=0)
    s.add_argument("--tcp-port", type=int, default=0)
    s.add_argument("--rate", type=float, default=10.0)
    s.add_argument("--stall", type=float, default=2.0)
    s.add_argument("--prefix", required=True)
    s.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.mode == "probe":
        print(json.dumps(probe(args)), flush=True)
        sys.exit(0)
    stream(args)


if __name__ == "__main__":
    main()
