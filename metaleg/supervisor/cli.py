"""``metaleg-supervisor``: the agent's command line.

- ``run``: start the watcher, firewall and routing workers and supervise them; exit 4
  when another agent is active on this node (one line on stderr, nothing touched).
- ``cleanup``: remove every kernel object metaleg owns (idempotent, exit 0).
- ``status [--json]``: ask the running supervisor; exit 1 when none runs, 3 when
  it is unhealthy or not ready.
- ``wait-egress [--ip IP] [--node-address HOST] [--port PORT] [--timeout 60s]``: in a
  pod's init container, wait until the pod's egress works (:mod:`metaleg.supervisor.wait`).

Configuration comes from environment variables (see :mod:`metaleg.config`);
an invalid value ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from metaleg.config import Config, ConfigError, check_run_dir, load_config
from metaleg.lifecycle import map_large_blocks
from metaleg.logs import setup_logging

EXIT_CONFIG = 2
EXIT_NOT_RUNNING = 1
EXIT_UNHEALTHY = 3
EXIT_NEIGHBOUR = 4
"""``run``: another agent is active on this node (:mod:`metaleg.supervisor.neighbours`)."""
STATUS_TIMEOUT = 3.0


def _config(require_node: bool = True) -> Config:
    environ = dict(os.environ)
    if not require_node:
        environ.setdefault("NODE_NAME", "cleanup")
    try:
        return load_config(environ)
    except ConfigError as error:
        sys.stderr.write(f"metaleg-supervisor: {error}\n")
        raise SystemExit(EXIT_CONFIG) from None


def command_run(arguments: argparse.Namespace) -> int:
    map_large_blocks()
    config = _config()
    setup_logging("supervisor", config.log_level, config.log_format, config.log_level_libraries)
    from metaleg.ipc import prepare_run_dir
    from metaleg.node_events import post_node_event
    from metaleg.supervisor.neighbours import EVENT_REASON, NeighbourFound, claim_node

    try:
        check_run_dir(config.run_dir)
        prepare_run_dir(config.run_dir)
    except ConfigError as error:
        sys.stderr.write(f"metaleg-supervisor: {error}\n")
        return EXIT_CONFIG
    except OSError as error:
        sys.stderr.write(
            f"metaleg-supervisor: invalid configuration: METALEG_RUN_DIR={config.run_dir!r}: "
            f"cannot be created: {error.strerror or error}\n"
        )
        return EXIT_CONFIG
    # One agent per node, found before anything is touched (metrics, sockets, kernel).
    try:
        claim = claim_node(config)
    except NeighbourFound as error:
        sys.stderr.write(f"metaleg-supervisor: {error}\n")
        sys.stderr.flush()
        failure = post_node_event(config, EVENT_REASON, str(error))
        if failure:
            logging.getLogger("metaleg.supervisor").debug("no Event posted: %s", failure)
        return EXIT_NEIGHBOUR
    except ConfigError as error:
        sys.stderr.write(f"metaleg-supervisor: {error}\n")
        return EXIT_CONFIG
    except OSError as error:
        sys.stderr.write(f"metaleg-supervisor: cannot check for another agent: {error}\n")
        return EXIT_NOT_RUNNING
    # Before anything imports prometheus-client: it picks its storage at import time.
    from metaleg.supervisor.supervisor import prepare_metrics_directory

    prepare_metrics_directory(config.run_dir)
    from metaleg.supervisor.supervisor import AlreadyRunning, Supervisor

    try:
        return Supervisor(config).run()
    except AlreadyRunning as error:
        sys.stderr.write(f"metaleg-supervisor: {error}\n")
        return EXIT_NEIGHBOUR
    finally:
        claim.release()


def command_status(arguments: argparse.Namespace) -> int:
    config = _config(require_node=False)
    import msgspec
    import zmq

    from metaleg.ipc import control_endpoint
    from metaleg.supervisor.status import StatusReport, render_table

    endpoint = control_endpoint(config.run_dir)
    path = endpoint.removeprefix("ipc://")
    if not os.path.exists(path):
        sys.stderr.write(
            f"metaleg-supervisor: no supervisor is running (no control socket at {path})\n"
        )
        return EXIT_NOT_RUNNING
    context = zmq.Context()
    request = context.socket(zmq.REQ)
    request.setsockopt(zmq.LINGER, 0)
    try:
        request.connect(endpoint)
        request.send(b"status")
        if not request.poll(int(STATUS_TIMEOUT * 1000)):
            sys.stderr.write(
                f"metaleg-supervisor: no supervisor is running (no answer on {path} within {STATUS_TIMEOUT:.0f}s)\n"
            )
            return EXIT_NOT_RUNNING
        reply = request.recv()
    finally:
        request.close(0)
        context.term()
    try:
        report = msgspec.json.decode(reply, type=StatusReport)
    except msgspec.DecodeError as error:
        sys.stderr.write(f"metaleg-supervisor: unreadable status from the supervisor: {error}\n")
        return EXIT_NOT_RUNNING
    if arguments.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report), indent=2).decode() + "\n")
    else:
        sys.stdout.write(render_table(report) + "\n")
    return 0 if report.healthy and report.ready else EXIT_UNHEALTHY


def command_cleanup(arguments: argparse.Namespace) -> int:
    config = _config(require_node=False)
    setup_logging("cleanup", config.log_level, config.log_format, config.log_level_libraries)
    log = logging.getLogger("metaleg.cleanup")
    from metaleg.backend import Backend
    from metaleg.firewall.selection import APPLIED_STATE_FILE, ManagedFirewall, new_backend
    from metaleg.routing.backend import NetlinkRoutingBackend

    failures = 0
    # Both firewall backends, whichever ran: a node may have switched, or run the Go original.
    # Managed, so that the flows their rules bound are deleted too (the SNAT or null binding
    # would outlive the rules).
    backends: list[Backend] = [
        ManagedFirewall(new_backend("iptables"), None, config.run_dir),
        ManagedFirewall(new_backend("nftables"), None, config.run_dir),
        NetlinkRoutingBackend(config.route_table_id_offset, config.firewall_mask),
    ]
    for backend in backends:
        try:
            backend.cleanup()
            log.info("removed metaleg's kernel objects", extra={"backend": backend.name})
        except Exception as error:
            failures += 1
            log.error("cleanup failed: %s", error, extra={"backend": backend.name})
        finally:
            backend.close()
    for leftover in ("allocation.json", APPLIED_STATE_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(config.run_dir, leftover))
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaleg-supervisor",
        description="metaleg node agent: egress from a Service's MetalLB IP",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent in the foreground")
    run.set_defaults(handler=command_run)
    cleanup = commands.add_parser("cleanup", help="remove every kernel object metaleg owns")
    cleanup.set_defaults(handler=command_cleanup)
    status = commands.add_parser("status", help="show the running agent's processes and Services")
    status.add_argument("--json", action="store_true", help="stable JSON instead of a table")
    status.set_defaults(handler=command_status)
    # Listed for --help; main() hands its arguments to metaleg.supervisor.wait (one-line errors).
    commands.add_parser("wait-egress", help="wait until this pod's egress works (init container)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wait-egress"]:
        from metaleg.supervisor.wait import main as wait_egress

        raise SystemExit(wait_egress(argv[1:]))
    arguments = build_parser().parse_args(argv)
    raise SystemExit(arguments.handler(arguments))
