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
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import exit_on_sigterm, machine, require_root, table, write_results
from tests.lab.traffic import wait_until
from tests.test_audit_netns import POD4, audit_lines, audit_process, gateway_namespaces, metric

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


def counters(directory: Path) -> dict[str, float]:
    return {
        "written": metric(directory, "metaleg_audit_lines"),
        "dropped": metric(directory, "metaleg_audit_lines_dropped"),
        "lost": metric(directory, "metaleg_audit_events_lost"),
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
        metrics_dir = log_path.parent / "metrics"
        idle_from = cpu_seconds(process.pid)
        time.sleep(2.0)  # idle CPU, measured over a fixed window
        idle = (cpu_seconds(process.pid) - idle_from) / 2.0
        cpu_from = cpu_seconds(process.pid)
        started = time.monotonic()
        generator = subprocess.run(
            [
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
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        )
        sent = int(generator.stdout.strip())

        def settled() -> dict[str, float] | None:
            found = counters(metrics_dir)
            return found if found["written"] + found["dropped"] + found["lost"] >= sent else None

        try:
            found = wait_until(settled, timeout=30, interval=0.2, message="all events counted")
        except TimeoutError:
            found = counters(metrics_dir)  # events the kernel never sent: shown as missing
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="new connections per s")
    parser.add_argument("--seconds", type=float, default=20.0, help="per case")
    parser.add_argument("--rates", default="1000,100", help="AUDIT_LOG_RATE of each case")
    parser.add_argument("--quick", action="store_true", help="5 s per case")
    arguments = parser.parse_args()
    require_root()
    exit_on_sigterm()
    seconds = 5.0 if arguments.quick else arguments.seconds
    info = machine()
    results = []
    with gateway_namespaces() as (gw, peer):
        for rate in (int(r) for r in arguments.rates.split(",")):
            results.append(run_case(gw, peer, rate, arguments.connections, seconds))
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
    name = "audit-quick" if arguments.quick else "audit"
    path = write_results(name, {"goal": "CPU < 10 % of a core at 1000/s", "cases": results}, info)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
