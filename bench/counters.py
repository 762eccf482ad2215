"""What reading the per-Service egress counters costs (issue 15: <= 50 ms at N = 1000).

Run::

    .venv/bin/python -m bench.counters                        # every backend, N = 100 and 1000
    .venv/bin/python -m bench.counters --backends iptables --n 1000 --reads 50

Per backend (a function ``measure_<backend>`` each, listed in :data:`BACKENDS`): in a
fresh network namespace the real backend applies :func:`bench.common.scale_state`
(``n`` Services of 10 dual-stack pods, SNAT, MARK and REJECT ones), every counted
object is given traffic's worth of counts, and ``read_counts()`` is timed ``--reads``
times in a row (what the firewall worker does every 10 s: the state unchanged) and
``--reads`` times right after a change of one Service (a pod added: whatever the
backend derives from the state is derived again). Results: a table on stdout and
``bench/results/counters.json``.

The scrape (``scrape`` rows): the supervisor's ``/metrics`` answer at N Services, with
every Service's packet and byte counters per family and action beside the state
gauges (``SupervisorCollector`` and the multiprocess files, rendered by
prometheus-client as the HTTP handler does), timed ``--reads`` times.

For nftables it also times what its design avoids: a one-element transaction in the
same table without, then with one named counter object per Service and family (the
objref-map design): libnftables fetches every object of every table for each
element command.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from bench.common import (
    default_service,
    exit_on_sigterm,
    machine,
    ms,
    replace_service,
    require_root,
    scale_state,
    summary,
    table,
    write_results,
)
from metaleg.backend import EgressCount
from metaleg.firewall.iptables.backend import IptablesBackend
from metaleg.firewall.iptables.counters import COUNTED_SETS
from metaleg.firewall.nftables.backend import NftablesBackend
from metaleg.firewall.nftables.layout import QUALIFIED_TABLE, SUFFIX
from metaleg.firewall.nftables.libnftables import Nft
from metaleg.model import Family, NodeDesiredState
from tests.netns import namespace, run_in_netns

IPS = 10
"""Pods per Service (dual-stack: 20 sources)."""
TIMEOUT = 900.0


def _timed_reads(
    read: Callable[[], list[Any]], change: Callable[[int], None], reads: int
) -> dict[str, Any]:
    """``reads`` readings of an unchanged state, then ``reads`` readings each right after
    ``change(i)``; the seconds of each, and the counts of the last reading."""
    steady: list[float] = []
    counts: list[Any] = []
    for _ in range(reads):
        started = time.perf_counter()
        counts = read()
        steady.append(time.perf_counter() - started)
    changed: list[float] = []
    for index in range(reads):
        change(index)
        started = time.perf_counter()
        read()
        changed.append(time.perf_counter() - started)
    return {"steady": steady, "after_change": changed, "counts": len(counts)}


def with_one_more_source(state: NodeDesiredState, n: int, index: int) -> NodeDesiredState:
    """``state`` with Service ``index % n`` back at its default sources plus one more IPv4
    source (a different one for each ``index``): a one-Service change."""
    service = default_service(index % n, IPS)
    grown = service.families[0]
    extra = (*grown.source_ips, f"100.127.{index // 250}.{index % 250}")
    families = (msgspec.structs.replace(grown, source_ips=extra), *service.families[1:])
    return replace_service(state, msgspec.structs.replace(service, families=families))


def measure_iptables(n: int, reads: int) -> dict[str, Any]:
    """The iptables backend: six set listings (SNATed, marked and rejected sources of both
    families, with member counters) summed per Service."""
    backend = IptablesBackend()
    state = scale_state(n, IPS)
    try:
        backend.apply(state)
        # Counts to add up: the members' counters as traffic would have left them.
        lines = []
        for name in COUNTED_SETS.values():
            listing = subprocess.run(["ipset", "save", name], capture_output=True, text=True)
            for line in listing.stdout.splitlines():
                words = line.split()
                if words[:1] == ["add"]:
                    mark = words[words.index("skbmark") :] if "skbmark" in words else []
                    counters = ["packets", "12345", "bytes", "1234567"]
                    lines.append(" ".join(["add", words[1], words[2], *counters, *mark]))
        restore = "\n".join(lines) + "\n"
        subprocess.run(["ipset", "-exist", "restore"], input=restore, text=True, check=True)

        def change(index: int) -> None:
            nonlocal state
            state = with_one_more_source(state, n, index)
            backend.apply(state)

        result = _timed_reads(backend.read_counts, change, reads)
        counted = backend.read_counts()
        result["treated"] = sorted({str(count.action) for count in counted if count.packets})
        result["actions"] = sorted({str(count.action) for count in counted})
        result["all_counted"] = all(count.packets >= 12345 for count in counted)
        return result
    finally:
        backend.close()


def measure_nftables(n: int, reads: int) -> dict[str, Any]:
    """The nftables backend: two set dumps over netlink (``count4``, ``count6``: a counter
    per treated source) summed per Service; and the named-object alternative's cost."""
    backend = NftablesBackend()
    state = scale_state(n, IPS)
    try:
        backend.apply(state)
        applied = backend._applied
        assert applied is not None
        # Counts to add up: every source's element re-added with traffic's worth of counts.
        for family in Family:
            name, sources = f"count{SUFFIX[family]}", sorted(applied.content.count[family])
            counted = ", ".join(f"{s} counter packets 12345 bytes 1234567" for s in sources)
            backend.nft.run(
                f"delete element {QUALIFIED_TABLE} {name} {{ {', '.join(sources)} }}\n"
                f"add element {QUALIFIED_TABLE} {name} {{ {counted} }}\n"
            )

        def change(index: int) -> None:
            nonlocal state
            state = with_one_more_source(state, n, index)
            backend.apply(state)

        result = _timed_reads(backend.read_counts, change, reads)
        counted_now = backend.read_counts()
        result["actions"] = sorted({str(count.action) for count in counted_now})
        result["all_counted"] = all(count.packets >= 12345 * IPS for count in counted_now)
        series = len(counted_now)
        result.update(_element_transactions(backend, series))
        return result
    finally:
        backend.close()


