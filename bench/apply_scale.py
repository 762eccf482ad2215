"""How long the backends take to write N Services into the kernel, against two baselines.

Run::

    .venv/bin/python -m bench.apply_scale            # N = 100, 1000, 5000 (a few minutes)
    .venv/bin/python -m bench.apply_scale --quick    # N = 100 only (CI-sized)
    .venv/bin/python -m bench.apply_scale --sizes 100,2000 --reps 50 --backends nftables

Per backend (``iptables``: legacy chains + ipsets; ``nftables``; and the
routing backend ``netlink``) and per N, each in a fresh network namespace
(``mlb-<pid>-<n>``, always deleted), with the generated desired state of
:mod:`bench.common` (N Services, 10 dual-stack pods each, 15 gateway nodes):

* **full**: a fresh backend's ``resync`` on an empty node (the agent's start);
* **incremental** changes with N present, each ``--reps`` times (or until
  ``--budget`` seconds are used up, at least 3), each on another Service and on
  top of the previous ones: one pod IP added (``add-ip``), a gateway moved
  between two other nodes (``move``: the Service's mark changes) and a gateway
  moved to this node (``move-here``: MARK becomes SNAT);
* **noop resync**: a full ``resync`` when nothing changed (the periodic
  reconciliation), median of 3.

The firewall backends run inside :class:`metaleg.firewall.selection.ManagedFirewall`
(as in the firewall worker: conntrack scoping and the saved applied state
included); the routing backend runs bare.

Baselines, same final state, each in a fresh namespace (see :mod:`bench.baselines`):
the original's method (one process per object, check then insert; measured for
N <= ``--original-max``, extrapolated above), and the kernel's limit (one
``ipset restore`` + ``iptables-restore`` + ``ip6tables-restore``; one ``nft
-f``). For the iptables layout the final state of every run is compared with
the backend's (rules in order, sets with members).

Results: a table on stdout and ``bench/results/apply_scale.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench import baselines
from bench.common import (
    GATEWAYS,
    NO_GATEWAY,
    exit_on_sigterm,
    extra_ip4,
    fmt_ratio,
    gateway_of,
    machine,
    ms,
    pod_ip4,
    pod_ip6,
    ratio,
    replace_service,
    require_root,
    scale_state,
    service_egress,
    summary,
    table,
    wire_next_hops,
    write_results,
)
from metaleg.firewall.iptables.render import render
from metaleg.model import NodeDesiredState
from tests.netns import namespace, run_in_netns

FIREWALLS = ("iptables", "nftables")
ROUTING = "netlink"
CHANGES = ("add-ip", "move", "move-here")
TIMEOUT = 3600.0


# --- changes ------------------------------------------------------------------------------------


def _sources(index: int, ips: int) -> tuple[list[str], list[str]]:
    return [pod_ip4(index, j, ips) for j in range(ips)], [
        pod_ip6(index, j, ips) for j in range(ips)
    ]


def _pick(n: int, rep: int, accept: Callable[[int], bool]) -> int:
    """A Service for repetition ``rep``: spread over all N, the first that ``accept``s."""
    start = (rep * 7919 + 13) % n
    for offset in range(n):
        index = (start + offset) % n
        if accept(index):
            return index
    raise ValueError("no Service fits the change")


def change_sequence(
    state: NodeDesiredState, n: int, ips: int, reps: int
) -> dict[str, list[NodeDesiredState]]:
    """Per change kind, ``reps`` states, each one change on top of the previous one.

    The changes accumulate (each on another Service, nothing is reverted), so N stays
    N and only one Service differs between two consecutive states.
    """
    sequences: dict[str, list[NodeDesiredState]] = {}
    current = state
    rep = 0
    used: set[int] = set()

    def fresh(accept: Callable[[int], bool]) -> int:
        index = _pick(n, rep, lambda i: i not in used and accept(i))
        used.add(index)
        return index

    for change in CHANGES:
        states = []
        for _ in range(reps):
            if change == "add-ip":
                index = fresh(lambda i: True)
                v4, v6 = _sources(index, ips)
                service = service_egress(index, [*v4, extra_ip4(rep)], v6)
            elif change == "move":
                index = fresh(lambda i: 0 < gateway_of(i) < NO_GATEWAY)
                target = gateway_of(index) % (GATEWAYS - 1) + 1  # another of the other nodes
                service = service_egress(index, *_sources(index, ips), gateway=target)
            else:  # move-here
                index = fresh(lambda i: 0 < gateway_of(i) < NO_GATEWAY)
                service = service_egress(index, *_sources(index, ips), gateway=0)
            current = replace_service(current, service)
            states.append(current)
            rep += 1
        sequences[change] = states
    return sequences


# --- one backend, one N, in a fresh namespace (runs in the child) -------------------------------


def _firewall(kind: str, run_dir: str) -> Any:
    from metaleg.firewall.selection import ManagedFirewall, new_backend

    return ManagedFirewall(new_backend(kind), None, run_dir)


def measure_firewall(
    kind: str, n: int, ips: int, reps: int, budget: float, fingerprint: bool
) -> dict[str, Any]:
    """Full apply, incremental changes and a no-op resync of one firewall backend.

    Each change kind stops after ``reps`` or once it has taken ``budget`` seconds
    (at least 3 repetitions). With ``reps == 0`` only the full apply is measured.
    """
    state = scale_state(n, ips)
    sequences = change_sequence(state, n, ips, reps)
    with tempfile.TemporaryDirectory(prefix="mlb-run-") as run_dir:
        firewall = _firewall(kind, run_dir)
        try:
            started = time.perf_counter()
            firewall.resync(state)
            full = time.perf_counter() - started
            result: dict[str, Any] = {"full": full}
            if fingerprint and kind == "iptables":
                result["fingerprint"] = baselines.iptables_fingerprint()
            if reps == 0:
                return result
            current = state
            for change, states in sequences.items():
                samples: list[float] = []
                began = time.perf_counter()
                for new in states:
                    if len(samples) >= 3 and time.perf_counter() - began > budget:
                        break
                    started = time.perf_counter()
                    firewall.apply(new)
                    samples.append(time.perf_counter() - started)
                    current = new
                result[change] = samples
            noop = []
            for _ in range(3 if n <= 1000 else 1):
                started = time.perf_counter()
                firewall.resync(current)
                noop.append(time.perf_counter() - started)
            result["noop_resync"] = statistics.median(noop)
        finally:
            firewall.close()
    return result


def measure_routing(reps: int) -> dict[str, Any]:
    """The routing backend: full apply of 14 gateway routes (both families), one route
    removed and added again (incremental), and a no-op resync. Independent of N."""
    from bench.common import FWMASK, TABLE_OFFSET
    from metaleg.routing.backend import NetlinkRoutingBackend

    state = scale_state(0)
    fewer = NodeDesiredState(
        node=state.node,
        fwmask=state.fwmask,
        exclude_dst_ipv4=state.exclude_dst_ipv4,
        exclude_dst_ipv6=state.exclude_dst_ipv6,
        routes=state.routes[:-1],
    )
    backend = NetlinkRoutingBackend(TABLE_OFFSET, FWMASK)
    try:
        started = time.perf_counter()
        backend.resync(state)
        result: dict[str, Any] = {"full": time.perf_counter() - started}
        samples = []
        for _ in range(reps):
            backend.apply(fewer)
            started = time.perf_counter()
            backend.apply(state)
            samples.append(time.perf_counter() - started)
        result["route-added"] = samples
        noop = []
        for _ in range(3):
            started = time.perf_counter()
            backend.resync(state)
            noop.append(time.perf_counter() - started)
        result["noop_resync"] = statistics.median(noop)
    finally:
        backend.close()
    return result


def _baseline(function: str, n: int, ips: int, fingerprint: bool) -> dict[str, Any]:
    result: dict[str, Any] = getattr(baselines, function)(scale_state(n, ips))
    if fingerprint:
        result["fingerprint"] = baselines.iptables_fingerprint()
    return result


def in_fresh_namespace(function: Callable[..., Any], *args: Any) -> Any:
    with namespace("mlb") as name:
        return run_in_netns(name, function, *args, timeout=TIMEOUT)


# --- extrapolation of the original's method -----------------------------------------------------


def extrapolate_original(measured: dict[int, dict[str, Any]], n: int, ips: int) -> float | None:
    """The original's time at ``n`` from the measured sizes.

    The ipset part is one process per set and member: linear in their number
    (the cost per process of the largest measured N). The iptables part is two
    processes per rule, each of which reads and writes the whole table: cost
    per process ``a + b * rules``, fitted through the two largest measured N
    (linear per process if only one was measured).
    """
    if not measured:
        return None
    sizes = sorted(measured)
    largest = measured[sizes[-1]]
    desired = render(scale_state(n, ips))
    processes_ipset = 2 * len(desired.sets) + sum(len(s.members) for s in desired.sets.values())
    rules = baselines.rule_count(desired)
    per_ipset = float(largest["ipset_seconds"]) / largest["processes"]["ipset"]
    ipset_part = processes_ipset * per_ipset

    def per_process(entry: dict[str, Any]) -> float:
        return float(entry["iptables_seconds"]) / int(entry["processes"]["iptables"])

    if len(sizes) >= 2:
        small = measured[sizes[-2]]
        x1, y1 = int(small["rules"]), per_process(small)
        x2, y2 = int(largest["rules"]), per_process(largest)
        slope = max(0.0, (y2 - y1) / (x2 - x1)) if x2 != x1 else 0.0
        per_rule_process = y2 + slope * (rules - x2)
    else:
        per_rule_process = per_process(largest)
    return float(ipset_part + 2 * rules * per_rule_process)


# --- the run ------------------------------------------------------------------------------------


def run(
    sizes: list[int],
    backends: list[str],
    reps: int,
    ips: int,
    original_max: int,
    full_reps: int,
    budget: float,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "sizes": sizes,
        "ips_per_service": ips,
        "reps": reps,
        "budget": budget,
        "runs": {},
    }
    runs: dict[str, Any] = results["runs"]
    original: dict[int, dict[str, Any]] = {}
    for n in sizes:
        entry: dict[str, Any] = {}
        runs[str(n)] = entry
        fingerprints: dict[str, Any] = {}
        for kind in (b for b in backends if b in FIREWALLS):
            print(f"N={n}: {kind} backend ...", file=sys.stderr, flush=True)
            repeat = full_reps if n <= 1000 else 1
            fulls = []
            data: dict[str, Any] = {}
            for attempt in range(repeat):
                measured = in_fresh_namespace(
                    measure_firewall,
                    kind,
                    n,
                    ips,
                    reps if attempt == 0 else 0,
                    budget,
                    attempt == 0,
                )
                fulls.append(measured.pop("full"))
                if attempt == 0:
                    data = measured
            if "fingerprint" in data:
                fingerprints["ours"] = data.pop("fingerprint")
            entry[kind] = {
                "full": statistics.median(fulls),
                "full_samples": fulls,
                "noop_resync": data["noop_resync"],
                **{change: summary(data[change]) for change in CHANGES},
                "samples": {change: data[change] for change in CHANGES},
            }
        if "iptables" in backends:
            print(f"N={n}: ipset/iptables-restore limit ...", file=sys.stderr, flush=True)
            limits = [
                in_fresh_namespace(_baseline, "restore_limit", n, ips, i == 0) for i in range(3)
            ]
            fingerprints["limit"] = limits[0].pop("fingerprint")
            entry["limit_iptables"] = {
                **limits[0],
                "seconds": statistics.median(x["seconds"] for x in limits),
            }
            if n <= original_max:
                print(
                    f"N={n}: the original's method (one process per object) ...",
                    file=sys.stderr,
                    flush=True,
                )
                measured = in_fresh_namespace(_baseline, "original_method", n, ips, True)
                fingerprints["original"] = measured.pop("fingerprint")
                original[n] = measured
                entry["original"] = {**measured, "extrapolated": False}
            if "ours" in fingerprints:
                entry["same_state"] = {
                    name: fingerprints[name] == fingerprints["ours"]
                    for name in ("limit", "original")
                    if name in fingerprints
                }
        if "nftables" in backends:
            print(f"N={n}: nft -f limit ...", file=sys.stderr, flush=True)
            limits = [in_fresh_namespace(_baseline, "nft_limit", n, ips, False) for _ in range(3)]
            entry["limit_nftables"] = {
                **limits[0],
                "seconds": statistics.median(x["seconds"] for x in limits),
            }
        if ROUTING in backends:
            print(f"N={n}: routing (netlink) ...", file=sys.stderr, flush=True)
            with namespace("mlb") as name:
                wire_next_hops(name)
                data = run_in_netns(name, measure_routing, reps, timeout=TIMEOUT)
            entry[ROUTING] = {
                "full": data["full"],
                "noop_resync": data["noop_resync"],
                "route-added": summary(data["route-added"]),
            }
    if original and "iptables" in backends:
        for n in sizes:
            entry = runs[str(n)]
            if "original" not in entry:
                entry["original"] = {
                    "seconds": extrapolate_original(original, n, ips),
                    "extrapolated": True,
                }
    results["goals"] = goals(results)
    return results


# --- goals and the table ------------------------------------------------------------------------


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    runs = results["runs"]
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: str, ok: bool | None) -> None:
        out.append({"goal": name, "value": value, "target": limit, "met": ok})

    for kind in FIREWALLS:
        at = {int(n): e[kind] for n, e in runs.items() if kind in e}
        if 1000 in at:
            e = runs["1000"]
            orig = e.get("original", {}).get("seconds")
            r = ratio(orig, at[1000]["full"])
            add(
                f"{kind}: full apply N=1000, original / ours",
                r,
                ">= 20",
                None if r is None else r >= 20,
            )
            limit = e.get(f"limit_{kind}", {}).get("seconds")
            r = ratio(at[1000]["full"], limit)
            add(
                f"{kind}: full apply N=1000, ours / limit", r, "<= 3", None if r is None else r <= 3
            )
            for change in CHANGES:
                r = ratio(at[1000][change]["p99"], at[1000]["full"])
                add(
                    f"{kind}: {change} p99 N=1000 / full N=1000",
                    r,
                    "<= 0.05",
                    None if r is None else r <= 0.05,
                )
                if 100 in at:
                    r = ratio(at[1000][change]["p99"], at[100][change]["p99"])
                    add(
                        f"{kind}: {change} p99 N=1000 / p99 N=100",
                        r,
                        "<= 2",
                        None if r is None else r <= 2,
                    )
        if 1000 in at and 5000 in at:
            r = ratio(at[5000]["full"], at[1000]["full"])
            add(
                f"{kind}: full apply time(5000) / time(1000)",
                r,
                "<= 6",
                None if r is None else r <= 6,
            )
    return out


def render_report(results: dict[str, Any]) -> str:
    runs = results["runs"]
    lines: list[str] = []
    rows = []
    for n, e in runs.items():
        for kind in FIREWALLS:
            if kind not in e:
                continue
            d = e[kind]
            limit = e.get(f"limit_{kind}", {}).get("seconds")
            orig = e.get("original", {})
            rows.append(
                [
                    f"{kind} N={n}",
                    ms(d["full"]),
                    ms(limit),
                    ms(orig.get("seconds")) + (" (extrap.)" if orig.get("extrapolated") else ""),
                    fmt_ratio(ratio(orig.get("seconds"), d["full"])),
                    fmt_ratio(ratio(d["full"], limit)),
                    ms(d["noop_resync"]),
                ]
            )
    lines.append("Full apply on an empty node (fresh backend's resync)")
    lines.append(
        table(
            ["backend", "ours", "limit", "original", "orig/ours", "ours/limit", "noop resync"], rows
        )
    )
    rows = []
    for n, e in runs.items():
        for kind in FIREWALLS:
            if kind not in e:
                continue
            for change in CHANGES:
                s = e[kind][change]
                rows.append(
                    [f"{kind} N={n} {change}", ms(s["p50"]), ms(s["p99"]), ms(s["max"]), s["n"]]
                )
        if ROUTING in e:
            r = e[ROUTING]
            s = r["route-added"]
            rows.append(
                [f"netlink N={n} route-added", ms(s["p50"]), ms(s["p99"]), ms(s["max"]), s["n"]]
            )
    lines.append("")
    lines.append("Incremental changes with N present")
    lines.append(table(["change", "p50", "p99", "max", "reps"], rows))
    rows = []
    for n, e in runs.items():
        if ROUTING in e:
            rows.append([f"netlink N={n}", ms(e[ROUTING]["full"]), ms(e[ROUTING]["noop_resync"])])
    if rows:
        lines.append("")
        lines.append("Routing (14 gateway routes, both families; independent of N)")
        lines.append(table(["backend", "full", "noop resync"], rows))
    scaling = []
    for kind in FIREWALLS:
        if "1000" in runs and "5000" in runs and kind in runs["1000"] and kind in runs["5000"]:
            scaling.append(
                f"{kind}: time(5000)/time(1000) = "
                f"{fmt_ratio(ratio(runs['5000'][kind]['full'], runs['1000'][kind]['full']))}"
            )
    if scaling:
        lines.append("")
        lines += scaling
    same = {n: e["same_state"] for n, e in runs.items() if "same_state" in e}
    if same:
        lines.append("")
        lines.append(
            "Same final state as the backend (iptables layout): "
            + ", ".join(
                f"N={n}: " + " ".join(f"{k}={'yes' if v else 'NO'}" for k, v in s.items())
                for n, s in same.items()
            )
        )
    if results.get("goals"):
        lines.append("")
        lines.append("Goals")
        lines.append(
            table(
                ["goal", "value", "target", "met"],
                [
                    [
                        g["goal"],
                        "-" if g["value"] is None else f"{g['value']:.3g}",
                        g["target"],
                        {True: "yes", False: "NO", None: "-"}[g["met"]],
                    ]
                    for g in results["goals"]
                ],
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.apply_scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", help="comma-separated N (default 100,1000,5000)")
    parser.add_argument("--quick", action="store_true", help="N=100 only, 10 repetitions")
    parser.add_argument(
        "--reps", type=int, default=30, help="repetitions of each incremental change"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=30.0,
        help="seconds per change kind and N (stops early, at least 3 reps)",
    )
    parser.add_argument("--ips", type=int, default=10, help="dual-stack pods per Service")
    parser.add_argument("--backends", default="iptables,nftables,netlink")
    parser.add_argument(
        "--original-max",
        type=int,
        default=1000,
        help="largest N for the original's method (extrapolated above)",
    )
    parser.add_argument(
        "--full-reps",
        type=int,
        default=3,
        help="fresh-namespace full applies per backend for N <= 1000 (median)",
    )
    args = parser.parse_args(argv)
    require_root()
    exit_on_sigterm()
    info = machine()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [100, 1000, 5000]
    reps = args.reps
    full_reps = args.full_reps
    budget = args.budget
    if args.quick:
        sizes, reps, full_reps, budget = [100], min(reps, 10), 1, min(budget, 5.0)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    started = time.monotonic()
    results = run(sizes, backends, reps, args.ips, args.original_max, full_reps, budget)
    results["wall_seconds"] = time.monotonic() - started
    results["pid"] = os.getpid()
    path = write_results("apply_scale" + ("-quick" if args.quick else ""), results, info)
    print(render_report(results))
    print(f"\n({results['wall_seconds']:.0f} s; results in {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
