"""The lab's traffic recorder: a standalone script run inside a namespace (``ip netns exec``).

Started by :class:`tests.lab.traffic.Recorder`; imports nothing from the project
so that it starts fast with ``python -I -S``. It listens on UDP and TCP, IPv4
and IPv6 (separate sockets, ``IPV6_V6ONLY``), and for every UDP datagram and
every line received on a TCP connection it

* appends one JSON record to the log file::

    {"time": 1700000000.1, "proto": "udp", "family": 4, "src": "198.51.100.11",
     "sport": 40000, "dport": 5000, "event": "data", "token": "p-1"}

  (TCP connections also log ``event: "connect"`` and ``"close"`` with ``token: null``);
* answers the sender with one JSON line ``{"src": ..., "sport": ..., "token": ...}``:
  the source it saw, which proves the reply path too.

Prints ``ready`` on stdout once every socket is bound; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import threading
import time
from typing import Any

_lock = threading.Lock()
_log: Any = None


def _record(
    proto: str, family: int, src: str, sport: int, dport: int, event: str, token: str | None
) -> None:
    line = json.dumps(
        {
            "time": time.time(),
            "proto": proto,
            "family": family,
            "src": src,
            "sport": sport,
            "dport": dport,
            "event": event,
            "token": token,
        }
    )
    with _lock:
        _log.write(line + "\n")
        _log.flush()


def _answer(src: str, sport: int, token: str) -> bytes:
    return (json.dumps({"src": src, "sport": sport, "token": token}) + "\n").encode()


def _udp_loop(sock: socket.socket, family: int, port: int) -> None:
    while True:
        try:
            data, address = sock.recvfrom(65535)
        except OSError:
            continue
        token = data.decode(errors="replace").strip()
        src, sport = address[0], address[1]
        _record("udp", family, src, sport, port, "data", token)
        # An error means the reply path is broken: the log has the datagram anyway.
        with contextlib.suppress(OSError):
            sock.sendto(_answer(src, sport, token), address)


def _tcp_connection(conn: socket.socket, address: Any, family: int, port: int) -> None:
    src, sport = address[0], address[1]
    _record("tcp", family, src, sport, port, "connect", None)
    try:
        with conn, conn.makefile("rb") as reader:
            for raw in reader:
                token = raw.decode(errors="replace").strip()
                _record("tcp", family, src, sport, port, "data", token)
                conn.sendall(_answer(src, sport, token))
    except OSError:
        pass
    _record("tcp", family, src, sport, port, "close", None)


def _tcp_loop(sock: socket.socket, family: int, port: int) -> None:
    while True:
        try:
            conn, address = sock.accept()
        except OSError:
            continue
        threading.Thread(
            target=_tcp_connection, args=(conn, address, family, port), daemon=True
        ).start()


def _bind(family: int, kind: int, port: int) -> socket.socket:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    sock = socket.socket(af, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("0.0.0.0" if family == 4 else "::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(256)
    return sock


def main() -> None:
    global _log
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--udp-port", type=int, required=True)
    parser.add_argument("--tcp-port", type=int, required=True)
    parser.add_argument("--families", default="4,6")
    args = parser.parse_args()
    _log = open(args.log, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    families = [int(f) for f in args.families.split(",") if f]
    for family in families:
        udp = _bind(family, socket.SOCK_DGRAM, args.udp_port)
        tcp = _bind(family, socket.SOCK_STREAM, args.tcp_port)
        threading.Thread(target=_udp_loop, args=(udp, family, args.udp_port), daemon=True).start()
        threading.Thread(target=_tcp_loop, args=(tcp, family, args.tcp_port), daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.wait(3600):
        pass
    with _lock:
        _log.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
