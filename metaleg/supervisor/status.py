"""The agent's status: what ``metaleg-supervisor status`` prints and the probes decide on.

The supervisor builds a :class:`StatusReport` from its own records (it is the
hub every worker reports to) and serves it over ``<run dir>/control.sock``.
The JSON form (``status --json``) is this struct encoded with msgspec; its
fields are a stable interface (documented in the README): new fields may be
added, none renamed or removed.
"""

from __future__ import annotations

import msgspec

from metaleg.model import NodeDesiredState, describe_egress

CRASH_LOOP_WINDOW = 300.0
"""Crashes within this many seconds count towards a crash loop..."""
CRASH_LOOP_CRASHES = 3
"""...and this many of them make one."""
LOOP_STUCK_AFTER = 10.0
"""The supervisor's loop ticks every second; this long without a tick means it is stuck."""
OPTIONAL_PROCESSES = frozenset({"audit"})
"""Processes shown like the others that gate neither health nor readiness: egress works
without them (the SNAT audit log), and restarting the pod would not help them."""


class ProcessStatus(msgspec.Struct, frozen=True):
    name: str
    pid: int | None
    state: str
    """``running``, ``restarting`` (dead, restart scheduled) or ``stopped``."""
    restarts: int
    uptime_seconds: float
    applied_generation: int | None
    """For data-plane workers: the last snapshot generation applied without error."""
    last_error: str
    crash_looping: bool = False
    drift_repairs: int = 0
    """Data-plane workers: repairs of kernel objects someone else changed (drift)."""
    last_drift: str = ""
    """What the last drift repair found (``kind: detail``)."""
    last_drift_seconds_ago: float | None = None
    unfinished: str = ""
    """Data-plane workers: what the last successful application left to retry (the
    firewall: a failed deletion of outdated conntrack entries), '' when nothing."""


