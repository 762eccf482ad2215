"""The SNAT audit log (metaleg.audit), pure parts: decoding, matching, lines, bounds.

Conntrack events encoded as the kernel does and decoded back, an event matched
to its Service (hypothesis over generated states), the line's fields, the rate
bound and the burst reports, the status rules. The kernel and the real process:
``tests/test_audit_netns.py``; through the real agent: ``tests/test_audit_lab.py``.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from metaleg.audit.ratelimit import Bursts, TokenBucket
from metaleg.audit.records import FIELDS, AuditRecord, SnatIndex, match
from metaleg.config import Config
from metaleg.firewall.wire import conntrack as wire
from metaleg.firewall.wire.conntrack import ConntrackEvent, Entry
from metaleg.firewall.wire.nfnetlink import parse_messages
from metaleg.logs import JsonFormatter, TextFormatter
from metaleg.model import Action, Family, FamilyEgress, NodeDesiredState, Role, ServiceEgress
from metaleg.supervisor.status import ProcessStatus, evaluate

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58

# --- decoding ------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def snat_events(draw: st.DrawFn) -> tuple[Entry, Entry]:
    """An ORIGINAL and a REPLY tuple of a SNATed connection, as the kernel would send them."""
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    addresses = ipv4 if family == socket.AF_INET else ipv6
    pod, destination, snat = draw(addresses), draw(addresses), draw(addresses)
    protocol = draw(st.sampled_from([TCP, UDP, 132, ICMP if family == socket.AF_INET else ICMPV6]))
    if protocol in (ICMP, ICMPV6):
        echo, answer = (8, 0) if protocol == ICMP else (128, 129)
        identifier, translated = draw(ports), draw(ports)
        return (
            Entry(family, pod, destination, protocol, None, None, identifier, echo, 0),
            Entry(family, destination, snat, protocol, None, None, translated, answer, 0),
        )
    pod_port, destination_port, snat_port = draw(ports), draw(ports), draw(ports)
    return (
        Entry(family, pod, destination, protocol, pod_port, destination_port),
        Entry(family, destination, snat, protocol, destination_port, snat_port),
    )


def canonical_entry(entry: Entry) -> Entry:
    return entry._replace(
        source=socket.inet_ntop(entry.family, socket.inet_pton(entry.family, entry.source)),
        destination=socket.inet_ntop(
            entry.family, socket.inet_pton(entry.family, entry.destination)
        ),
    )


@given(snat_events(), st.integers(0, 2**32 - 1))
def test_an_event_decodes_to_the_tuples_the_kernel_encoded(
    tuples: tuple[Entry, Entry], status: int
) -> None:
    original, reply = tuples
    message = wire.event_message(original, reply, status=status)
    ((kind, _, _, payload),) = list(parse_messages(message))
    assert kind == wire.CT_NEW
    event = wire.parse_event(payload)
    assert event == ConntrackEvent(canonical_entry(original), canonical_entry(reply), status, False)
    # A dump's decoder reads the same message as far as a deletion needs.
    assert wire.parse_entry(payload) == (canonical_entry(original), False)


@given(snat_events())
def test_a_tuple_in_another_layout_decodes_the_same(tuples: tuple[Entry, Entry]) -> None:
    """The fast path reads the kernel's layout of a tuple with ports; any other order (the
    protocol first) or an extra attribute takes the general decoder, with the same result."""
    original, _ = tuples
    encoded = wire.tuple_attribute(original)[4:]  # the tuple's nested attributes
    ip_length = struct.unpack_from("=H", encoded)[0]
    swapped = encoded[ip_length:] + encoded[:ip_length]
    extra = encoded + wire.attr(99, b"\0\0\0\0")
    for body in (swapped, extra):
        assert wire.parse_tuple(original.family, body) == canonical_entry(original)


def test_events_without_an_original_tuple_or_of_another_family_are_skipped() -> None:
    udp = Entry(socket.AF_INET, "192.0.2.1", "192.0.2.2", UDP, 1, 2)
    assert wire.parse_event(b"") is None
    assert wire.parse_event(wire.NFGEN.pack(socket.AF_INET, 0, 0)) is None
    bridge = wire.NFGEN.pack(7, 0, 0) + wire.tuple_attribute(udp)
    assert wire.parse_event(bridge) is None
    # Only a reply tuple: nothing to say who sent it.
    only_reply = wire.NFGEN.pack(socket.AF_INET, 0, 0) + wire.tuple_attribute(
        udp, wire.CTA_TUPLE_REPLY
    )
    assert wire.parse_event(only_reply) is None
    # An original tuple without a reply decodes, with reply None (it matches nothing).
    only_original = wire.NFGEN.pack(socket.AF_INET, 0, 0) + wire.tuple_attribute(udp)
    assert wire.parse_event(only_original) == ConntrackEvent(udp, None, 0, False)


# --- matching ------------------------------------------------------------------------------

PODS4 = [f"10.244.{i}.{j}" for i in range(2) for j in (10, 11)]
PODS6 = [f"FD00:10:244:{i}::{j:X}" for i in range(2) for j in (10, 11)]  # not canonical
LBS4 = ["198.51.100.200", "198.51.100.201"]
LBS6 = ["2001:DB8:1::200", "2001:db8:1::201"]


@st.composite
def families(draw: st.DrawFn, family: Family) -> FamilyEgress:
    pods, lbs = (PODS4, LBS4) if family == Family.IPV4 else (PODS6, LBS6)
    sources = tuple(sorted(draw(st.sets(st.sampled_from(pods), min_size=1, max_size=3))))
    action = draw(st.sampled_from(list(Action)))
    if action == Action.SNAT:
        return FamilyEgress(family, action, sources, snat_ip=draw(st.sampled_from(lbs)))
    if action == Action.MARK:
        return FamilyEgress(family, action, sources, fwmark=0x100000)
    return FamilyEgress(family, action, sources, reason="no gateway")


@st.composite
def states(draw: st.DrawFn) -> NodeDesiredState:
    services = []
    for index in range(draw(st.integers(0, 4))):
        entries = tuple(
            draw(families(family)) for family in (Family.IPV4, Family.IPV6) if draw(st.booleans())
        )
        role = Role.GATEWAY if any(e.action == Action.SNAT for e in entries) else Role.FORWARDER
        services.append(ServiceEgress("mail", f"s{index}", role, "node-a", (), entries))
    return NodeDesiredState("node-a", 0xF00000, (), (), tuple(services))


def canonical(address: str) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.inet_ntop(family, socket.inet_pton(family, address))


def expected_service(state: NodeDesiredState, pod: str, snat: str) -> str | None:
    """The first Service (by namespace/name) that SNATs ``pod`` to ``snat``: by definition."""
    for service in state.services:
        for entry in service.families:
            if (
                entry.action == Action.SNAT
                and entry.snat_ip is not None
                and canonical(entry.snat_ip) == snat
                and pod in {canonical(s) for s in entry.source_ips}
            ):
                return service.key
    return None


addresses = st.sampled_from(PODS4 + LBS4 + PODS6 + LBS6 + ["203.0.113.1", "2001:db8:9::1"])


@given(states(), states(), addresses, addresses, ports, ports, ports)
def test_an_event_matches_the_service_that_snats_its_source_to_its_reply_destination(
    before: NodeDesiredState,
    state: NodeDesiredState,
    pod: str,
    snat: str,
    pod_port: int,
    snat_port: int,
    dst_port: int,
) -> None:
    family = socket.AF_INET6 if ":" in pod else socket.AF_INET
    if (":" in snat) != (family == socket.AF_INET6):
        return
    pod, snat = canonical(pod), canonical(snat)
    destination = "203.0.113.1" if family == socket.AF_INET else "2001:db8:9::1"
    original = Entry(family, pod, destination, TCP, pod_port, dst_port)
    reply = Entry(family, destination, snat, TCP, dst_port, snat_port)
    index = SnatIndex()
    index.update(before)  # an update from another state gives what a fresh index gives
    index.update(state)
    record = match(index, ConntrackEvent(original, reply, wire.IPS_SRC_NAT, False))
    wanted = expected_service(state, pod, snat)
    assert (record.service if record else None) == wanted
    if record is not None:
        fields = record.fields()
        assert fields["pod_ip"] == pod and fields["pod_port"] == pod_port
        assert fields["snat_ip"] == snat and fields["snat_port"] == snat_port
        assert fields["dst_ip"] == destination and fields["dst_port"] == dst_port


def test_unchanged_services_are_not_recomputed() -> None:
    relay = ServiceEgress(
        "mail",
        "relay",
        Role.GATEWAY,
        "node-a",
        ("198.51.100.200",),
        (FamilyEgress(Family.IPV4, Action.SNAT, ("10.244.1.10",), snat_ip="198.51.100.200"),),
    )
    other = msgspec.structs.replace(relay, name="other")
    state = NodeDesiredState("node-a", 0xF00000, (), (), (other, relay))
    index = SnatIndex()
    index.update(state)
    memo = dict(index._memo)
    changed = msgspec.structs.replace(
        relay,
        families=(
            FamilyEgress(Family.IPV4, Action.SNAT, ("10.244.1.11",), snat_ip="198.51.100.200"),
        ),
    )
    index.update(msgspec.structs.replace(state, services=(other, changed)))
    assert index._memo[id(other)][1] is memo[id(other)][1]
    assert index.service("10.244.1.10", "198.51.100.200") == "mail/other"
    assert index.service("10.244.1.11", "198.51.100.200") == "mail/relay"
    index.update(None)
    assert len(index) == 0


# --- lines ---------------------------------------------------------------------------------


def record_of(original: Entry, reply: Entry) -> AuditRecord:
    return AuditRecord("mail/relay", original, reply)


def formatted(record: AuditRecord, formatter: logging.Formatter) -> str:
    entry = logging.LogRecord(
        "metaleg.audit.lines", logging.INFO, "", 0, record.message(), (), None
    )
    entry.__dict__.update(record.fields())
    return formatter.format(entry)


def test_a_tcp_line_carries_every_documented_field() -> None:
    record = record_of(
        Entry(socket.AF_INET6, "fd00::10", "2001:db8:9::1", TCP, 40000, 25),
        Entry(socket.AF_INET6, "2001:db8:9::1", "2001:db8:1::200", TCP, 25, 40001),
    )
    line = json.loads(formatted(record, JsonFormatter("audit")))
    assert {k: line[k] for k in FIELDS if k in line} == {
        "audit": "snat",
        "service": "mail/relay",
        "proto": "tcp",
        "pod_ip": "fd00::10",
        "pod_port": 40000,
        "snat_ip": "2001:db8:1::200",
        "snat_port": 40001,
        "dst_ip": "2001:db8:9::1",
        "dst_port": 25,
    }
    assert (
        line["msg"] == "snat tcp [fd00::10]:40000 as [2001:db8:1::200]:40001 to [2001:db8:9::1]:25"
    )
    assert {"time", "level", "process"} <= line.keys() and line["level"] == "info"
    text = formatted(record, TextFormatter("audit"))
    assert "service=mail/relay audit=snat proto=tcp pod_ip=fd00::10 pod_port=40000" in text


def test_an_icmp_line_has_no_ports_but_the_echo_identifiers() -> None:
    record = record_of(
        Entry(socket.AF_INET, "10.244.1.10", "203.0.113.1", ICMP, None, None, 7, 8, 0),
        Entry(socket.AF_INET, "203.0.113.1", "198.51.100.200", ICMP, None, None, 9, 0, 0),
    )
    fields = record.fields()
    assert fields == {
        "audit": "snat",
        "service": "mail/relay",
        "proto": "icmp",
        "pod_ip": "10.244.1.10",
        "snat_ip": "198.51.100.200",
        "dst_ip": "203.0.113.1",
        "icmp_type": 8,
        "icmp_code": 0,
        "icmp_id": 7,
        "snat_icmp_id": 9,
    }
    assert set(fields) <= set(FIELDS)
    assert record.message() == "snat icmp 10.244.1.10 as 198.51.100.200 to 203.0.113.1"


# --- bounds --------------------------------------------------------------------------------


@given(
    st.integers(1, 50),
    st.lists(st.floats(0, 0.2, allow_nan=False), min_size=1, max_size=300),
)
def test_the_bucket_never_allows_more_than_its_rate_and_one_burst(
    rate: int, gaps: list[float]
) -> None:
    now = 1000.0
    bucket = TokenBucket(rate, now)
    allowed: list[float] = []
    for gap in gaps:
        now += gap
        if bucket.take(now):
            allowed.append(now)
    # In any window of length w, at most rate (the burst) + rate * w lines.
    for i, start in enumerate(allowed):
        for j in range(i, len(allowed)):
            assert j - i + 1 <= rate + rate * (allowed[j] - start) + 1e-6
    # The first `rate` lines pass at once.
    assert len(allowed) >= min(rate, len(gaps))


def test_a_steady_flood_gets_the_rate_and_the_rest_is_dropped() -> None:
    bucket = TokenBucket(100, 0.0)
    offered = 1000 * 10  # 1000 per second for 10 s
    passed = sum(bucket.take(i / 1000) for i in range(offered))
    assert 100 * 10 <= passed <= 100 * 10 + 100  # the rate, plus the first second's burst


def test_bursts_are_reported_once_at_the_start_and_once_with_their_total() -> None:
    bursts = Bursts(quiet=10.0)
    assert bursts.add(3, 0.0) is True
    assert bursts.add(2, 5.0) is False
    assert bursts.ended(14.0) is None  # 9 s quiet only
    assert bursts.ended(15.0) == 5
    assert bursts.ended(30.0) is None
    assert bursts.add(0, 31.0) is False
    assert bursts.add(1, 32.0) is True
    assert bursts.total == 6


def test_the_supervisor_starts_the_audit_process_only_with_audit_log_on() -> None:
    from metaleg.supervisor.supervisor import Supervisor

    assert "audit" in Supervisor(Config(node_name="n")).workers
    assert "audit" not in Supervisor(Config(node_name="n", audit_log=False)).workers


def test_the_audit_process_shows_in_status_but_gates_neither_health_nor_readiness() -> None:
    def process(name: str, **fields: Any) -> ProcessStatus:
        defaults: dict[str, Any] = {
            "pid": 10,
            "state": "running",
            "restarts": 0,
            "uptime_seconds": 5.0,
            "applied_generation": 3,
            "last_error": "",
        }
        return ProcessStatus(name=name, **{**defaults, **fields})

    others = (
        process("watcher", applied_generation=None),
        process("firewall"),
        process("routing"),
    )
    broken = process(
        "audit",
        state="restarting",
        applied_generation=1,
        crash_looping=True,
        last_error="died (exit status 1)",
    )
    assert evaluate((*others, broken), 3, True, 0.0) == (True, True, ())
    assert evaluate((*others, process("firewall", applied_generation=2)), 3, True, 0.0)[1] is False


def test_a_log_record_of_the_audit_logger_is_written_whatever_the_level() -> None:
    from metaleg.audit.process import lines
    from metaleg.logs import setup_logging

    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("metaleg").level
    try:
        setup_logging("audit", "error", "json")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        lines.setLevel(logging.INFO)  # as AuditProcess.run does
        lines.info("snat", extra={"audit": "snat"})
        logging.getLogger("metaleg.audit.process").info("not shown at LOG_LEVEL=error")
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        logging.getLogger("metaleg").setLevel(saved[2])
        lines.setLevel(logging.NOTSET)
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["snat"]
