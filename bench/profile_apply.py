"""Profile one firewall or routing operation of :mod:`bench.apply_scale` with cProfile.

Run::

    .venv/bin/python -m bench.profile_apply --backend nftables --n 1000 --op add-ip
    .venv/bin/python -m bench.profile_apply --backend iptables --n 1000 --op full --helpers

``--op`` is ``full`` (a fresh backend's resync), ``noop`` (a resync with
nothing changed) or one of the incremental changes (``add-ip``, ``move``,
``move-here``; ``--reps`` of them, accumulating as in apply_scale). The
backend runs in a fresh namespace inside ManagedFirewall, as in apply_scale.
Prints the functions with the largest cumulative and own time, with their
share of the profiled wall time. ``--helpers`` (iptables backend) also samples
the xtables helper processes with py-spy, if it is installed
(``.venv/bin/pip install py-spy``), and prints their top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import tempfile
import time
from typing import Any

from bench.apply_scale import CHANGES, _firewall, change_sequence
from bench.common import exit_on_sigterm, require_root, scale_state
from bench.pyspy import collapse, record, stop
from tests.netns import namespace, run_in_netns


def _stats(profile: cProfile.Profile, wall: float, limit: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs()
    out.write(f"profiled wall time: {wall * 1000:.1f} ms\n")
    for key in ("cumulative", "tottime"):
        out.write(f"\n--- top {limit} by {key} ---\n")
        stats.sort_stats(key).print_stats(limit)
    return out.getvalue()


def profile(backend: str, n: int, op: str, reps: int, limit: int, helpers: bool) -> str:
    state = scale_state(n)
    sequence = change_sequence(state, n, 10, reps)[op] if op in CHANGES else []
    with tempfile.TemporaryDirectory(prefix="mlb-prof-") as run_dir:
        if backend == "netlink":
            from bench.common import FWMASK, TABLE_OFFSET
            from metaleg.routing.backend import NetlinkRoutingBackend

            target: Any = NetlinkRoutingBackend(TABLE_OFFSET, FWMASK)
        else:
            target = _firewall(backend, run_dir)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            if op != "full":
                target.resync(state)
            if helpers and backend == "iptables":
                if op == "full":
                    target.backend.cleanup()  # starts the helpers; nothing to remove yet
                else:
                    target.backend.resync(state)
                pids = [p for p in target.backend.helper_pids().values() if p]
                for pid in pids:
                    spy = record(pid, os.path.join(run_dir, f"helper.{pid}"), rate=500)
                    if spy is not None:
                        spies.append(spy)
                time.sleep(0.5)
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            if op in ("full", "noop"):
                target.resync(state)
            else:
                for new in sequence:
                    target.apply(new)
            profiler.disable()
            wall = time.perf_counter() - started
            text = _stats(profiler, wall, limit)
            for spy in spies:
                stop(spy)
            for name in sorted(os.listdir(run_dir)):
                if name.startswith("helper."):
                    text += f"\n--- py-spy, xtables helper {name} ---\n"
                    text += collapse(os.path.join(run_dir, name), limit)
            return text
        finally:
            target.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_apply")
    parser.add_argument(
        "--backend", default="nftables", choices=("iptables", "nftables", "netlink")
    )
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--op", default="add-ip", choices=("full", "noop", *CHANGES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--limit", type=int, default=25)
    parser.add_argument("--helpers", action="store_true", help="py-spy the xtables helpers too")
    args = parser.parse_args(argv)
    require_root()
    exit_on_sigterm()
    with namespace("mlb") as name:
        text = run_in_netns(
            name,
            profile,
            args.backend,
            args.n,
            args.op,
            args.reps,
            args.limit,
            args.helpers,
            timeout=3600,
        )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
