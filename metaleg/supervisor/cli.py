"""``metaleg-supervisor``: the agent's command line.

- ``run``: start the watcher, firewall and routing workers and supervise them.
- ``cleanup``: remove every kernel object metaleg owns (idempotent, exit 0).

Configuration comes from environment variables (see :mod:`metaleg.config`);
an invalid value ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from metaleg.config import Config, ConfigError, load_config
from metaleg.logs import setup_logging

EXIT_CONFIG = 2


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
    config = _config()
    setup_logging("supervisor", config.log_level, config.log_format)
    from metaleg.supervisor.supervisor import Supervisor

    return Supervisor(config).run()


def command_cleanup(arguments: argparse.Namespace) -> int:
    config = _config(require_node=False)
    setup_logging("cleanup", config.log_level, config.log_format)
    log = logging.getLogger("metaleg.cleanup")
    from metaleg.firewall.iptables import IptablesBackend
    from metaleg.routing.netlink import NetlinkRoutingBackend

    failures = 0
    for backend in (
        IptablesBackend(),
        NetlinkRoutingBackend(config.route_table_id_offset, config.firewall_mask),
    ):
        try:
            backend.cleanup()
            log.info("removed metaleg's kernel objects", extra={"backend": backend.name})
        except Exception as error:
            failures += 1
            log.error("cleanup failed: %s", error, extra={"backend": backend.name})
        finally:
            backend.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(config.run_dir, "allocation.json"))
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
    return parser


def main(argv: list[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    raise SystemExit(arguments.handler(arguments))
