"""Memory and CPU of the agent's processes: at N Services, over a churn run, and idle.

Run::

    .venv/bin/python -m bench.resources                 # N=0,1000,5000; 10 min churn (~15 min)
    .venv/bin/python -m bench.resources --minutes 2     # a shorter churn
    .venv/bin/python -m bench.resources --quick         # N=100; 30 s churn, 10 s idle

For each firewall backend (``--backends``) the real agent runs in a network
namespace with the API emulator holding N labelled Services (see
:mod:`bench.agent`). Per process — supervisor, watcher, firewall (with its
children, the iptables backend's xtables helpers, listed separately) and
routing and the SNAT audit process (AUDIT_LOG=on, the default) — RSS (``VmRSS``, /proc/<pid>/status) and PSS (/proc/<pid>/smaps_rollup;
shared pages divided among the processes sharing them, so PSS adds up) are read:

* at each N of ``--sizes`` (a fresh agent per N, ready and settled for 5 s);
* idle: CPU time (utime + stime, /proc/<pid>/stat) over ``--idle`` seconds
  (default 60) with nothing changing, at N = ``--churn-n``, as % of one core;
* churn: at N = ``--churn-n`` (default 1000) EndpointSlice updates go on for
  ``--minutes`` (default 10): ``--rate`` per second (default 5), each replacing
  one pod IP of a Service chosen at random by another address and back (the
  state keeps its size). The agents of all backends run their churn at the same
  time (same updates), which halves the wall time; memory is sampled every
  30 s; growth = PSS after the churn (and 10 s to settle) over PSS before it;
  also shown: the growth after the first minute and over the second half (the
  agent's periodic full re-sync, RECONCILIATION_INTERVAL 5 min, falls into the
  churn and raises the high-water mark once).

Results: tables on stdout and ``bench/results/resources.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from typing import Any

from bench.agent import AgentBench
from bench.common import (
    NODE,
    exit_on_sigterm,
    extra_ip4,
    extra_ip6,
    machine,
    pod_ip4,
    pod_ip6,
    require_root,
    table,
    write_results,
)
from metaleg.config import Config, parse_go_duration

MAIN = ("supervisor", "forkserver", "watcher", "firewall", "routing", "audit")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024.0


def memory(pid: int) -> dict[str, float]:
    """RSS and PSS of a process in KiB (0 when it is gone)."""
    rss = pss = 0.0
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    rss = float(line.split()[1])
                    break
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    pss = float(line.split()[1])
                    break
    return {"rss_kib": rss, "pss_kib": pss}


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def snapshot(bench: AgentBench) -> dict[str, Any]:
    """Memory per process (helper children under their own name) and totals, in KiB."""
    pids = bench.pids()
    processes = {name: {"pid": pid, **memory(pid)} for name, pid in pids.items()}
    total_rss = sum(p["rss_kib"] for p in processes.values())
    total_pss = sum(p["pss_kib"] for p in processes.values())
    return {"processes": processes, "total_rss_kib": total_rss, "total_pss_kib": total_pss}


def idle_cpu(benches: dict[str, AgentBench], seconds: float) -> dict[str, Any]:
    """CPU of every process of every agent over ``seconds`` with nothing changing."""
    pids = {backend: bench.pids() for backend, bench in benches.items()}
    before = {b: {name: cpu_ticks(pid) for name, pid in p.items()} for b, p in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    result: dict[str, Any] = {}
    for backend, processes in pids.items():
        per: dict[str, float] = {}
        for name, pid in processes.items():
            try:
                ticks = cpu_ticks(pid) - before[backend][name]
            except OSError:
                ticks = 0
            per[name] = 100.0 * ticks / CLOCK_TICKS / elapsed
        result[backend] = {"seconds": elapsed, "percent": per, "total_percent": sum(per.values())}
    return result


def start_agent(backend: str, n: int, reconcile: str = "") -> tuple[AgentBench, float]:
    env = {"RECONCILIATION_INTERVAL": reconcile} if reconcile else {}
    bench = AgentBench(n, backend, **env)
    bench.__enter__()
    try:
        started = time.monotonic()
        bench.started_at = started  # type: ignore[attr-defined]
        bench.start()
        bench.wait_ready(timeout=900)
        ready = time.monotonic() - started
        time.sleep(5.0)
    except BaseException:
        bench.__exit__(None, None, None)
        raise
    print(f"{backend} N={n}: ready in {ready:.1f} s", file=sys.stderr, flush=True)
    return bench, ready


def churn(
    benches: dict[str, AgentBench], n: int, minutes: float, rate: float, ips: int = 10
) -> dict[str, Any]:
    """EndpointSlice updates to every agent for ``minutes``; memory samples every 30 s."""
    rng = random.Random(1)
    flipped: set[tuple[int, int]] = set()
    samples: dict[str, list[dict[str, Any]]] = {b: [] for b in benches}
    pids_before = {b: bench.pids() for b, bench in benches.items()}
    started = time.monotonic()
    end = started + minutes * 60.0
    next_sample = started
    updates = 0
    interval = 1.0 / rate
    while True:
        now = time.monotonic()
        if now >= next_sample:
            for backend, bench in benches.items():
                snap = snapshot(bench)
                samples[backend].append(
                    {
                        "t": now - started,
                        "agent_t": now - getattr(bench, "started_at", started),
                        "total_pss_kib": snap["total_pss_kib"],
                        "total_rss_kib": snap["total_rss_kib"],
                        "processes": {k: v["pss_kib"] for k, v in snap["processes"].items()},
                    }
                )
            next_sample += 30.0
        if now >= end:
            break
        index = rng.randrange(n)
        family = rng.choice((4, 6))
        key = (index, family)
        make = pod_ip4 if family == 4 else pod_ip6
        addresses = [make(index, j, ips) for j in range(ips)]
        if key not in flipped:
            extra = extra_ip4 if family == 4 else extra_ip6
            addresses[-1] = extra(index)
            flipped.add(key)
        else:
            flipped.discard(key)
        for bench in benches.values():
            bench.cluster.set_endpoints(index, family, addresses)
        updates += 1
        time.sleep(max(0.0, started + updates * interval - time.monotonic()))
    restarts = {
        backend: sorted(
            name
            for name, pid in pids_before[backend].items()
            if bench.pids().get(name) != pid and "/" not in name
        )
        for backend, bench in benches.items()
    }
    return {
        "updates": updates,
        "seconds": time.monotonic() - started,
        "samples": samples,
        "restarted": restarts,
    }


def group(snap: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per main process (helpers added to their parent), RSS and PSS in MiB."""
    out = {name: {"rss": 0.0, "pss": 0.0} for name in MAIN}
    for name, p in snap["processes"].items():
        main = name.split("/", 1)[0]
        out[main]["rss"] += p["rss_kib"] / MIB
        out[main]["pss"] += p["pss_kib"] / MIB
    return out


