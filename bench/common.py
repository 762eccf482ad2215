"""Shared pieces of the benchmarks: generated desired states, statistics, tables, JSON results.

Generated states (:func:`scale_state`) describe one node, ``node-00``, of a
cluster with 15 gateway nodes (``node-00`` ... ``node-14``, the whole capacity
of FIREWALL_MASK 0x00F00000) and ``n`` labelled Services of ``ips`` dual-stack
pods each. Service ``i`` is announced by node ``i % 16``: 0 is this node
(SNAT), 1-14 are the others (MARK towards them; one routing table each) and
15 means "no gateway" (REJECT). All pods are taken to be local sources of this
node, the worst case (a gateway node takes all endpoints too).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    GatewayRoute,
    NodeDesiredState,
    Role,
    ServiceEgress,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FWMASK = 0x00F00000
SHIFT = 20
TABLE_OFFSET = 100000
GATEWAYS = 15
"""Gateway nodes of the generated cluster (this node included): the mask's capacity."""
NO_GATEWAY = GATEWAYS
"""``i % 16 == 15``: the Service has no known gateway (REJECT)."""
EXCLUDE4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
EXCLUDE6 = ("fc00::/7", "fe80::/10")
NAMESPACE = "bench"
NODE = "node-00"
POD_BASE4 = int(ipaddress.IPv4Address("100.64.0.0"))
"""Pod IPs of the generated Services (outside the exclude CIDRs, so nothing is ambiguous)."""
POD_BASE6 = int(ipaddress.IPv6Address("fd01:64::"))
NEXT_HOP_NET4 = "192.0.2.0/24"
NEXT_HOP_NET6 = "2001:db8:ff::/64"


def wire_next_hops(netns: str) -> None:
    """A link (a veth pair inside ``netns``) that makes the generated next hops on-link."""
    from tests.netns import sh

    sh("ip", "link", "add", "nh0", "type", "veth", "peer", "name", "nh1", netns=netns)
    for link in ("nh0", "nh1"):
        sh("ip", "link", "set", link, "up", netns=netns)
    sh("ip", "addr", "add", NEXT_HOP_NET4.replace("0/24", "1/24"), "dev", "nh0", netns=netns)
    sh(
        *("ip", "addr", "add", NEXT_HOP_NET6.replace("::/64", "::1/64"), "dev", "nh0", "nodad"),
        netns=netns,
    )


def node_name(index: int) -> str:
    return f"node-{index:02d}"


def next_hop4(index: int) -> str:
    return f"192.0.2.{10 + index}"


def next_hop6(index: int) -> str:
    return f"2001:db8:ff::{10 + index:x}"


def service_name(index: int) -> str:
    return f"svc-{index:05d}"


def pod_ip4(service: int, pod: int, ips: int = 10) -> str:
    return str(ipaddress.IPv4Address(POD_BASE4 + service * ips + pod))


def pod_ip6(service: int, pod: int, ips: int = 10) -> str:
    return str(ipaddress.IPv6Address(POD_BASE6 + service * ips + pod))


def extra_ip4(k: int) -> str:
    """Pod IPs for incremental changes, in a range of their own."""
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.127.0.0")) + k))


def extra_ip6(k: int) -> str:
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd01:7f::")) + k))


def lb_ip4(index: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + index + 1))


def lb_ip6(index: int) -> str:
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8:18::")) + index + 1))


def gateway_of(index: int) -> int:
    """The gateway node index of Service ``index`` (0: this node, 15: none)."""
    return index % (GATEWAYS + 1)


def fwmark(gateway: int) -> int:
    return gateway << SHIFT


def routes() -> tuple[GatewayRoute, ...]:
    """One route per other gateway node (slot = node index)."""
    return tuple(
        GatewayRoute(
            node=node_name(g),
            slot=g,
            fwmark=fwmark(g),
            table=TABLE_OFFSET + g,
            next_hop_ipv4=next_hop4(g),
            next_hop_ipv6=next_hop6(g),
        )
        for g in range(1, GATEWAYS)
    )


