"""The batched ipset netlink client and the xtables rule codec, against the real kernel.

``ipset save`` (the binary) is the independent oracle for what the kernel holds.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
from typing import Any

import pytest

from metaleg.backend import BackendError
from metaleg.firewall.iptables.ipsets import (
    HASH_IP,
    HASH_IP_MARK,
    HASH_NET,
    IpsetClient,
    SetPlan,
    SetSpec,
    plan_sets,
)
from metaleg.firewall.wire import ipset as ipset_netlink
from metaleg.firewall.wire.ipset import (
    CMD_ADD,
    IpsetSocket,
    address_text,
    member_data,
    parse_attributes,
    parse_messages,
)
from metaleg.model import Family
from tests.netns import namespace, run_in_netns

MARK = "skbmark 0x100000/0xf00000"
MARK2 = "skbmark 0x200000/0xf00000"

# --------------------------------------------------------------------------
# Pure: encoding, decoding, planning
# --------------------------------------------------------------------------


def test_member_data_layout() -> None:
    data = member_data(socket.AF_INET, False, "192.0.2.1", 7)
    ((kind, element),) = list(parse_attributes(data))
    assert kind == ipset_netlink.ATTR_DATA
    assert struct.unpack_from("=H", data, 2)[0] & ipset_netlink.NLA_F_NESTED
    attributes = dict(parse_attributes(element))
    assert dict(parse_attributes(attributes[ipset_netlink.ATTR_IP])) == {
        ipset_netlink.ATTR_IPADDR_IPV4: socket.inet_aton("192.0.2.1")
    }
    assert struct.unpack("=I", attributes[ipset_netlink.ATTR_CADT_LINENO]) == (7,)
    # The one-pack fast path and the general path agree.
    six = member_data(socket.AF_INET6, False, "2001:db8::1", 3)
    assert six == ipset_netlink._nested(
        ipset_netlink.ATTR_DATA,
        ipset_netlink.address_payload(socket.AF_INET6, "2001:db8::1")
        + ipset_netlink._attr(ipset_netlink.ATTR_CADT_LINENO, struct.pack("=I", 3)),
    )
    net = dict(parse_attributes(next(parse_attributes(member_data(2, True, "10.0.0.0/8", 1)))[1]))
    assert net[ipset_netlink.ATTR_CIDR] == b"\x08"
    marked = member_data(2, False, f"10.0.0.1 {MARK}", 1)
    fields = dict(parse_attributes(next(parse_attributes(marked))[1]))
    assert struct.unpack(">II", fields[ipset_netlink.ATTR_SKBMARK]) == (0x100000, 0xF00000)


def test_parse_messages_walks_aligned_messages() -> None:
    first = struct.pack("=IHHII", 16 + 5, 2, 0, 1, 0) + b"abcde" + b"\0\0\0"
    second = struct.pack("=IHHII", 16, 3, 0, 2, 0)
    assert list(parse_messages(first + second)) == [(2, 0, 1, b"abcde"), (3, 0, 2, b"")]


def test_address_text_matches_ipaddress() -> None:
    for text in ("2001:db8::1", "::", "::1", "fd00:0:0:1::", "1:0:0:2:0:0:0:3", "::ffff:1.2.3.4"):
        packed = socket.inet_pton(socket.AF_INET6, text)
        assert address_text(socket.AF_INET6, packed) == str(ipaddress.IPv6Address(packed))


def test_plan_sets_updates_marks_in_place() -> None:
    current = {
        "M": SetSpec(
            "M", HASH_IP_MARK, Family.IPV4, frozenset({f"10.0.0.1 {MARK}", f"10.0.0.2 {MARK}"})
        )
    }
    desired = {
        "M": SetSpec(
            "M", HASH_IP_MARK, Family.IPV4, frozenset({f"10.0.0.1 {MARK2}", f"10.0.0.3 {MARK}"})
        )
    }
    plan = plan_sets(current, desired)
    # 10.0.0.1 changes its mark by an add (updated in place); only 10.0.0.2 is removed:
    # removing 10.0.0.1's old member would delete the address with its new mark.
    assert plan.add == ((desired["M"], frozenset({f"10.0.0.1 {MARK2}", f"10.0.0.3 {MARK}"})),)
    assert plan.remove == ((desired["M"], frozenset({f"10.0.0.2 {MARK}"})),)
    # A plain hash:ip set of that name is the wrong kind: recreated.
    wrong = {"M": SetSpec("M", HASH_IP, Family.IPV4, frozenset({"10.0.0.1"}))}
    assert [spec.name for spec in plan_sets(wrong, desired).recreate] == ["M"]


# --------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------


def ipset_save() -> dict[str, tuple[str, set[str]]]:
    """name -> (create options, members) from the ipset binary."""
    text = subprocess.run(["ipset", "save"], capture_output=True, text=True, check=True).stdout
    sets: dict[str, tuple[str, set[str]]] = {}
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["create"]:
            sets[words[1]] = (" ".join(words[2:]), set())
        elif words[:1] == ["add"]:
            sets[words[1]][1].add(" ".join(words[2:]))
    return sets


def many_sets(count: int) -> dict[str, SetSpec]:
    sets = {}
    for index in range(count):
        family = Family.IPV4 if index % 2 == 0 else Family.IPV6
        name = f"METALEG-SRC-{int(family)}-{index:012x}"
        if family is Family.IPV4:
            members = frozenset(f"10.{index // 250}.{index % 250}.{host}" for host in range(1, 11))
        else:
            members = frozenset(f"fd00::{index:x}:{host:x}" for host in range(1, 11))
        sets[name] = SetSpec(name, HASH_IP, family, members)
    sets["METALEG-EXCLUDE-DST-4"] = SetSpec(
        "METALEG-EXCLUDE-DST-4", HASH_NET, Family.IPV4, frozenset({"10.0.0.0/8", "192.0.2.7/32"})
    )
    sets["METALEG-EXCLUDE-DST-6"] = SetSpec(
        "METALEG-EXCLUDE-DST-6",
        HASH_NET,
        Family.IPV6,
        frozenset({"fc00::/7", "::ffff:102:304/128"}),
    )
    sets["METALEG-MARK-4"] = SetSpec(
        "METALEG-MARK-4",
        HASH_IP_MARK,
        Family.IPV4,
        frozenset({f"10.0.0.1 {MARK}", f"10.0.0.2 {MARK2}"}),
    )
    sets["METALEG-MARK-6"] = SetSpec(
        "METALEG-MARK-6", HASH_IP_MARK, Family.IPV6, frozenset({f"fd00::1 {MARK2}"})
    )
    return sets


def round_trip() -> dict[str, Any]:
    client = IpsetClient()
    try:
        subprocess.run(["ipset", "create", "foreign", "hash:ip"], check=True)
        subprocess.run(["ipset", "add", "foreign", "192.0.2.99"], check=True)
        desired = many_sets(1500)  # several datagrams of requests
        empty = client.list_sets()
        client.make(plan_sets(empty, desired))
        listed = client.list_sets()
        saved = ipset_save()
        # Marks change in place; a member goes; sets go.
        changed = dict(desired)
        changed["METALEG-MARK-4"] = SetSpec(
            "METALEG-MARK-4", HASH_IP_MARK, Family.IPV4, frozenset({f"10.0.0.1 {MARK2}"})
        )
        del changed["METALEG-SRC-4-000000000000"]
        plan = plan_sets(listed, changed)
        client.make(plan)
        errors = client.unmake(plan)
        after = client.list_sets()
        saved_after = ipset_save()
        return {
            "empty": empty,
            "desired": desired,
            "listed": listed,
            "saved": saved,
            "changed": changed,
            "errors": errors,
            "after": after,
            "saved_after": saved_after,
        }
    finally:
        client.close()


@pytest.mark.netns
def test_batches_write_and_read_back_exactly() -> None:
    with namespace("mlis") as ns:
        result = run_in_netns(ns, round_trip, timeout=120)
    assert result["empty"] == {}
    assert result["listed"] == result["desired"]  # other components' sets are not listed
    saved = result["saved"]
    assert "foreign" in saved
    for name, spec in result["desired"].items():
        options, members = saved[name]
        family = "inet" if spec.family is Family.IPV4 else "inet6"
        assert options.startswith(f"{spec.kind.split()[0]} family {family} ")
        assert ("skbinfo" in options.split()) == (spec.kind == HASH_IP_MARK)
        if spec.kind == HASH_NET:  # ipset writes host networks without their prefix
            members = {str(ipaddress.ip_network(m)) for m in members}
        assert members == set(spec.members), name
    assert result["errors"] == []
    assert result["after"] == result["changed"]
    assert result["saved_after"]["METALEG-MARK-4"][1] == {f"10.0.0.1 {MARK2}"}
    assert "METALEG-SRC-4-000000000000" not in result["saved_after"]


def errors_in_batches() -> dict[str, str]:
    client = IpsetClient()
    messages: dict[str, str] = {}
    try:
        net = SetSpec("METALEG-NET", HASH_NET, Family.IPV4)
        client.make(SetPlan(create=(net,)))
        try:
            # Sorted, the bad member is the third of one message (line number 3).
            bad = frozenset({"10.0.0.0/8", "11.0.0.0/8", "12.0.0.0/0", "13.0.0.0/8"})
            client.make(SetPlan(add=((net, bad),)))
        except BackendError as error:
            messages["member"] = str(error)
        messages["kept"] = " ".join(sorted(client.list_sets()["METALEG-NET"].members))
        try:
            missing = SetSpec("METALEG-NONE", HASH_IP, Family.IPV4)
            client.make(SetPlan(add=((missing, frozenset({"192.0.2.1"})),)))
        except BackendError as error:
            messages["missing"] = str(error)
        try:
            client.make(SetPlan(add=((net, frozenset({"2001:db8::/32"})),)))
        except BackendError as error:
            messages["family"] = str(error)
        # A failure in the middle of a long batch is reported for its set; the requests
        # after it were carried out.
        sets = [SetSpec(f"METALEG-B-{index:04d}", HASH_IP, Family.IPV4) for index in range(600)]
        wrong_type = SetSpec("METALEG-B-0300", HASH_NET, Family.IPV4)
        client.make(SetPlan(create=(wrong_type,)))
        try:
            client.make(SetPlan(create=tuple(sets)))
        except BackendError as error:
            messages["batch"] = str(error)
        names = client.list_sets()
        messages["created"] = str(sum(1 for name in names if name.startswith("METALEG-B-")))
        subprocess.run(
            "iptables-legacy -A INPUT -m set --match-set METALEG-B-0001 src -j ACCEPT",
            shell=True,
            check=True,
        )
        failed = client.unmake(
            SetPlan(destroy=("METALEG-B-0000", "METALEG-B-0001", "METALEG-B-0002"))
        )
        messages["busy"] = "; ".join(failed)
        messages["left"] = " ".join(n for n in sorted(client.list_sets()) if n < "METALEG-B-0003")
        assert client.unmake(SetPlan(destroy=("METALEG-NO-SUCH-SET",))) == []  # fine
        return messages
    finally:
        client.close()


@pytest.mark.netns
def test_errors_name_the_set_and_the_member() -> None:
    with namespace("mlis") as ns:
        messages = run_in_netns(ns, errors_in_batches, timeout=120)
    assert messages["member"].startswith("ipset METALEG-NET: cannot add 12.0.0.0/0: invalid CIDR")
    assert messages["kept"] == "10.0.0.0/8 11.0.0.0/8"  # the kernel stopped at the bad one
    assert messages["missing"].startswith("ipset METALEG-NONE: cannot add members: ")
    assert "No such file or directory" in messages["missing"]
    assert messages["family"].startswith("ipset METALEG-NET: cannot add 2001:db8::/32")
    assert messages["batch"].startswith("ipset METALEG-B-0300: cannot create: ")
    assert messages["created"] == "600"
    assert messages["busy"].startswith(
        "ipset METALEG-B-0001: cannot destroy, a rule outside metaleg's chains still uses it"
    )
    assert messages["left"] == "METALEG-B-0001"


def stale_index() -> dict[str, Any]:
    """A cached rule whose set was destroyed and created again (another index) is rebuilt."""
    import iptc

    from metaleg.firewall.iptables.helper import XtablesServer
    from metaleg.firewall.iptables.rules import mark_map_rule, snat_rule, stale_binding_rule

    for name in ("METALEG-A", "METALEG-B"):
        subprocess.run(["ipset", "create", name, "hash:ip"], check=True)
    subprocess.run(["ipset", "create", "METALEG-MARK-4", "hash:ip", "skbinfo"], check=True)
    server = XtablesServer(4, "/run/xtables.lock")
    codec = server._codec
    rules = [
        snat_rule("METALEG-A", "192.0.2.1"),
        stale_binding_rule("METALEG-A", "192.0.2.1", 0xF00000),
        mark_map_rule(Family.IPV4),
    ]
    codec.start_request(1)
    first = [codec.build(rule) for rule in rules]
    fresh = [
        codec.key(bytes(server._build("x", rule).rule), "DROP" if rule.target == "DROP" else None)
        for rule in rules[:2]
    ]
    fresh.append(first[2][1])
    subprocess.run(["ipset", "destroy", "METALEG-A"], check=True)
    subprocess.run(["ipset", "create", "METALEG-C", "hash:ip"], check=True)  # takes A's index
    subprocess.run(["ipset", "create", "METALEG-A", "hash:ip"], check=True)
    codec.start_request(2)
    second = [codec.build(rule) for rule in rules]
    # Written into a chain and read back, the keys equal the desired ones.
    table = iptc.Table("nat", autocommit=False)
    table.create_chain("METALEG-T")
    for buffer, _ in second[:2]:
        table.append_entry("METALEG-T", ctypes_buffer(buffer))
    table.commit()
    table.refresh()
    read = [key for _, key in codec.read_chain(table, "METALEG-T")]
    table.close()
    saved = subprocess.run(
        ["iptables-legacy-save", "-t", "nat"], capture_output=True, text=True, check=True
    ).stdout
    return {
        "first_keys_differ": [a[1] != b[1] for a, b in zip(first, second, strict=True)],
        "python_iptables_keys": fresh == [key for _, key in first],
        "read_equal": read == [key for _, key in second[:2]],
        "saved": saved,
    }


def ctypes_buffer(data: bytes) -> Any:
    import ctypes

    return ctypes.create_string_buffer(data, len(data))


@pytest.mark.netns
def test_rule_codec_rebuilds_rules_of_recreated_sets() -> None:
    with namespace("mlis") as ns:
        result = run_in_netns(ns, stale_index, timeout=60)
    # The set rules changed (new index); the SET target rule is built afresh anyway.
    assert result["first_keys_differ"] == [True, True, False]
    assert result["read_equal"]
    assert result["python_iptables_keys"]
    assert (
        "-A METALEG-T -m set --match-set METALEG-A src -j SNAT --to-source 192.0.2.1"
        in (result["saved"])
    )


def assert_codec_matches_python_iptables() -> list[bool]:
    from metaleg.firewall.iptables.helper import XtablesServer
    from metaleg.firewall.iptables.rules import (
        exclude_rule,
        mark_skip_rule,
        reject_rule,
        snat_rule,
        source_return_rule,
        stale_binding_rule,
        transit_reject_rule,
    )

    for name in ("METALEG-EXCLUDE-DST-4", "METALEG-TRANSIT-4", "METALEG-A"):
        subprocess.run(["ipset", "create", name, "hash:net"], check=True)
    server = XtablesServer(4, "/run/xtables.lock")
    rules = [
        exclude_rule(Family.IPV4),
        mark_skip_rule(0xF00000),
        snat_rule("METALEG-A", "192.0.2.1"),
        reject_rule("METALEG-A", Family.IPV4),
        source_return_rule("METALEG-A"),
        stale_binding_rule("METALEG-A", "192.0.2.1", 0xF00000),
        transit_reject_rule(Family.IPV4),
    ]
    server._codec.start_request()
    return [server._codec.build(rule)[0] == bytes(server._build("x", rule).rule) for rule in rules]


@pytest.mark.netns
def test_rule_codec_builds_what_python_iptables_builds() -> None:
    with namespace("mlis") as ns:
        same = run_in_netns(ns, assert_codec_matches_python_iptables, timeout=60)
    assert same == [True] * 7


def socket_reuse() -> list[str]:
    """The client works on after a kernel error and after a socket error."""
    client = IpsetClient()
    spec = SetSpec("METALEG-X", HASH_IP, Family.IPV4)
    results = []
    client.make(SetPlan(create=(spec,)))
    try:
        client.make(SetPlan(create=(SetSpec("METALEG-X", HASH_NET, Family.IPV4),)))
    except BackendError as error:
        results.append(str(error))
    client.make(SetPlan(add=((spec, frozenset({"192.0.2.1"})),)))
    sock = IpsetSocket()
    requests = sock.members(CMD_ADD, "METALEG-X", socket.AF_INET, False, ["192.0.2.2"])
    assert sock.run(requests) == []
    sock.close()
    results.append(" ".join(sorted(client.list_sets()["METALEG-X"].members)))
    client.close()
    return results


@pytest.mark.netns
def test_client_goes_on_after_errors() -> None:
    with namespace("mlis") as ns:
        results = run_in_netns(ns, socket_reuse, timeout=60)
    assert results[0].startswith("ipset METALEG-X: cannot create: File exists")
    assert results[1] == "192.0.2.1 192.0.2.2"
