"""Drift repair time: metaleg's kernel objects tampered with, again and again.

Run::

    .venv/bin/python -m bench.drift                    # every case, 20 tamperings each
    .venv/bin/python -m bench.drift --quick            # 5 tamperings, idle CPU over 10 s
    .venv/bin/python -m bench.drift --backends nftables --n 1000 --repeat 50
    .venv/bin/python -m bench.drift --packets          # also the lab: wrong-source packets

Each backend gets a real data-plane worker (``DataplaneWorker`` around the real
backend, the harness of ``tests/test_drift.py``) in a network namespace of its
own, with the periodic re-sync an hour away. Per case (the tamperings of the
tests: ``nft``, ``iptables-legacy``, ``ipset``, ``ip rule``, ``ip route`` run in
the namespace) the tampering is repeated; the repair time is from just before
the tampering command starts (so it includes starting that command: an upper
bound) to the arrival of the worker's ``Applied`` report of the repair, which it
sends once its full re-sync has completed. Tamperings are spaced by more than
the worker's fight window, so that none is slowed down by the back-off meant for
a component that fights metaleg.

Idle CPU: the three workers, idle with detection running, are sampled over
``--idle`` seconds (utime + stime of ``/proc/<pid>/stat``).

With ``--packets``, the lab (tests/lab: three nodes, kube-router's masquerade in
nft or legacy mode, the real agents) streams UDP from the gateway's pod to the
internet host at ``--rate`` datagrams per second while the gateway's SNAT is
deleted (``nft delete table inet metaleg``, resp. the nat jump to METALEG-SNAT in
both families) ``--repeat`` times, and counts what arrives with another source
than the LB IP.

Goal (issue 14): p99 <= 1 s for every case. Results: a table on stdout and
``bench/results/drift.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from bench.common import (
    exit_on_sigterm,
    machine,
    ms,
    require_root,
    scale_state,
    summary,
    table,
    write_results,
)
from metaleg.ipc import Applied
from metaleg.model import NodeDesiredState
from metaleg.worker import FIGHT_WINDOW
from tests.test_drift import (
    IPTABLES_CASES,
    NFT_CASES,
    ROUTING_CASES,
    RunningWorker,
    _holds,
    _iptables_holds,
    firewall_state,
    routing_state,
    run,
    running_worker,
)

SPACING = FIGHT_WINDOW + 0.5
"""Seconds from one repair to the next tampering."""
NEW_FLOW_WINDOW = 1.0
"""Seconds after a tampering during which the lab measurement opens new flows."""


def firewall_state_with(n: int) -> NodeDesiredState:
    """The tests' firewall state plus the ``n`` generated Services of :func:`scale_state`."""
    base = firewall_state()
    if n == 0:
        return base
    services = sorted((*base.services, *scale_state(n).services), key=lambda s: s.key)
    return msgspec.structs.replace(base, services=tuple(services))


def cases(backend: str) -> dict[str, tuple[tuple[str, ...], Any]]:
    """case -> (tampering argv, check of the repaired state)."""
    if backend == "nftables":
        return {
            kind: (("nft", tampering), ("nft", check))
            for kind, (tampering, check) in NFT_CASES.items()
        }
    if backend == "iptables":
        return {
            f"{kind}/{case}": (tampering, ("iptables", check))
            for case, (tampering, check, kind) in IPTABLES_CASES.items()
        }
    return {case: (tampering, ("ip", check)) for case, (tampering, check) in ROUTING_CASES.items()}


def repaired(ns: str, check: Any) -> bool:
    tool, detail = check
    if tool == "nft":
        return _holds(ns, detail)
    if tool == "iptables":
        command, expected = detail
        return _iptables_holds(ns, command, expected)
    command, expected = detail
    return expected in run(ns, *command)


