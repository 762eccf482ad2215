"""What a destination port policy costs the iptables backend (issue 16).

Run::

    .venv/bin/python -m bench.policy_ports                    # N = 100, 1000; tcp/25, tcp/8000-8100
    .venv/bin/python -m bench.policy_ports --n 1000 --ports tcp/8000-8100

Every one of ``n`` Services of 10 dual-stack pods (:func:`bench.common.scale_state`)
gets ``metaleg.de/destinationPorts: <ports>``. The kernel holds one ``hash:ip,port``
element per port and policed source (a range is expanded when it is added), so a wide
range multiplies the elements. Measured in a fresh namespace with the real backend:
the first apply, an incremental apply (one pod added to a Service: its ports added
as one run each), a full re-sync (which lists every element and turns them back into
runs), the elements and the kernel's memory of the ports sets. Results: a table on
stdout and ``bench/results/policy_ports.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

import msgspec

from bench.common import (
    exit_on_sigterm,
    machine,
    ms,
    replace_service,
    require_root,
    scale_state,
    table,
    write_results,
)
from metaleg.firewall.iptables.backend import IptablesBackend
from metaleg.firewall.iptables.rules import port_set_name
from metaleg.model import Family
from metaleg.watcher.destinations import parse_ports
from tests.netns import namespace, run_in_netns

IPS = 10
TIMEOUT = 1800.0


def _header(name: str) -> dict[str, int]:
    """Elements and bytes of memory of a set (``ipset list -t``)."""
    text = subprocess.run(["ipset", "list", "-t", name], capture_output=True, text=True).stdout
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {
        "elements": int(fields.get("Number of entries", 0)),
        "memory": int(fields.get("Size in memory", 0)),
    }


def measure(n: int, ports: str) -> dict[str, Any]:
    """In the current namespace: the costs of ``n`` Services with the port policy ``ports``."""
    policy = parse_ports(ports)
    state = scale_state(n, IPS)
    state = msgspec.structs.replace(
        state,
        services=tuple(
            msgspec.structs.replace(svc, destination_ports=policy) for svc in state.services
        ),
    )
    backend = IptablesBackend()
    try:
        started = time.perf_counter()
        backend.apply(state)
        first = time.perf_counter() - started
        sets = {str(int(f)): _header(port_set_name(f)) for f in Family}
        service = state.services[n // 2]
        entry = service.families[0]
        grown = msgspec.structs.replace(entry, source_ips=(*entry.source_ips, "100.127.0.1"))
        changed = replace_service(
            state, msgspec.structs.replace(service, families=(grown, *service.families[1:]))
        )
        started = time.perf_counter()
        backend.apply(changed)
        incremental = time.perf_counter() - started
        started = time.perf_counter()
        backend.resync(changed)
        resync = time.perf_counter() - started
        return {"first": first, "incremental": incremental, "resync": resync, "sets": sets}
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--ports", nargs="+", default=["tcp/25", "tcp/8000-8100"])
    args = parser.parse_args(argv)
    require_root()
    exit_on_sigterm()
    info = machine()
    results: dict[str, Any] = {"ips_per_service": IPS, "runs": {}}
    rows = []
    for n in args.n:
        for ports in args.ports:
            print(f"N={n} {ports} ...", file=sys.stderr, flush=True)
            with namespace("mlbp") as name:
                data = run_in_netns(name, measure, n, ports, timeout=TIMEOUT)
            results["runs"][f"{n} {ports}"] = data
            elements = sum(s["elements"] for s in data["sets"].values())
            memory = sum(s["memory"] for s in data["sets"].values())
            rows.append(
                (
                    n,
                    ports,
                    elements,
                    f"{memory / 2**20:.1f} MiB",
                    ms(data["first"]),
                    ms(data["incremental"]),
                    ms(data["resync"]),
                )
            )
    headers = ("N", "ports", "elements", "kernel memory", "first apply", "+1 pod", "re-sync")
    print(table(headers, rows))
    print(f"results: {write_results('policy_ports', results, info)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
