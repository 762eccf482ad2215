"""A lab of network namespaces: three Kubernetes-like nodes on a LAN, a router, the internet.

See :mod:`tests.lab.topology` for the topology and :mod:`tests.lab.traffic` for the
recorder, probes and streams. Typical use::

    from tests.lab import LB_IP4, Lab

    with Lab(masquerade="nft") as lab:
        pod = lab.add_pod("node-b", "web-1")
        lab.announce(LB_IP4, "node-a")
        result = lab.probe(pod, family=4, proto="tcp")
        assert result.ok and result.source == lab.node("node-b").ipv4

A pytest fixture::

    @pytest.fixture(scope="module", params=["legacy", "nft"])
    def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
        with Lab(masquerade=request.param) as lab:
            yield lab
"""

from tests.lab.topology import (
    API4,
    API6,
    CLUSTER_CIDR4,
    CLUSTER_CIDR6,
    INTERNET4,
    INTERNET6,
    LAN4,
    LAN6,
    LB_IP4,
    LB_IP6,
    MIRROR4,
    MIRROR6,
    NODE_NAMES,
    ROUTER_LAN4,
    ROUTER_LAN6,
    ROUTER_WAN4,
    ROUTER_WAN6,
    TCP_PORT,
    UDP_PORT,
    WAN4,
    WAN6,
    Host,
    Lab,
    MasqueradeMode,
    Node,
    Pod,
    cleanup_stale_namespaces,
    kube_router_rules,
)
from tests.lab.traffic import (
    Family,
    Outcome,
    ProbeResult,
    Proto,
    Record,
    Recorder,
    Stream,
    StreamEvent,
    family_of,
    new_token,
    probe,
)
from tests.waiting import wait_until

__all__ = [
    "API4",
    "API6",
    "CLUSTER_CIDR4",
    "CLUSTER_CIDR6",
    "INTERNET4",
    "INTERNET6",
    "LAN4",
    "LAN6",
    "LB_IP4",
    "LB_IP6",
    "MIRROR4",
    "MIRROR6",
    "NODE_NAMES",
    "ROUTER_LAN4",
    "ROUTER_LAN6",
    "ROUTER_WAN4",
    "ROUTER_WAN6",
    "TCP_PORT",
    "UDP_PORT",
    "WAN4",
    "WAN6",
    "Family",
    "Host",
    "Lab",
    "MasqueradeMode",
    "Node",
    "Outcome",
    "Pod",
    "ProbeResult",
    "Proto",
    "Record",
    "Recorder",
    "Stream",
    "StreamEvent",
    "cleanup_stale_namespaces",
    "family_of",
    "kube_router_rules",
    "new_token",
    "probe",
    "wait_until",
]
