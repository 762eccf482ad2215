"""Run the emulator as a process: ``python -m tests.kubeapi --listen 127.0.0.1:0 ...``.

``--listen`` is the control/test listener (in the namespace the process starts
in); ``--netns NAME --netns-listen HOST:PORT`` adds a listener bound inside
network namespace NAME, serving the same store. Once listening, the bound
addresses are written to ``--port-file`` as JSON (atomically). SIGTERM or
SIGINT stops the server and the process exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from .control import write_kubeconfig
from .server import KubeApiServer, _split_host_port


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.kubeapi", description=__doc__)
    parser.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="control/test listener (default 127.0.0.1:0, a free port)",
    )
    parser.add_argument(
        "--port-file", metavar="PATH", help="write the bound addresses here as JSON once listening"
    )
    parser.add_argument("--netns", metavar="NAME", help="network namespace of --netns-listen")
    parser.add_argument(
        "--netns-listen", metavar="HOST:PORT", help="an additional listener bound inside --netns"
    )
    parser.add_argument(
        "--kubeconfig", metavar="PATH", help="write a kubeconfig for the --listen address"
    )
    parser.add_argument(
        "--history-size",
        type=int,
        default=10000,
        help="watch events retained for resourceVersion replay",
    )
    parser.add_argument("--bookmark-interval", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument(
        "--watch-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="length of watches that do not set timeoutSeconds",
    )
    parser.add_argument(
        "--disable-group",
        action="append",
        default=[],
        metavar="GROUP",
        help="start with this API group unavailable (repeatable)",
    )
    parser.add_argument(
        "--no-bootstrap",
        action="store_true",
        help="start empty: no system namespaces, no kubernetes Service",
    )
    parser.add_argument(
        "--no-require-namespaces",
        action="store_true",
        help="allow namespaced objects in namespaces that do not exist",
    )
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    if bool(args.netns) != bool(args.netns_listen):
        parser.error("--netns and --netns-listen go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    host, port = _split_host_port(args.listen)
    server = KubeApiServer(
        host,
        port,
        history_size=args.history_size,
        require_namespaces=not args.no_require_namespaces,
        bootstrap=not args.no_bootstrap,
        bookmark_interval=args.bookmark_interval,
        watch_timeout=args.watch_timeout,
        verbose=args.verbose,
    )
    for group in args.disable_group:
        server.set_group_available(group, False)
    if args.netns:
        netns_host, netns_port = _split_host_port(args.netns_listen)
        server.add_listener(netns_host, netns_port, netns=args.netns)

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())

    server.start()
    ports: dict[str, Any] = {"pid": os.getpid(), "listen": server.listeners[0].describe()}
    if args.netns:
        ports["netns"] = server.listeners[1].describe()
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, server.url)
    if args.port_file:
        temporary = f"{args.port_file}.tmp{os.getpid()}"
        with open(temporary, "w") as file:
            json.dump(ports, file)
        os.replace(temporary, args.port_file)
    print(json.dumps(ports), file=sys.stderr if args.port_file else sys.stdout, flush=True)
    try:
        while not stopping.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