def wait_for_repair(worker: RunningWorker, timeout: float = 10.0) -> tuple[float, Applied]:
    """(monotonic arrival time, report) of the next Applied that reports a drift repair."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = worker.receive(max(0.01, deadline - time.monotonic()))
        arrived = time.monotonic()
        if isinstance(message, Applied) and message.drift:
            worker.reports.clear()
            return arrived, message
    raise TimeoutError(f"no repair reported within {timeout}s")


def measure_case(
    worker: RunningWorker, tampering: tuple[str, ...], check: Any, repeat: int
) -> dict[str, Any]:
    times: list[float] = []
    commands: list[float] = []
    kinds: set[str] = set()
    for _ in range(repeat):
        started = time.monotonic()
        subprocess.run(
            ["ip", "netns", "exec", worker.ns, *tampering],
            check=True,
            capture_output=True,
            timeout=30,
        )
        commands.append(time.monotonic() - started)
        arrived, report = wait_for_repair(worker)
        times.append(arrived - started)
        kinds.add(report.drift.split(":", 1)[0])
        if not repaired(worker.ns, check):
            raise AssertionError(f"{' '.join(tampering)}: reported repaired, but is not")
        # Not a wait for a condition: the spacing is the point. Random, so that tamperings
        # fall at every phase of the iptables backend's periodic check.
        time.sleep(SPACING + random.uniform(0, 1))
    return {"repair": summary(times), "command": summary(commands), "kinds": sorted(kinds)}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def workers(backends: list[str], n: int) -> Iterator[dict[str, RunningWorker]]:
    with contextlib.ExitStack() as stack:
        started: dict[str, RunningWorker] = {}
        for backend in backends:
            if backend == "netlink":
                started[backend] = stack.enter_context(
                    running_worker("routing", "netlink", routing_state(), links=True)
                )
            else:
                started[backend] = stack.enter_context(
                    running_worker("firewall", backend, firewall_state_with(n))
                )
        yield started


def add_foreign_rules(ns: str, count: int) -> None:
    """``count`` rules of another component in legacy nat and filter (iptables-restore)."""
    if count == 0:
        return
    lines = []
    for name in ("nat", "filter"):
        lines += [f"*{name}", ":KUBE-SERVICES - [0:0]"]
        lines += [
            f"-A KUBE-SERVICES -d 10.96.{i // 250}.{i % 250 + 1}/32 -p tcp --dport 80 -j RETURN"
            for i in range(count // 2)
        ]
        lines.append("COMMIT")
    subprocess.run(
        ["ip", "netns", "exec", ns, "iptables-legacy-restore", "--noflush"],
        input="\n".join(lines) + "\n",
        text=True,
        check=True,
        timeout=120,
    )


def idle_cpu(running: dict[str, RunningWorker], seconds: float) -> dict[str, float]:
    """Per backend, the worker's CPU share (percent of one core) while idle."""
    before = {backend: cpu_seconds(worker.child.pid) for backend, worker in running.items()}
    started = time.monotonic()
    time.sleep(seconds)  # a measurement window, not a wait for a condition
    elapsed = time.monotonic() - started
    return {
        backend: 100 * (cpu_seconds(worker.child.pid) - before[backend]) / elapsed
        for backend, worker in running.items()
    }


