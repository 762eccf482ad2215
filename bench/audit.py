"""The SNAT audit process under a steady stream of new connections.

Run::

    .venv/bin/python -m bench.audit                   # 1000 connections/s, 20 s per case
    .venv/bin/python -m bench.audit --quick           # 5 s per case
    .venv/bin/python -m bench.audit --connections 3000 --seconds 30

In a "gateway" network namespace (``tests/test_audit_netns.py``: nft SNATs a pod
address to an LB IP, a veth to a peer namespace that drops everything), a
generator sends UDP datagrams from the pod address, each to a new destination
port: every datagram is a new connection, SNATed, with its conntrack NEW
event. The real ``python -m metaleg.audit`` process (fed its desired state by a
stand-in supervisor, its log written to a file) listens. Per case (an
``AUDIT_LOG_RATE``), over the run: connections made, the audit process's CPU
(utime + stime from ``/proc``, in % of one core), lines written, lines dropped
over the rate bound, events the kernel dropped (ENOBUFS), from the process's
own counters. Cases: the default bound (1000: every line written at
1000 connections/s) and a low one (100: most lines dropped and counted).

Goal (issue 15): < 10 % of a core at 1000 new connections per second. Results:
a table on stdout and ``bench/results/audit.json``.

Second part, the firewall's apply latency beside the audit process (goal: p99 within
10 %): in the same namespace, under the same stream of new connections, an nftables
backend holding N Services (``--n``, default 1000) applies one-Service changes
(``bench.apply_scale``'s sequence) — once without the audit process and once with
it, alternately (``--latency-rounds`` pairs, so drifting machine load falls on both
sides); the p99 of each side and their ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    exit_on_sigterm,
    fmt_ratio,
    machine,
    ms,
    require_root,
    summary,
    table,
    write_results,
)
from tests.lab.traffic import wait_until
from tests.test_audit_netns import (
    POD4,
    StandInSupervisor,
    audit_lines,
    audit_process,
    gateway_namespaces,
)

PEER = "198.51.100.2"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

GENERATOR = """
import socket, sys, time
source, target, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((source, 0))
start = time.monotonic()
sent = 0
port = 1
while True:
    elapsed = time.monotonic() - start
    if elapsed >= seconds:
        break
    due = int(elapsed * rate) + 1
    while sent < due:
        sock.sendto(b"x", (target, port))
        sent += 1
        port = port % 65535 + 1
    time.sleep(0.002)
print(sent)
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def counters(supervisor: StandInSupervisor) -> dict[str, float]:
    """The audit process's own counts, as it last reported them to its supervisor."""
    supervisor.pump()
    counts = supervisor.counts
    return {
        "written": counts.lines,
        "dropped": counts.lines_dropped,
        "lost": counts.events_lost,
    }


def run_case(gw: str, peer: str, rate: int, connections: int, seconds: float) -> dict[str, Any]:
    """One ``AUDIT_LOG_RATE``: ``connections`` per second for ``seconds``."""
    # The peer drops everything: no answers, no ICMP errors (the load is the NEW events).
    subprocess.run(
        ["ip", "netns", "exec", peer, "nft", "-f", "-"],
        input="table ip drop { chain input { type filter hook input priority 0; drop; }; }\n",
        text=True,
        check=False,
        capture_output=True,
    )
    subprocess.run(["ip", "netns", "exec", gw, "conntrack", "-F"], capture_output=True, check=False)
    with audit_process(gw, audit_log_rate=rate) as (supervisor, log_path, process):
        supervisor.wait_applied(1)
        idle_from = cpu_seconds(process.pid)
        time.sleep(2.0)  # idle CPU, measured over a fixed window
        idle = (cpu_seconds(process.pid) - idle_from) / 2.0
        cpu_from = cpu_seconds(process.pid)
        started = time.monotonic()
        generator = subprocess.run(
            _generator_command(gw, connections, seconds),
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        )
        sent = int(generator.stdout.strip())

        def settled() -> dict[str, float] | None:
            found = counters(supervisor)
            return found if found["written"] + found["dropped"] + found["lost"] >= sent else None

        try:
            found = wait_until(settled, timeout=30, interval=0.2, message="all events counted")
        except TimeoutError:
            found = counters(supervisor)  # events the kernel never sent: shown as missing
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(process.pid) - cpu_from
        lines = len(audit_lines(log_path))
    return {
        "audit_log_rate": rate,
        "connections_per_second": connections,
        "seconds": seconds,
        "sent": sent,
        "cpu_percent_of_a_core": 100 * cpu / seconds,
        "cpu_seconds": cpu,
        "wall_seconds_until_settled": elapsed,
        "idle_cpu_percent": 100 * idle,
        "lines_written": found["written"],
        "lines_in_log": lines,
        "lines_dropped": found["dropped"],
        "events_lost": found["lost"],
        "missing": sent - found["written"] - found["dropped"] - found["lost"],
    }


