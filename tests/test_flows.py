"""Deleting outdated conntrack entries, one way for both firewall backends
(:mod:`metaleg.firewall.flows`): a failed deletion fails no apply, is counted, shown and
retried after the next call, with the same result whichever backend made the change."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from metaleg.firewall.conntrack import FlushPlan, delete_outdated_entries
from metaleg.firewall.flows import OutdatedFlowDeleter
from metaleg.firewall.selection import ManagedFirewall, new_backend
from metaleg.model import Action, Family, FamilyEgress, NodeDesiredState, Role, ServiceEgress
from tests.netns import namespace, run_in_netns
from tests.test_conntrack import flows_in, insert_flows

MASK = 0x00F00000
SNATED = "10.244.1.5"
MARKED = "10.244.1.6"
PEER = "203.0.113.10"


def egress_state(lb_ip: str) -> NodeDesiredState:
    """A gateway Service SNATing one pod to ``lb_ip``, a forwarder Service marking another."""
    mail = FamilyEgress(Family.IPV4, Action.SNAT, (SNATED,), snat_ip=lb_ip)
    web = FamilyEgress(Family.IPV4, Action.MARK, (MARKED,), fwmark=1 << 20)
    return NodeDesiredState(
        "node-a",
        MASK,
        ("10.96.0.0/12",),
        (),
        (
            ServiceEgress("mail", "relay", Role.GATEWAY, "node-a", (lb_ip,), (mail,)),
            ServiceEgress("shop", "web", Role.FORWARDER, "node-b", (), (web,)),
        ),
    )


class RefusedOnce:
    """The real deletion, with a failure in front of it when :attr:`refuse` is set (as
    the kernel's conntrack interface fails when its netlink socket runs out of buffer)."""

    def __init__(self) -> None:
        self.refuse = False

    def __call__(self, plan: FlushPlan) -> int:
        if self.refuse:
            self.refuse = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return delete_outdated_entries(plan)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _change_with_a_refused_deletion(ns: str, kind: str, run_dir: str) -> dict[str, Any]:
    """In the namespace: the first re-sync, two flows, then a change whose deletion is
    refused, applied twice (the worker's retry). What was seen after each step."""
    deletion = RefusedOnce()
    firewall = ManagedFirewall(new_backend(kind), None, run_dir, OutdatedFlowDeleter(deletion))
    seen: dict[str, Any] = {}

    def counters() -> tuple[float, float]:
        return (
            _metric("metaleg_errors_total", process="firewall", kind="conntrack"),
            _metric("metaleg_conntrack_entries_deleted_total", process="firewall"),
        )

    try:
        firewall.resync(egress_state("192.0.2.10"))
        insert_flows(ns, [(SNATED, PEER, "udp", 4000, 53), (MARKED, PEER, "udp", 4001, 53)])
        errors, deleted = counters()
        deletion.refuse = True
        firewall.apply(egress_state("192.0.2.11"))  # the LB IP changes: no exception
        seen["after the refusal"] = flows_in(ns)
        seen["failure"] = firewall.unfinished_work()  # what the status shows
        seen["errors counted"] = counters()[0] - errors
        firewall.apply(egress_state("192.0.2.11"))  # unchanged: only the retry
        seen["after the retry"] = flows_in(ns)
        seen["failure after the retry"] = firewall.unfinished_work()
        seen["entries counted"] = counters()[1] - deleted
    finally:
        firewall.close()
    return seen


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["iptables", "nftables"])
def test_both_backends_retry_a_refused_deletion_and_count_it(kind: str, tmp_path: Path) -> None:
    with namespace("mlflows") as ns:
        seen = run_in_netns(ns, _change_with_a_refused_deletion, ns, kind, str(tmp_path))
    both = {(SNATED, PEER, 4000), (MARKED, PEER, 4001)}
    assert seen["after the refusal"] == both
    assert "No buffer space available" in seen["failure"]
    assert seen["errors counted"] == 1
    # Retried with the next call: only the SNATed source's flow goes, and is counted.
    assert seen["after the retry"] == {(MARKED, PEER, 4001)}
    assert seen["failure after the retry"] == ""
    assert seen["entries counted"] == 1
