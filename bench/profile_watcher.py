"""Time and profile the watcher's desired-state computation for N Services (no kernel, no root).

Run::

    .venv/bin/python -m bench.profile_watcher --n 1000
    .venv/bin/python -m bench.profile_watcher --n 5000 --repeat 5 --limit 40

The cluster of :mod:`bench.agent` (15 Nodes, N labelled Services of 10
dual-stack pods on ``node-00``, their EndpointSlices and ServiceL2Statuses) is
built in the API emulator's store, listed and parsed as the watcher does
(``Watcher.handle`` of a ``replace`` event per resource), then
``Watcher.compute`` (``compute_node_state`` and what the watcher does around
it) runs ``--repeat`` times: the median time, then a cProfile of one more run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

from bench.agent import Cluster
from bench.common import NODE
from metaleg.config import load_config
from metaleg.watcher.informer import Event
from metaleg.watcher.main import Watcher
from tests.kubeapi import KubeApiServer

RESOURCES = {
    "services": "services",
    "endpointslices": "endpointslices",
    "nodes": "nodes",
    "servicel2statuses": "servicel2statuses",
    "pods": "pods",
}


def build(n: int, run_dir: str) -> Watcher:
    api = KubeApiServer()
    Cluster(api).populate(n)
    config = load_config({"NODE_NAME": NODE, "METALEG_RUN_DIR": run_dir})
    watcher = Watcher(config)
    for resource, plural in RESOURCES.items():
        listed = api.store.list(plural)
        watcher.handle(Event(resource, "replace", objects=listed["items"]))
    return watcher


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.profile_watcher")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--limit", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlb-watch-") as run_dir:
        watcher = build(args.n, run_dir)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            watcher.compute()
            times.append(time.perf_counter() - started)
        print(
            f"Watcher.compute at N={args.n}: median {statistics.median(times) * 1000:.1f} ms, "
            f"min {min(times) * 1000:.1f} ms over {args.repeat} runs"
        )
        profile = cProfile.Profile()
        profile.enable()
        watcher.compute()
        profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs()
    for key in ("cumulative", "tottime"):
        out.write(f"\n--- top {args.limit} by {key} ---\n")
        stats.sort_stats(key).print_stats(args.limit)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