class ServiceStatus(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    lb_ips: tuple[str, ...]
    gateway_node: str | None
    role: str
    """This node's role: ``gateway``, ``forwarder``, ``reject`` or ``none``."""
    source_ips: int
    """How many pod IPs this node handles for the Service (all families)."""
    detail: str
    """Per family, what this node does and with how many sources, in the words of
    :func:`metaleg.model.describe_egress`."""
    egress_packets: dict[str, int] = {}
    """Packets of the Service's traffic this node treated, by action (``snat``,
    ``forward``, ``reject``; both families), from the kernel's counters since the agent
    started (:mod:`metaleg.supervisor.egress_counters`)."""
    egress_bytes: dict[str, int] = {}


class StatusReport(msgspec.Struct, frozen=True):
    node: str
    generation: int
    """The newest desired-state generation the supervisor holds (0: none yet)."""
    firewall_backend: str
    route_backend: str
    watcher_synced: bool
    watcher_error: str
    processes: tuple[ProcessStatus, ...]
    services: tuple[ServiceStatus, ...]
    problems: tuple[str, ...]
    """Problems found in cluster objects (skipped fields, conflicts)."""
    healthy: bool
    ready: bool
    reasons: tuple[str, ...]
    """Why the agent is not healthy or not ready."""
    loop_age_seconds: float = 0.0


def evaluate(
    processes: tuple[ProcessStatus, ...],
    generation: int,
    watcher_synced: bool,
    loop_age_seconds: float,
) -> tuple[bool, bool, tuple[str, ...]]:
    """(healthy, ready, reasons) from the process records.

    Healthy unless a worker is crash-looping or the supervisor's loop is stuck
    (restarting the pod would help). Ready when every worker runs, the watcher
    has synced and both data-plane workers applied the newest generation.
    :data:`OPTIONAL_PROCESSES` count for neither.
    """
    reasons: list[str] = []
    healthy = True
    processes = tuple(p for p in processes if p.name not in OPTIONAL_PROCESSES)
    for process in processes:
        if process.crash_looping:
            healthy = False
            reasons.append(f"{process.name} is crash-looping ({process.last_error or 'see logs'})")
    if loop_age_seconds > LOOP_STUCK_AFTER:
        healthy = False
        reasons.append(f"the supervisor loop has not run for {loop_age_seconds:.0f}s")
    ready = healthy
    for process in processes:
        if process.name == "supervisor":
            continue
        if process.state != "running":
            ready = False
            reasons.append(f"{process.name} is {process.state}")
        elif process.applied_generation is not None and (
            generation == 0 or process.applied_generation != generation
        ):
            ready = False
            detail = f": {process.last_error}" if process.last_error else ""
            reasons.append(
                f"{process.name} applied generation {process.applied_generation} of {generation}{detail}"
            )
    if not watcher_synced:
        ready = False
        reasons.append("the watcher has not synced with the API server")
    return healthy, ready, tuple(dict.fromkeys(reasons))


def _age(seconds: float) -> str:
    """Like kubectl: 45s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _packets(by_action: dict[str, int]) -> str:
    """``snat 120, reject 3``: the nonzero packet counts of a Service, or ``-``."""
    shown = [f"{action} {count}" for action, count in sorted(by_action.items()) if count]
    return ", ".join(shown) or "-"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def render_table(report: StatusReport) -> str:
    """The human form: aligned columns, like ``kubectl get``."""
    state = "healthy" if report.healthy else "UNHEALTHY"
    state += ", ready" if report.ready else ", not ready"
    lines = [
        f"NODE {report.node}   GENERATION {report.generation}   FIREWALL {report.firewall_backend}   "
        f"ROUTES {report.route_backend}   {state}",
        "",
    ]
    lines += _table(
        ("PROCESS", "PID", "STATE", "RESTARTS", "UPTIME", "APPLIED", "LAST ERROR"),
        [
            (
                p.name,
                str(p.pid or "-"),
                p.state + (" (crash-looping)" if p.crash_looping else ""),
                str(p.restarts),
                _age(p.uptime_seconds) if p.state == "running" else "-",
                "-" if p.applied_generation is None else str(p.applied_generation),
                p.last_error[:80] or "-",
            )
            for p in report.processes
        ],
    )
    lines += [
        f"{p.name}: {p.drift_repairs} drift repair(s), the last {_age(p.last_drift_seconds_ago)} "
        f"ago: {p.last_drift[:160]}"
        for p in report.processes
        if p.drift_repairs and p.last_drift_seconds_ago is not None
    ]
    lines += [
        f"{p.name}: unfinished, retrying: {p.unfinished[:160]}"
        for p in report.processes
        if p.unfinished
    ]
    lines.append("")
    if report.services:
        lines += _table(
            ("SERVICE", "LB IPS", "GATEWAY", "ROLE", "SOURCES", "PACKETS", "DETAIL"),
            [
                (
                    f"{s.namespace}/{s.name}",
                    ",".join(s.lb_ips) or "<none>",
                    s.gateway_node or "<unknown>",
                    s.role,
                    str(s.source_ips),
                    _packets(s.egress_packets),
                    s.detail,
                )
                for s in report.services
            ],
        )
    else:
        lines.append("No labelled Services (metaleg.de/rewriteSrcIP=true).")
    if report.watcher_error:
        lines += ["", f"watcher: {report.watcher_error}"]
    if report.reasons:
        lines += ["", *(f"! {reason}" for reason in report.reasons)]
    if report.problems:
        lines += ["", f"{len(report.problems)} problem(s) in cluster objects:"]
        lines += [f"  - {problem}" for problem in report.problems[:20]]
    return "\n".join(lines)


def service_statuses(
    state: NodeDesiredState | None,
    counters: dict[tuple[str, str], dict[str, tuple[int, int]]] | None = None,
) -> list[ServiceStatus]:
    """Each labelled Service as status shows it: this node's role and what it does, in the
    words of :func:`metaleg.model.describe_egress`, with its egress counters (``counters``:
    (namespace, name) -> action -> (packets, bytes))."""
    if state is None:
        return []
    statuses = []
    for service in state.services:
        statuses.append(
            ServiceStatus(
                namespace=service.namespace,
                name=service.name,
                lb_ips=service.lb_ips,
                gateway_node=service.gateway_node,
                role=str(service.role),
                source_ips=sum(len(entry.source_ips) for entry in service.families),
                detail=describe_egress(service),
                **_counter_fields((counters or {}).get((service.namespace, service.name), {})),
            )
        )
    return statuses


def _counter_fields(actions: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """A Service's status fields for its egress counters (action label -> count)."""
    return {
        "egress_packets": {action: packets for action, (packets, _) in sorted(actions.items())},
        "egress_bytes": {action: size for action, (_, size) in sorted(actions.items())},
    }
