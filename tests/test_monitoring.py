"""k8s/monitoring: the dashboard and the alerts parse and name only metrics that exist.

The metrics that exist are derived from the code: the metric objects of
:mod:`metaleg.metrics` and what :class:`SupervisorCollector` yields.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Histogram

from metaleg import metrics
from metaleg.model import (
    Action,
    Family,
    FamilyEgress,
    NodeDesiredState,
    Role,
    ServiceEgress,
)
from metaleg.supervisor.egress_counters import CounterKey
from metaleg.supervisor.metrics import SupervisorCollector

MONITORING = Path(__file__).resolve().parent.parent / "k8s" / "monitoring"
METRIC_NAME = re.compile(r"\bmetaleg_[a-z0-9_]+\b")


class FakeWorker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.restarts = 1

    @property
    def pid(self) -> int | None:
        return None

    @property
    def running(self) -> bool:
        return False


class FakeSupervisor:
    def process_views(self) -> list[FakeWorker]:
        return [FakeWorker("watcher"), FakeWorker("firewall"), FakeWorker("routing")]

    def current_state(self) -> tuple[int, NodeDesiredState | None]:
        entry = FamilyEgress(Family.IPV4, Action.REJECT, ("10.244.1.10",), reason="no gateway")
        service = ServiceEgress("mail", "relay", Role.REJECT, None, (), (entry,))
        return 3, NodeDesiredState("node-a", 0xF00000, (), (), (service,))

    def applied_generations(self) -> dict[str, int]:
        return {"firewall": 3, "routing": 3}

    def firewall_backend_name(self) -> str:
        return "nftables"

    def forkserver_pid(self) -> int | None:
        return os.getpid()  # any process: its resources are added to the supervisor's

    def egress_counter_totals(self) -> dict[CounterKey, tuple[int, int]]:
        return {("mail", "relay", Family.IPV4, Action.REJECT): (12, 720)}


def existing_metrics() -> set[str]:
    """Every sample name the agent's /metrics can expose."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names |= {f"{value._name}_total", f"{value._name}_created"}
        elif isinstance(value, Histogram):
            names |= {f"{value._name}_{s}" for s in ("bucket", "count", "sum", "created")}
    for family in SupervisorCollector(FakeSupervisor()).collect():  # type: ignore[arg-type]
        names |= {sample.name for sample in family.samples}
    return names


def test_the_code_exposes_what_the_collector_test_expects() -> None:
    names = existing_metrics()
    assert {
        "metaleg_process_up",
        "metaleg_process_restarts_total",
        "metaleg_egress_services",
        "metaleg_egress_packets_total",
        "metaleg_egress_bytes_total",
    } <= names
    assert "metaleg_apply_duration_seconds_bucket" in names


def test_alerts_parse_and_name_only_existing_metrics() -> None:
    document = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert document["kind"] == "PrometheusRule"
    rules = [rule for group in document["spec"]["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in rules} >= {
        "MetalegWorkerCrashLooping",
        "MetalegRejectingTraffic",
        "MetalegEgressRejected",
        "MetalegApplyErrors",
    }
    existing = existing_metrics()
    for rule in rules:
        used = set(METRIC_NAME.findall(rule["expr"]))
        assert used, rule["alert"]
        assert used <= existing, f"{rule['alert']} names unknown metrics {used - existing}"
        assert rule["annotations"]["summary"]


def test_dashboard_parses_and_names_only_existing_metrics() -> None:
    dashboard = json.loads((MONITORING / "metaleg-dashboard.json").read_text())
    existing = existing_metrics()
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        used = set(METRIC_NAME.findall(expr))
        assert used and used <= existing, f"{expr!r} names unknown metrics {used - existing}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_monitoring_kustomization_renders() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, check=True
    ).stdout
    kinds = [doc["kind"] for doc in yaml.safe_load_all(rendered) if doc]
    assert sorted(kinds) == ["ConfigMap", "PrometheusRule"]
    assert "metaleg-dashboard.json" in rendered
