"""Time and profile the watcher's desired-state computation for N Services (no kernel, no root).

Run::

    .venv/bin/python -m bench.profile_watcher --n 1000
    .venv/bin/python -m bench.profile_watcher --n 5000 --repeat 50 --limit 40

The cluster of :mod:`bench.agent` (15 Nodes, N labelled Services of 10
dual-stack pods on ``node-00``, their EndpointSlices and ServiceL2Statuses) is
built in the API emulator's store, listed and parsed as the watcher does, and
handed to the :class:`~metaleg.watcher.tracker.EgressTracker`. Printed: the first
(whole) computation, then the median of ``--repeat`` single events (one
EndpointSlice of one Service changes: an event and ``compute``, what the watcher
does per event), and a cProfile of one more such event. The whole computation
(:func:`compute_node_state`, the tracker's oracle) is timed too, for comparison.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from typing import Any

from bench.agent import Cluster
from bench.common import NODE
from metaleg.config import load_config
from metaleg.watcher.cluster import ClusterState, Problem
from metaleg.watcher.desired import compute_node_state
from metaleg.watcher.feeds import PARSERS, object_key
from metaleg.watcher.main import Watcher
from tests.kubeapi import KubeApiServer


def build(n: int, run_dir: str) -> tuple[Watcher, list[dict[str, Any]]]:
    """The watcher's tracker holding the cluster; and the EndpointSlices, to change them."""
    api = KubeApiServer()
    Cluster(api).populate(n)
    config = load_config({"NODE_NAME": NODE, "METALEG_RUN_DIR": run_dir})
    watcher = Watcher(config)
    slices: list[dict[str, Any]] = []
    for kind in ("services", "endpointslices", "nodes", "servicel2statuses", "pods"):
        parse, resource = PARSERS[kind]
        for obj in api.store.list(kind)["items"]:
            problems: list[Problem] = []
            watcher.tracker.upsert(resource, str(object_key(obj)), parse(obj, problems))
            if kind == "endpointslices":
                slices.append(obj)
    return watcher, slices


def one_event(watcher: Watcher, slices: list[dict[str, Any]], index: int) -> None:
    """One EndpointSlice gains or loses its first endpoint's IP (alternating), then compute."""
    parse, resource = PARSERS["endpointslices"]
    obj = slices[index % len(slices)]
    endpoint = obj["endpoints"][0]
    address = endpoint["addresses"][0]
    flipped = address[:-1] + ("7" if address[-1] != "7" else "8")
    endpoint["addresses"] = [flipped]
    problems: list[Problem] = []
    watcher.tracker.upsert(resource, str(object_key(obj)), parse(obj, problems))
    watcher.tracker.compute()


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.profile_watcher")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--limit", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlb-watch-") as run_dir:
        watcher, slices = build(args.n, run_dir)
        started = time.perf_counter()
        watcher.tracker.compute()
        first = time.perf_counter() - started
        cluster = watcher.tracker.cluster
        copy = ClusterState(
            cluster.services, cluster.slices, cluster.nodes, cluster.l2_statuses, cluster.pods
        )
        started = time.perf_counter()
        compute_node_state(copy, watcher.settings, watcher.allocation)
        whole = time.perf_counter() - started
        times = []
        for index in range(args.repeat):
            started = time.perf_counter()
            one_event(watcher, slices, index)
            times.append(time.perf_counter() - started)
        print(
            f"N={args.n}: first computation {first * 1000:.1f} ms; whole computation "
            f"(compute_node_state) {whole * 1000:.1f} ms; one EndpointSlice event + compute: "
            f"median {statistics.median(times) * 1000:.3f} ms, "
            f"max {max(times) * 1000:.3f} ms over {args.repeat} events"
        )
        profile = cProfile.Profile()
        profile.enable()
        one_event(watcher, slices, args.repeat)
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