def _generator_command(gw: str, connections: int, seconds: float) -> list[str]:
    """The generator in ``gw``: ``connections`` new UDP connections per second for ``seconds``."""
    return [
        "ip",
        "netns",
        "exec",
        gw,
        sys.executable,
        "-c",
        GENERATOR,
        POD4,
        PEER,
        str(connections),
        str(seconds),
    ]


def _generator(gw: str, connections: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _generator_command(gw, connections, seconds),
        stdout=subprocess.PIPE,
        text=True,
    )


def _apply_samples(gw: str, n: int, reps: int, budget: float) -> list[float]:
    """One-Service apply durations of an nftables backend holding ``n`` Services in ``gw``."""
    from bench.apply_scale import measure_firewall
    from tests.netns import run_in_netns

    result = run_in_netns(
        gw, measure_firewall, "nftables", n, 10, reps, budget, False, timeout=budget * 4 + 300
    )
    return [sample for change in ("add-ip", "move", "move-here") for sample in result[change]]


def apply_latency(gw: str, n: int, connections: int, rounds: int, reps: int) -> dict[str, Any]:
    """p50/p99 of the firewall's one-Service applies under ``connections`` new connections
    per second, without and with the audit process listening (``rounds`` pairs)."""
    budget = 20.0
    samples: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):
        for side in ("without", "with"):
            generator = _generator(gw, connections, budget * 3 + 60)
            try:
                if side == "with":
                    with audit_process(gw) as (supervisor, _, _):
                        supervisor.wait_applied(1)
                        samples[side] += _apply_samples(gw, n, reps, budget)
                else:
                    samples[side] += _apply_samples(gw, n, reps, budget)
            finally:
                generator.terminate()
                generator.wait(10)
    without, with_audit = summary(samples["without"]), summary(samples["with"])
    return {
        "n": n,
        "connections_per_second": connections,
        "samples": {side: len(values) for side, values in samples.items()},
        "without_audit": without,
        "with_audit": with_audit,
        "p99_ratio": with_audit["p99"] / without["p99"] if without["p99"] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="new connections per s")
    parser.add_argument("--seconds", type=float, default=20.0, help="per case")
    parser.add_argument("--rates", default="1000,100", help="AUDIT_LOG_RATE of each case")
    parser.add_argument("--quick", action="store_true", help="5 s per case")
    parser.add_argument("--n", type=int, default=1000, help="Services of the apply-latency part")
    parser.add_argument("--latency-rounds", type=int, default=2, help="0: skip that part")
    parser.add_argument("--reps", type=int, default=60, help="changes of each kind per round")
    arguments = parser.parse_args()
    require_root()
    exit_on_sigterm()
    seconds = 5.0 if arguments.quick else arguments.seconds
    info = machine()
    results = []
    latency: dict[str, Any] | None = None
    with gateway_namespaces() as (gw, peer):
        for rate in (int(r) for r in arguments.rates.split(",")):
            results.append(run_case(gw, peer, rate, arguments.connections, seconds))
        if arguments.latency_rounds:
            n = 100 if arguments.quick else arguments.n
            latency = apply_latency(
                gw, n, arguments.connections, arguments.latency_rounds, arguments.reps
            )
    print(
        table(
            (
                "AUDIT_LOG_RATE",
                "conn/s",
                "sent",
                "CPU % core",
                "idle CPU %",
                "written",
                "dropped",
                "lost",
                "missing",
            ),
            [
                (
                    r["audit_log_rate"],
                    r["connections_per_second"],
                    r["sent"],
                    f"{r['cpu_percent_of_a_core']:.1f}",
                    f"{r['idle_cpu_percent']:.2f}",
                    int(r["lines_written"]),
                    int(r["lines_dropped"]),
                    int(r["events_lost"]),
                    int(r["missing"]),
                )
                for r in results
            ],
        )
    )
    if latency is not None:
        print(
            f"\nfirewall one-Service apply at N={latency['n']}, "
            f"{latency['connections_per_second']} new connections/s:"
        )
        print(
            table(
                ("audit process", "samples", "p50 ms", "p99 ms"),
                [
                    (
                        side,
                        latency["samples"][key],
                        ms(latency[f"{key}_audit"]["p50"]),
                        ms(latency[f"{key}_audit"]["p99"]),
                    )
                    for side, key in (("off", "without"), ("on", "with"))
                ],
            )
        )
        print(f"p99 with / without: {fmt_ratio(latency['p99_ratio'])} (goal: <= 1.10)")
    name = "audit-quick" if arguments.quick else "audit"
    path = write_results(
        name,
        {
            "goal": "CPU < 10 % of a core at 1000/s; apply p99 within 10 %",
            "cases": results,
            "apply_latency": latency,
        },
        info,
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