def service_egress(
    index: int, sources4: Sequence[str], sources6: Sequence[str], gateway: int | None = None
) -> ServiceEgress:
    """Service ``index`` with these sources; ``gateway`` overrides :func:`gateway_of`."""
    g = gateway_of(index) if gateway is None else gateway
    families: list[FamilyEgress] = []
    for family, sources, lb in (
        (Family.IPV4, sources4, lb_ip4(index)),
        (Family.IPV6, sources6, lb_ip6(index)),
    ):
        ordered = tuple(sorted(sources, key=lambda a: int(ipaddress.ip_address(a))))
        if g == 0:
            entry = FamilyEgress(family, Action.SNAT, ordered, snat_ip=lb)
        elif g == NO_GATEWAY:
            entry = FamilyEgress(family, Action.REJECT, ordered, reason="no ServiceL2Status")
        else:
            entry = FamilyEgress(family, Action.MARK, ordered, fwmark=fwmark(g))
        families.append(entry)
    role = Role.GATEWAY if g == 0 else Role.REJECT if g == NO_GATEWAY else Role.FORWARDER
    return ServiceEgress(
        namespace=NAMESPACE,
        name=service_name(index),
        role=role,
        gateway_node=None if g == NO_GATEWAY else node_name(g),
        lb_ips=(lb_ip4(index), lb_ip6(index)),
        families=tuple(families),
    )


def default_service(index: int, ips: int = 10) -> ServiceEgress:
    return service_egress(
        index,
        [pod_ip4(index, j, ips) for j in range(ips)],
        [pod_ip6(index, j, ips) for j in range(ips)],
    )


def scale_state(n: int, ips: int = 10) -> NodeDesiredState:
    """The desired state of ``node-00`` with ``n`` Services of ``ips`` dual-stack pods."""
    return build_state([default_service(i, ips) for i in range(n)])


def build_state(services: Iterable[ServiceEgress]) -> NodeDesiredState:
    return NodeDesiredState(
        node=NODE,
        fwmask=FWMASK,
        exclude_dst_ipv4=EXCLUDE4,
        exclude_dst_ipv6=EXCLUDE6,
        services=tuple(sorted(services, key=lambda s: s.key)),
        routes=routes(),
        # The other gateway nodes' pod CIDRs (the transit guard).
        transit_guard_ipv4=tuple(sorted(f"10.244.{g}.0/24" for g in range(1, GATEWAYS))),
        transit_guard_ipv6=tuple(sorted(f"fd00:10:244:{g:x}::/64" for g in range(1, GATEWAYS))),
    )


def replace_service(state: NodeDesiredState, service: ServiceEgress) -> NodeDesiredState:
    services = [s for s in state.services if s.key != service.key] + [service]
    return build_state(services)


# --- statistics and output -------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, min, p50, p95, p99, max, mean of a sample (seconds in, seconds out)."""
    return {
        "n": len(values),
        "min": min(values) if values else float("nan"),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def ms(seconds: float | None) -> str:
    """Seconds as a short human string in ms (or s above 10 s)."""
    if seconds is None or seconds != seconds:
        return "-"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f} us"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table, first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for number, row in enumerate(cells):
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts))
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran."""
    model = ""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    root = str(Path(__file__).resolve().parents[1])
    dirty = version("git", "-C", root, "status", "--short", "--", "metaleg")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": version("git", "-C", root, "rev-parse", "--short", "HEAD"),
        "metaleg_modified": sorted(line.split()[-1] for line in dirty.splitlines()),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "iptables": version("iptables-legacy", "--version"),
        "nft": version("nft", "--version"),
        "ipset": version("ipset", "--version").splitlines()[0] if version("ipset", "-v") else "",
    }


def write_results(name: str, data: dict[str, Any], info: dict[str, Any] | None = None) -> Path:
    """Write ``bench/results/<name>.json`` with the machine description (``info``, taken when
    the run started; now if not given) and return the path. ``--quick`` runs use
    ``<name>-quick`` so that they do not replace the figures of a full run."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"benchmark": name, "machine": info or machine(), **data}
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the benchmarks need root (network namespaces)")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that a benchmark stopped with ``kill`` unwinds its
    context managers: agents stopped, namespaces deleted (by default the process just
    died and left them running)."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
