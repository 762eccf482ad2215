"""Prometheus metrics of every metaleg process.

All processes record into prometheus-client's multiprocess mode: the
supervisor points PROMETHEUS_MULTIPROC_DIR at ``<run dir>/metrics`` before
anything imports prometheus-client, its workers inherit it, and the
supervisor's one HTTP endpoint collects them all. Every metric carries a
``process`` label (``supervisor``, ``watcher``, ``firewall``, ``routing``).
Counters of a worker that died keep counting after its restart (the files of
dead processes are summed), as counters should.

Gauges that describe the supervisor's view (process up, restarts, CPU,
memory, generations, services by role) are not recorded here but computed at
scrape time by :mod:`metaleg.supervisor.metrics`.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

APPLY_DURATION = Histogram(
    "metaleg_apply_duration_seconds",
    "Time to bring kernel state to a snapshot (kind: apply = difference, resync = full).",
    ["process", "backend", "kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = Counter(
    "metaleg_errors_total",
    "Errors by kind (apply, resync, watch, kubeconfig, event, conntrack).",
    ["process", "kind"],
)
WATCH_EVENTS = Counter(
    "metaleg_watch_events_total",
    "Watch events received from the API server, by resource and type.",
    ["process", "resource", "type"],
)
RELISTS = Counter(
    "metaleg_watch_relists_total",
    "Complete lists of a resource (at start, after 410 Gone or an error).",
    ["process", "resource"],
)
IPC_DROPPED = Counter(
    "metaleg_ipc_messages_dropped_total",
    "IPC messages that were malformed or unexpected and were dropped.",
    ["process"],
)
PUBLISHED = Counter(
    "metaleg_snapshots_published_total",
    "Desired states the watcher published because they changed.",
    ["process"],
)
EVENTS_POSTED = Counter(
    "metaleg_kubernetes_events_total",
    "Kubernetes Events posted on Services (result: posted, failed, suppressed by the rate limit).",
    ["process", "result"],
)
CONNTRACK_FLUSHED = Counter(
    "metaleg_conntrack_entries_deleted_total",
    "Conntrack entries deleted because their source's egress treatment changed.",
    ["process"],
)
DRIFT_REPAIRS = Counter(
    "metaleg_drift_repairs_total",
    "Full re-syncs run at once because metaleg's kernel objects were changed by someone else "
    "(kind: nft_table, nft_chain, nft_set, nft_element, nft_rule, iptables_chain, "
    "iptables_jump, ipset, policy_rule, route).",
    ["process", "kind"],
)
AUDIT_LINES = Counter(
    "metaleg_audit_lines_total",
    "SNAT audit lines written: new connections SNATed to a LoadBalancer IP on this node.",
    ["process"],
)
AUDIT_LINES_DROPPED = Counter(
    "metaleg_audit_lines_dropped_total",
    "SNAT audit lines not written because AUDIT_LOG_RATE was reached.",
    ["process"],
)
AUDIT_EVENTS_LOST = Counter(
    "metaleg_audit_events_lost_total",
    "Conntrack events the kernel dropped because the audit socket's buffer was full (ENOBUFS).",
    ["process"],
)
