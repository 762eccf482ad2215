"""Issue "never leaks": zero packets with a node or pod IP across every disruptive event."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab import Lab
from tests.lab.agents import EgressLab
from tests.lab.leaks import LeakScenario

pytestmark = pytest.mark.lab


@pytest.fixture(
    params=[("nft", True), ("nft", False), ("legacy", True), ("legacy", False)],
    ids=["nft-podcidrs", "nft-no-podcidrs", "legacy-podcidrs", "legacy-no-podcidrs"],
)
def scenario(request: pytest.FixtureRequest) -> Iterator[LeakScenario]:
    """kube-router's masquerade in nft or legacy mode; Nodes with ``spec.podCIDRs`` or, as
    with Calico-style IPAM, without (the transit guard then cannot use them)."""
    masquerade, pod_cidrs = request.param
    with Lab(masquerade=masquerade) as lab, EgressLab(lab, pod_cidrs=pod_cidrs) as egress:
        for node in lab.nodes:
            egress.start_agent(node)
        for node in lab.nodes:
            egress.wait_ready(node)
        scenario = LeakScenario(egress)
        try:
            yield scenario
        finally:
            scenario.stop()


def test_no_packet_leaves_with_a_node_or_pod_ip(scenario: LeakScenario) -> None:
    report = scenario.run_all()
    print(f"\n{report.table()}")
    assert report.packets > 1000  # the streams really ran through every event
    assert report.leaks == [], scenario.describe_leaks(report.leaks)
    scenario.unlabel_and_expect_node_ips()
