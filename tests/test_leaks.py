"""Issue "never leaks": zero packets with a node or pod IP across every disruptive event."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab import Lab
from tests.lab.agents import EgressLab
from tests.lab.leaks import LeakScenario

pytestmark = pytest.mark.lab


@pytest.fixture(params=["nft", "legacy"])
def scenario(request: pytest.FixtureRequest) -> Iterator[LeakScenario]:
    with Lab(masquerade=request.param) as lab, EgressLab(lab) as egress:
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
    assert report.leaks == [], "\n".join(f"{r.proto} {r.src} {r.token}" for r in report.leaks[:20])
    scenario.unlabel_and_expect_node_ips()