def render_report(results: dict[str, Any]) -> str:
    lines = ["Memory per process, MiB: PSS (RSS); firewall includes its helper processes"]
    rows = []
    for backend, sizes in results["sizes"].items():
        for n, entry in sizes.items():
            g = group(entry["memory"])
            rows.append(
                [f"{backend} N={n}"]
                + [f"{g[m]['pss']:.1f} ({g[m]['rss']:.1f})" for m in MAIN]
                + [
                    f"{entry['memory']['total_pss_kib'] / MIB:.1f}",
                    f"{entry['memory']['total_rss_kib'] / MIB:.1f}",
                ]
            )
    lines.append(table(["agent", *MAIN, "total PSS", "total RSS"], rows))
    helpers = [
        f"{backend} N={n}: {name} PSS {p['pss_kib'] / MIB:.1f} MiB"
        for backend, sizes in results["sizes"].items()
        for n, entry in sizes.items()
        for name, p in entry["memory"]["processes"].items()
        if "/" in name
    ]
    if helpers:
        lines.append("  helpers: " + "; ".join(helpers))
    if results.get("idle"):
        lines.append("")
        lines.append(f"Idle CPU at N={results['churn_n']}, % of one core")
        rows = []
        for backend, idle in results["idle"].items():
            per = idle["percent"]
            grouped = {m: sum(v for k, v in per.items() if k.split("/", 1)[0] == m) for m in MAIN}
            rows.append(
                [f"{backend} ({idle['seconds']:.0f} s)"]
                + [f"{grouped[m]:.2f}" for m in MAIN]
                + [f"{idle['total_percent']:.2f}"]
            )
        lines.append(table(["agent", *MAIN, "total"], rows))
    if results.get("churn"):
        c = results["churn"]
        lines.append("")
        lines.append(
            f"Churn at N={results['churn_n']}: {c['updates']} EndpointSlice updates in "
            f"{c['seconds'] / 60:.1f} min; total PSS, MiB"
        )
        rows = []
        for backend, growth in results["growth"].items():
            rows.append(
                [
                    backend,
                    f"{growth['before_mib']:.1f}",
                    f"{growth['after_mib']:.1f}",
                    f"{growth['percent']:+.1f}%",
                    f"{growth['after_warmup_percent']:+.1f}%",
                    f"{growth['second_half_percent']:+.1f}%",
                    (
                        f"{growth['after_resync_percent']:+.1f}% (from "
                        f"{growth['after_resync_mib']:.1f} at {growth['after_resync_t']:.0f} s)"
                        if growth.get("after_resync_percent") is not None
                        else "n/a"
                    ),
                    ", ".join(c["restarted"][backend]) or "none",
                ]
            )
        lines.append(
            table(
                [
                    "agent",
                    "before",
                    "after",
                    "growth",
                    "after 1st min",
                    "2nd half",
                    "after 1st re-sync",
                    "restarts",
                ],
                rows,
            )
        )
        per_process = []
        for backend, growth in results["growth"].items():
            parts = [f"{k} {v:+.1f}%" for k, v in growth["per_process_percent"].items()]
            per_process.append(f"  {backend}, before -> after: " + ", ".join(parts))
            parts = [
                f"{k} {v:+.1f}%" for k, v in growth["per_process_after_resync_percent"].items()
            ]
            if parts:
                per_process.append(f"  {backend}, after 1st re-sync -> after: " + ", ".join(parts))
        lines += per_process
    if results.get("goals"):
        lines.append("")
        lines.append("Goals")
        lines.append(
            table(
                ["goal", "value", "target", "met"],
                [
                    [g["goal"], f"{g['value']:.3g}", g["target"], "yes" if g["met"] else "NO"]
                    for g in results["goals"]
                ],
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.resources", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", default="0,1000,5000")
    parser.add_argument("--backends", default="iptables,nftables")
    parser.add_argument("--churn-n", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=10.0, help="churn duration")
    parser.add_argument("--rate", type=float, default=5.0, help="EndpointSlice updates per second")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    parser.add_argument("--quick", action="store_true", help="N=100; 30 s churn; 10 s idle")
    parser.add_argument(
        "--reconcile",
        default="",
        help="RECONCILIATION_INTERVAL of the agents (Go duration; default: the agent's, 5m)",
    )
    args = parser.parse_args(argv)
    require_root()
    exit_on_sigterm()
    info = machine()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    churn_n, minutes, idle = args.churn_n, args.minutes, args.idle
    if args.quick:
        sizes, churn_n, minutes, idle = [100], 100, 0.5, 10.0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    reconcile_seconds = (
        parse_go_duration(args.reconcile)
        if args.reconcile
        else Config(node_name=NODE).reconciliation_interval
    )
    results: dict[str, Any] = {
        "sizes": {b: {} for b in backends},
        "churn_n": churn_n,
        "minutes": minutes,
        "rate": args.rate,
        "reconcile_seconds": reconcile_seconds,
    }
    started = time.monotonic()
    for backend in backends:
        for n in sizes:
            if n == churn_n:
                continue
            bench, ready = start_agent(backend, n, args.reconcile)
            try:
                results["sizes"][backend][str(n)] = {
                    "ready_seconds": ready,
                    "memory": snapshot(bench),
                }
            finally:
                bench.__exit__(None, None, None)
    benches: dict[str, AgentBench] = {}
    try:
        for backend in backends:
            bench, ready = start_agent(backend, churn_n, args.reconcile)
            benches[backend] = bench
            results["sizes"][backend][str(churn_n)] = {
                "ready_seconds": ready,
                "memory": snapshot(bench),
            }
        print(f"idle CPU for {idle:.0f} s ...", file=sys.stderr, flush=True)
        results["idle"] = idle_cpu(benches, idle)
        print(f"churn for {minutes:.1f} min ...", file=sys.stderr, flush=True)
        before = {b: snapshot(bench) for b, bench in benches.items()}
        results["churn"] = churn(benches, churn_n, minutes, args.rate)
        time.sleep(10.0)
        after = {b: snapshot(bench) for b, bench in benches.items()}
    finally:
        for bench in benches.values():
            bench.__exit__(None, None, None)
    results["growth"] = {}
    for backend in backends:
        b, a = before[backend], after[backend]
        series = results["churn"]["samples"][backend]
        warm = next((s for s in series if s["t"] >= 60.0), series[-1])
        half = next((s for s in series if s["t"] >= minutes * 30.0), series[-1])
        # After a warm-up that includes the agent's first periodic full re-sync (the
        # high-water marks rise at re-syncs): the first sample 30 s after it.
        resynced = next(
            (s for s in series if s.get("agent_t", s["t"]) >= reconcile_seconds + 30.0), None
        )
        results["growth"][backend] = {
            "before_mib": b["total_pss_kib"] / MIB,
            "after_mib": a["total_pss_kib"] / MIB,
            "percent": 100.0 * (a["total_pss_kib"] / b["total_pss_kib"] - 1.0),
            "after_warmup_percent": 100.0 * (a["total_pss_kib"] / warm["total_pss_kib"] - 1.0),
            "second_half_percent": 100.0 * (a["total_pss_kib"] / half["total_pss_kib"] - 1.0),
            "after_resync_mib": resynced["total_pss_kib"] / MIB if resynced else None,
            "after_resync_t": resynced["t"] if resynced else None,
            "after_resync_percent": (
                100.0 * (a["total_pss_kib"] / resynced["total_pss_kib"] - 1.0) if resynced else None
            ),
            "per_process_after_resync_percent": {
                name: 100.0 * (a["processes"][name]["pss_kib"] / kib - 1.0)
                for name, kib in (resynced["processes"] if resynced else {}).items()
                if name in a["processes"] and kib
            },
            "per_process_percent": {
                name: 100.0 * (a["processes"][name]["pss_kib"] / p["pss_kib"] - 1.0)
                for name, p in b["processes"].items()
                if name in a["processes"] and p["pss_kib"]
            },
            "before": b,
            "after": a,
        }
    results["goals"] = goals(results, backends)
    results["wall_seconds"] = time.monotonic() - started
    path = write_results("resources" + ("-quick" if args.quick else ""), results, info)
    print(render_report(results))
    print(f"\n({results['wall_seconds']:.0f} s; results in {path})")
    return 0


def goals(results: dict[str, Any], backends: list[str]) -> list[dict[str, Any]]:
    out = []
    for backend in backends:
        at = results["sizes"][backend].get("1000")
        if at is not None:
            value = at["memory"]["total_pss_kib"] / MIB
            out.append(
                {
                    "goal": f"{backend}: total PSS at N=1000, MiB",
                    "value": value,
                    "target": "< 200",
                    "met": value < 200,
                }
            )
        growth = results["growth"][backend]["percent"]
        out.append(
            {
                "goal": f"{backend}: PSS growth over the churn, %",
                "value": growth,
                "target": "<= 5",
                "met": growth <= 5,
            }
        )
        cpu = results["idle"][backend]["total_percent"]
        out.append(
            {
                "goal": f"{backend}: idle CPU, % of one core",
                "value": cpu,
                "target": "< 1",
                "met": cpu < 1,
            }
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