def _element_transactions(backend: NftablesBackend, objects: int) -> dict[str, Any]:
    """The best of 7 one-element transactions (a source added to and deleted from
    ``reject4``, a fresh libnftables context each, as the backend's), without and with
    ``objects`` named counter objects in the table (one per Service and family)."""
    script = (
        f"add element {QUALIFIED_TABLE} reject4 {{ 100.127.255.254 }}\n"
        f"delete element {QUALIFIED_TABLE} reject4 {{ 100.127.255.254 }}\n"
    )

    def best() -> float:
        seconds = float("inf")
        for _ in range(7):
            with Nft() as nft:
                started = time.perf_counter()
                nft.run(script)
                seconds = min(seconds, time.perf_counter() - started)
        return seconds

    without = best()
    backend.nft.run("".join(f"add counter {QUALIFIED_TABLE} c{i}\n" for i in range(objects)))
    with_objects = best()
    backend.nft.run("".join(f"delete counter {QUALIFIED_TABLE} c{i}\n" for i in range(objects)))
    return {
        "element_transaction": without,
        "element_transaction_with_objects": with_objects,
        "objects": objects,
    }


BACKENDS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "iptables": measure_iptables,
    "nftables": measure_nftables,
}
"""The backends measured, by name (each function runs inside a fresh namespace)."""


class _ScrapedSupervisor:
    """The supervisor's records as the metrics collector reads them, for N Services."""

    def __init__(self, n: int) -> None:
        from metaleg.supervisor.egress_counters import EgressCounterTotals

        self.state = scale_state(n, IPS)
        totals = EgressCounterTotals()
        totals.update(
            EgressCount(service.namespace, service.name, entry.family, entry.action, 1000, 90000)
            for service in self.state.services
            for entry in service.families
        )
        self.totals = totals.totals()

    def process_views(self) -> list[Any]:
        return []

    def current_state(self) -> tuple[int, Any]:
        return 7, self.state

    def applied_generations(self) -> dict[str, int]:
        return {"firewall": 7, "routing": 7}

    def forkserver_pid(self) -> int | None:
        return None  # no fork server: the scrape reads the supervisor's own /proc only

    def firewall_backend_name(self) -> str:
        return "nftables"

    def egress_counter_totals(self) -> dict[Any, tuple[int, int]]:
        return self.totals


def measure_scrape(n: int, scrapes: int) -> dict[str, Any]:
    """Time the supervisor's ``/metrics`` answer at ``n`` Services."""
    import tempfile

    from prometheus_client import generate_latest

    from metaleg.supervisor.metrics import build_registry

    view = _ScrapedSupervisor(n)
    with tempfile.TemporaryDirectory(prefix="mlbscrape") as directory:
        registry = build_registry(view, directory)
        samples = []
        size = 0
        for _ in range(scrapes):
            started = time.perf_counter()
            size = len(generate_latest(registry))
            samples.append(time.perf_counter() - started)
    return {"series": 2 * len(view.totals), "bytes": size, "scrape": summary(samples)}


def run(sizes: list[int], backends: list[str], reads: int) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes": sizes, "ips_per_service": IPS, "reads": reads, "runs": {}}
    results["scrape"] = {str(n): measure_scrape(n, reads) for n in sizes}
    for n in sizes:
        entry = results["runs"][str(n)] = {}
        for backend in backends:
            print(f"N={n}: {backend} ...", file=sys.stderr, flush=True)
            with namespace("mlbc") as name:
                measured = run_in_netns(name, BACKENDS[backend], n, reads, timeout=TIMEOUT)
            entry[backend] = {
                "steady": summary(measured.pop("steady")),
                "after_change": summary(measured.pop("after_change")),
                **measured,
            }
    return results


def report(results: dict[str, Any]) -> str:
    rows = []
    for n, entry in results["runs"].items():
        for backend, data in entry.items():
            rows.append(
                (
                    n,
                    backend,
                    data["counts"],
                    ms(data["steady"]["p50"]),
                    ms(data["steady"]["p99"]),
                    ms(data["after_change"]["p50"]),
                    ms(data["after_change"]["p99"]),
                )
            )
    for n, data in results.get("scrape", {}).items():
        rows.append(
            (
                n,
                "scrape",
                data["series"],
                ms(data["scrape"]["p50"]),
                ms(data["scrape"]["p99"]),
                "",
                "",
            )
        )
    headers = ("N", "backend", "counts", "read p50", "read p99", "changed p50", "changed p99")
    text = table(headers, rows)
    objects = [
        (n, data["objects"], ms(data["element_transaction"]),
         ms(data["element_transaction_with_objects"]))
        for n, entry in results["runs"].items()
        for backend, data in entry.items()
        if "objects" in data
    ]  # fmt: skip
    if objects:
        headers = ("N", "named objects", "1-element nft tx", "same, with the objects")
        text += "\n\nnftables, the named counter objects' design (not used):\n"
        text += table(headers, objects)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=sorted(BACKENDS), default=sorted(BACKENDS))
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--reads", type=int, default=30)
    args = parser.parse_args(argv)
    require_root()
    exit_on_sigterm()
    info = machine()
    results = run(args.n, args.backends, args.reads)
    print(report(results))
    path = write_results("counters", results, info)
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
