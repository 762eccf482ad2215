"""The firewall's applied state on disk (snapshot + appended changes) and what the iptables
path does with it: conntrack scoping across a restart of the firewall worker."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import msgspec
import pytest

from metaleg.firewall.applied_state import AppliedStateFile
from metaleg.firewall.claims import SourceClaims
from metaleg.firewall.iptables.backend import IptablesBackend
from metaleg.firewall.selection import APPLIED_STATE_FILE, ManagedFirewall
from metaleg.model import Action, Family, FamilyEgress, NodeDesiredState, Role, ServiceEgress
from tests.netns import namespace, run_in_netns
from tests.test_conntrack import flows_in, insert_flows
from tests.test_nft_incremental import random_state

MASK = 0x00F00000


def ordered_states(seed: int, count: int) -> list[NodeDesiredState]:
    """Random nearby states whose Services are sorted (the ones that go as patches)."""
    rng = random.Random(seed)
    states: list[NodeDesiredState] = []
    while len(states) < count:
        state = random_state(rng, states[-1] if states else None)
        keys = [(s.namespace, s.name) for s in state.services]
        if keys == sorted(set(keys)):
            states.append(state)
    return states


def save_all(file: AppliedStateFile, states: list[NodeDesiredState]) -> None:
    claims: SourceClaims | None = None
    for state in states:
        step = claims.step(state) if claims is not None else None
        changes = None
        if claims is not None and step is not None:
            changes = step.services
            claims.commit(step)
        else:
            claims = SourceClaims.build(state)[0]
        file.save(state, changes)


def test_patches_replay_to_the_last_state(tmp_path: Path) -> None:
    path = str(tmp_path / APPLIED_STATE_FILE)
    states = [s for s in ordered_states(3, 60) if _valid(s)]
    file = AppliedStateFile(path)
    save_all(file, states)
    assert AppliedStateFile(path).load() == states[-1]
    # Appended, not rewritten: the file holds more than one record.
    snapshot = len(msgspec.msgpack.encode(states[-1]))
    assert os.path.getsize(path) > snapshot + 8


def test_patches_that_outgrow_the_snapshot_are_compacted(tmp_path: Path) -> None:
    path = str(tmp_path / APPLIED_STATE_FILE)
    file = AppliedStateFile(path)
    states = [s for s in ordered_states(5, 400) if _valid(s)]
    save_all(file, states)
    assert os.path.getsize(path) < 2 * 64 * 1024 + 4096
    assert AppliedStateFile(path).load() == states[-1]


def test_a_change_cut_short_leaves_the_state_before_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / APPLIED_STATE_FILE)
    states = [s for s in ordered_states(7, 10) if _valid(s)]
    save_all(AppliedStateFile(path), states[:-1])
    size = os.path.getsize(path)
    save_all(AppliedStateFile(path), states[-2:])  # a restart: a snapshot, then one patch
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 3)
    with caplog.at_level(logging.WARNING):
        assert AppliedStateFile(path).load() == states[-2]
    assert "written only in part" in caplog.text
    assert os.path.getsize(path) != size


def test_garbage_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / APPLIED_STATE_FILE
    path.write_bytes(b"\x00\x00\x00\x05hello")
    with caplog.at_level(logging.WARNING):
        assert AppliedStateFile(str(path)).load() is None
    assert "ignoring unreadable" in caplog.text
    assert AppliedStateFile(str(tmp_path / "missing")).load() is None


def _valid(state: NodeDesiredState) -> bool:
    try:
        SourceClaims.build(state)
    except Exception:
        return False
    return True


# --- a restart in a namespace -----------------------------------------------------------------

SNAT_HERE = "10.244.1.5"
MARKED = "10.244.1.6"
PEER = "203.0.113.10"


def egress_state(*, mark_snat_source: bool) -> NodeDesiredState:
    mail = FamilyEgress(
        Family.IPV4,
        Action.MARK if mark_snat_source else Action.SNAT,
        (SNAT_HERE,),
        snat_ip=None if mark_snat_source else "192.0.2.10",
        fwmark=(2 << 20) if mark_snat_source else None,
    )
    web = FamilyEgress(Family.IPV4, Action.MARK, (MARKED,), fwmark=1 << 20)
    return NodeDesiredState(
        "node-a",
        MASK,
        ("10.96.0.0/12",),
        (),
        (
            ServiceEgress("mail", "relay", Role.GATEWAY, "node-a", ("192.0.2.10",), (mail,)),
            ServiceEgress("shop", "web", Role.FORWARDER, "node-b", (), (web,)),
        ),
    )


def run_firewall(run_dir: str, *states: NodeDesiredState) -> None:
    firewall = ManagedFirewall(IptablesBackend(), None, run_dir)
    try:
        for state in states:
            firewall.apply(state)
    finally:
        firewall.close()


@pytest.mark.netns
def test_a_restarted_worker_flushes_only_what_changed_since_before(tmp_path: Path) -> None:
    run_dir = str(tmp_path)
    with namespace("mlapplied") as ns:
        first = egress_state(mark_snat_source=False)
        run_in_netns(ns, run_firewall, run_dir, first, timeout=60)
        flows = [(SNAT_HERE, PEER, "udp", 4000, 53), (MARKED, PEER, "udp", 4001, 53)]
        insert_flows(ns, flows)
        # The same state after a restart: nothing changed, nothing goes.
        run_in_netns(ns, run_firewall, run_dir, first, timeout=60)
        assert flows_in(ns) == {(SNAT_HERE, PEER, 4000), (MARKED, PEER, 4001)}
        # Restarted again, and the gateway moved away: only that source's flow goes.
        run_in_netns(ns, run_firewall, run_dir, egress_state(mark_snat_source=True), timeout=60)
        assert flows_in(ns) == {(MARKED, PEER, 4001)}
