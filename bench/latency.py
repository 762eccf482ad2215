"""End-to-end latency: an EndpointSlice update at the API server to the kernel of the node.

Run::

    .venv/bin/python -m bench.latency              # N=100, 1000, 5000 Services, 200 changes each
    .venv/bin/python -m bench.latency --quick      # N=100 and 1000, 30 changes
    .venv/bin/python -m bench.latency --n 5000 --changes 300 --backends nftables

The real agent (``metaleg-supervisor run``: supervisor, watcher, firewall,
routing) runs in a network namespace of its own, talking over HTTP to the
in-process Kubernetes API emulator that listens inside that namespace (see
:mod:`bench.agent`), which holds N labelled Services of 10 dual-stack pods.
Once the agent is ready, each change replaces one pod IP of one Service's
EndpointSlice (IPv4 and IPv6 alternately; a different Service each time) by
a new address, written straight into the emulator's store; a process inside
the namespace polls the kernel (libnftables ``get element`` / ipset ``test``
over netlink, every 0.5 ms) until the new address is in the Service's set or
map. Latency = that moment minus the moment just before the write (the same
monotonic clock). The next change starts after the old address is gone too.

From the agent's JSON logs (millisecond timestamps) each change is also split
into stages: API write -> watcher logs the Service's new egress (watch
delivery, 20 ms coalescing, the desired-state computation) -> supervisor logs
the new generation -> firewall worker logs "applied snapshot".

With ``--profile`` (and py-spy installed) the watcher, firewall and supervisor
processes are sampled during the changes and their top functions printed.

Each N gets a fresh agent. Goals (issue 13): p99 <= 30 ms at N=1000 and
p99(5000) / p99(100) <= 2, for both backends.

Results: a table on stdout and ``bench/results/latency.json``
(``backends.<backend>.<N>``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from bench import pyspy
from bench.agent import AgentBench, KernelPoller, LogLine, kernel_target
from bench.common import (
    NAMESPACE,
    RESULTS_DIR,
    exit_on_sigterm,
    extra_ip4,
    extra_ip6,
    fmt_ratio,
    machine,
    ms,
    pod_ip4,
    pod_ip6,
    ratio,
    require_root,
    service_name,
    summary,
    table,
    write_results,
)

STAGES = ("api->watcher", "watcher->supervisor", "supervisor->firewall applied")
GOAL_P99_1000 = 0.030
"""Issue 13: p99 at N=1000, both backends."""
GOAL_GROWTH = 2.0
"""Issue 13: p99(5000) / p99(100)."""


def run_backend(
    backend: str, n: int, changes: int, ips: int, profile: bool, env: dict[str, str] | None = None
) -> dict[str, Any]:
    with AgentBench(n, backend, ips=ips) as bench:
        bench.env.update(env or {})  # (not as **kwargs: they would reach ips= for mypy)
        started = time.monotonic()
        bench.start()
        report = bench.wait_ready(timeout=600)
        ready_seconds = time.monotonic() - started
        print(
            f"{backend} N={n}: agent ready with {len(report.services)} Services in {ready_seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(1.0)  # let the start-up settle (first republish, metrics)
        bench.log_lines()  # skip the start-up lines
        poller = KernelPoller(bench.netns)
        spies = {}
        if profile:
            for name, pid in bench.pids().items():
                if name in ("watcher", "firewall", "supervisor"):
                    path = str(RESULTS_DIR / f"latency-{backend}-{n}-{name}.pyspy")
                    spy = pyspy.record(pid, path)
                    if spy is not None:
                        spies[name] = (spy, path)
            time.sleep(1.0)
        addresses: dict[tuple[int, int], list[str]] = {}
        samples: list[float] = []
        timeouts = 0
        marks: list[tuple[float, str]] = []
        try:
            for k in range(changes):
                index = (k * 7919 + 13) % n
                family = 4 if k % 2 == 0 else 6
                current = addresses.setdefault(
                    (index, family),
                    [(pod_ip4 if family == 4 else pod_ip6)(index, j, ips) for j in range(ips)],
                )
                old = current[-1]
                new = (extra_ip4 if family == 4 else extra_ip6)(k)
                current[-1] = new
                kind, set_name = kernel_target(backend, index, family)
                wall = time.time()
                before = time.monotonic()
                bench.cluster.set_endpoints(index, family, current)
                seen, _, _ = poller.wait(kind, set_name, new, timeout=30)
                if seen is None:
                    timeouts += 1
                    print(f"{backend}: change {k} not applied within 30 s", file=sys.stderr)
                else:
                    samples.append(seen - before)
                marks.append((wall, f"{NAMESPACE}/{service_name(index)}"))
                poller.wait(kind, set_name, old, present=False, timeout=30)
        finally:
            poller.close()
            for spy, _ in spies.values():
                pyspy.stop(spy)
        profiles = {name: pyspy.collapse(path, 20) for name, (_, path) in spies.items()}
        time.sleep(1.0)  # the last "applied" lines come after the kernel shows the change
        stages = stage_breakdown(bench.log_lines(), marks)
        return {
            "n": n,
            "changes": changes,
            "ready_seconds": ready_seconds,
            "latency": summary(samples),
            "timeouts": timeouts,
            "samples": samples,
            "stages": {name: summary(values) for name, values in stages.items()},
            "profiles": profiles,
        }


def stage_breakdown(lines: list[LogLine], marks: list[tuple[float, str]]) -> dict[str, list[float]]:
    """Per change, the time between consecutive log events (see the module doc)."""
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    lines = sorted(lines, key=lambda line: line.time)
    for wall, service in marks:
        # Log times are truncated to the millisecond: allow 1 ms before the write.
        watcher = next(
            (
                x
                for x in lines
                if x.time >= wall - 0.001
                and x.process == "watcher"
                and x.fields.get("service") == service
            ),
            None,
        )
        if watcher is None:
            continue
        supervisor = next(
            (
                x
                for x in lines
                if x.time >= watcher.time
                and x.process == "supervisor"
                and x.msg == "new desired state"
            ),
            None,
        )
        if supervisor is None:
            continue
        firewall = next(
            (
                x
                for x in lines
                if x.time >= supervisor.time
                and x.process == "firewall"
                and x.msg.startswith("applied snapshot")
                and x.fields.get("generation", 0) >= supervisor.fields.get("generation", 0)
            ),
            None,
        )
        stages["api->watcher"].append(max(0.0, watcher.time - wall))
        stages["watcher->supervisor"].append(supervisor.time - watcher.time)
        if firewall is not None:
            stages["supervisor->firewall applied"].append(firewall.time - supervisor.time)
    return stages


def render_report(results: dict[str, Any]) -> str:
    runs = [(backend, r) for backend, by_n in results["backends"].items() for r in by_n.values()]
    rows = []
    for backend, r in runs:
        s = r["latency"]
        rows.append(
            [
                f"{backend} N={r['n']}",
                s["n"],
                ms(s["p50"]),
                ms(s["p95"]),
                ms(s["p99"]),
                ms(s["max"]),
                r["timeouts"],
            ]
        )
    lines = ["EndpointSlice update -> new pod IP in the node's kernel (end to end)"]
    lines.append(table(["backend", "changes", "p50", "p95", "p99", "max", "timeouts"], rows))
    goals = []
    for backend, by_n in results["backends"].items():
        p99 = {int(n): r["latency"]["p99"] for n, r in by_n.items()}
        if 1000 in p99:
            verdict = "met" if p99[1000] <= GOAL_P99_1000 else "MISSED"
            goals.append(
                f"{backend}: p99 at N=1000 {ms(p99[1000])} (goal <= {ms(GOAL_P99_1000)}: {verdict})"
            )
        low, high = min(p99), max(p99)
        if high > low:
            growth = ratio(p99[high], p99[low])
            verdict = "met" if growth is not None and growth <= GOAL_GROWTH else "MISSED"
            goals.append(
                f"{backend}: p99(N={high}) / p99(N={low}) {fmt_ratio(growth)} "
                f"(goal p99(5000) / p99(100) <= {GOAL_GROWTH:.0f}x: {verdict})"
            )
    if goals:
        lines += ["", *goals]
    rows = []
    for backend, r in runs:
        for stage, s in r["stages"].items():
            rows.append(
                [f"{backend} N={r['n']}: {stage}", s["n"], ms(s["p50"]), ms(s["p95"]), ms(s["p99"])]
            )
    lines.append("")
    lines.append("Stages from the agent's logs (millisecond timestamps)")
    lines.append(table(["stage", "n", "p50", "p95", "p99"], rows))
    for backend, r in runs:
        for name, text in r.get("profiles", {}).items():
            lines.append("")
            lines.append(f"py-spy, {backend} agent N={r['n']}, {name} process, during the changes")
            lines.append(text)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--n",
        default="100,1000,5000",
        help="labelled Services, comma-separated (a fresh agent each)",
    )
    parser.add_argument("--changes", type=int, default=200, help="changes per backend")
    parser.add_argument("--ips", type=int, default=10, help="dual-stack pods per Service")
    parser.add_argument("--backends", default="iptables,nftables")
    parser.add_argument("--quick", action="store_true", help="N=100 and 1000, 30 changes")
    parser.add_argument(
        "--profile", action="store_true", help="sample watcher, firewall, supervisor with py-spy"
    )
    parser.add_argument(
        "--code",
        help="run the agent from the metaleg package in this directory, e.g. a commit's "
        "export: mkdir D && git archive C metaleg | tar -x -C D",
    )
    args = parser.parse_args(argv)
    require_root()
    exit_on_sigterm()
    info = machine()
    sizes = [100, 1000] if args.quick else [int(x) for x in args.n.split(",") if x.strip()]
    changes = 30 if args.quick else args.changes
    results: dict[str, Any] = {"n": sizes, "changes": changes, "backends": {}}
    env: dict[str, str] = {}
    if args.code:
        # The agent imports metaleg from there (PYTHONPATH precedes the editable install).
        env["PYTHONPATH"] = results["code"] = os.path.abspath(args.code)
    started = time.monotonic()
    for backend in (b.strip() for b in args.backends.split(",") if b.strip()):
        by_n = results["backends"][backend] = {}
        for n in sizes:
            by_n[str(n)] = run_backend(backend, n, changes, args.ips, args.profile, env)
    results["wall_seconds"] = time.monotonic() - started
    path = write_results("latency" + ("-quick" if args.quick else ""), results, info)
    print(render_report(results))
    print(f"\n({results['wall_seconds']:.0f} s; results in {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