def wrong_sources(masquerade: str, repeat: int, rate: float) -> dict[str, Any]:
    """Traffic from the gateway's pod while its SNAT is deleted: what leaves with a wrong source.

    Two kinds of traffic: one long-lived UDP flow (``rate`` datagrams per second; its
    conntrack entry keeps the LB IP binding it got before the tampering) and new flows
    (one probe after another, each from a new socket, for :data:`NEW_FLOW_WINDOW` seconds
    after each tampering: a new flow gets its binding from the rules of the moment).
    """
    from tests.lab import LB_IP4, LB_IP6, Lab
    from tests.lab.agents import EgressLab

    with Lab(masquerade=masquerade) as lab, EgressLab(lab, RECONCILIATION_INTERVAL="1h") as egress:
        pods = {
            node: egress.add_pod(node, f"relay-{node[-1]}", {"app": "relay"})
            for node in ("node-a", "node-b")
        }
        for node in pods:
            egress.start_agent(node)
        for node in pods:
            egress.wait_ready(node)
        egress.cluster.service("mail", "relay", (LB_IP4, LB_IP6))
        egress.cluster.endpoints("mail", "relay", "IPv4", [(p.ipv4, p.node) for p in pods.values()])
        egress.cluster.endpoints("mail", "relay", "IPv6", [(p.ipv6, p.node) for p in pods.values()])
        egress.cluster.gateway("mail", "relay", "node-b")
        lab.announce(LB_IP4, "node-b")
        lab.announce(LB_IP6, "node-b")
        pod = pods["node-b"]
        egress.wait_for_probe(pod, 4, source=LB_IP4)
        new_flows: dict[str, int] = {}
        since = time.time()
        with lab.stream(pod, 4, rate=rate, tcp=False) as stream:
            for _ in range(repeat):
                if masquerade == "nft":
                    lab.exec("node-b", "nft", "delete", "table", "inet", "metaleg")
                else:
                    lab.exec(
                        "node-b",
                        "iptables-legacy",
                        *("-t", "nat", "-D", "POSTROUTING", "-j", "METALEG-SNAT"),
                    )
                window_end = time.monotonic() + NEW_FLOW_WINDOW
                while time.monotonic() < window_end:
                    result = lab.probe(pod, family=4, timeout=1.0)
                    key = result.source if result.outcome == "ok" else result.outcome
                    new_flows[str(key)] = new_flows.get(str(key), 0) + 1
                egress.wait_for_probe(pod, 4, source=LB_IP4, timeout=10)
                time.sleep(SPACING)  # spacing between tamperings
        time.sleep(1.0)  # the last datagrams on their way
        seen = lab.sources_seen(since=since, token_prefix=stream.prefix)
    wrong = {source: count for source, count in seen.items() if source != LB_IP4}
    return {
        "tamperings": repeat,
        "rate": rate,
        "flow_datagrams": sum(seen.values()),
        "flow_wrong_source": sum(wrong.values()),
        "new_flow_window_seconds": NEW_FLOW_WINDOW,
        "new_flows": new_flows,
        "new_flows_wrong_source": sum(
            count for key, count in new_flows.items() if key not in (LB_IP4, "rejected", "timeout")
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["nftables", "iptables", "netlink"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--n", type=int, default=0, help="generated Services added to the firewall state"
    )
    parser.add_argument(
        "--foreign-rules",
        type=int,
        default=0,
        help="rules of another component (kube-proxy-like) in the legacy nat and filter tables",
    )
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU sampling")
    parser.add_argument(
        "--packets", action="store_true", help="count wrong-source packets in the lab"
    )
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only-packets", action="store_true", help="skip the workers' cases")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.repeat, arguments.idle = 5, 10.0
    require_root()
    exit_on_sigterm()
    info = machine()
    results: dict[str, Any] = {
        "repeat": arguments.repeat,
        "n": arguments.n,
        "spacing_seconds": SPACING,
        "cases": {},
    }
    rows = []
    results["foreign_rules"] = arguments.foreign_rules
    backends = [] if arguments.only_packets else arguments.backends
    with workers(backends, arguments.n) as running:
        for worker in running.values():
            add_foreign_rules(worker.ns, arguments.foreign_rules)
        if running:
            time.sleep(2.0)  # let start-up work (helpers, first re-sync) settle before sampling
            results["idle_cpu_percent"] = idle_cpu(running, arguments.idle)
        for backend, worker in running.items():
            results["cases"][backend] = {}
            for case, (tampering, check) in cases(backend).items():
                measured = measure_case(worker, tampering, check, arguments.repeat)
                results["cases"][backend][case] = measured
                repair = measured["repair"]
                rows.append(
                    (
                        f"{backend} {case}",
                        ",".join(measured["kinds"]),
                        ms(repair["p50"]),
                        ms(repair["p99"]),
                        ms(repair["max"]),
                        ms(measured["command"]["p50"]),
                    )
                )
                print(rows[-1], flush=True)
    if arguments.packets or arguments.only_packets:
        results["packets"] = {
            masquerade: wrong_sources(masquerade, arguments.repeat, arguments.rate)
            for masquerade in ("nft", "legacy")
        }
    print(table(("case", "kind", "p50", "p99", "max", "command p50"), rows))
    print(
        "idle CPU (% of one core): "
        + ", ".join(f"{b} {v:.2f}" for b, v in results.get("idle_cpu_percent", {}).items())
    )
    for masquerade, packets in results.get("packets", {}).items():
        print(
            f"{masquerade}: established flow: {packets['flow_wrong_source']} of "
            f"{packets['flow_datagrams']} datagrams with a wrong source; new flows in the "
            f"{NEW_FLOW_WINDOW:.0f} s after each of {packets['tamperings']} tamperings: "
            f"{packets['new_flows']}"
        )
    name = "drift-quick" if arguments.quick else "drift"
    if arguments.only_packets:
        name += "-packets"
    elif arguments.n or arguments.foreign_rules:
        name += f"-n{arguments.n}-foreign{arguments.foreign_rules}"
    print(write_results(name, results, info))


if __name__ == "__main__":
    main()
