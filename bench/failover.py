"""Gateway failover in the 3-node lab: a ServiceL2Status change to egress via the new gateway.

Run::

    .venv/bin/python -m bench.failover            # 20 moves per backend (about 3 min)
    .venv/bin/python -m bench.failover --quick    # 6 moves, nftables only
    .venv/bin/python -m bench.failover --moves 50 --backends iptables --rate 500

The lab of :mod:`tests.lab` (three nodes, a router, the internet, the API
emulator, one real ``metaleg-supervisor run`` per node; kube-router's
masquerade in legacy mode for the iptables backend, nft mode for nftables)
with one labelled Service and one pod of it on every node. Every pod sends
UDP datagrams, ``--rate`` per second and family, each from a new socket (a
new flow, as every new SMTP connection of a mail relay is), carrying its send
time (``time.monotonic()``, the same clock in every namespace). A sniffer
(AF_PACKET on the router's LAN interface) records for each datagram the
sending node's MAC, the source address and the send time.

A move: the ServiceL2Status is pointed at the next node (written straight
into the emulator's store: the write's time is precise) and the router's
neighbour entry for the LB IPs is moved to it (MetalLB's announcement). For
each stream (pod x family) the **failover time** is the send time of its
first datagram after which every datagram arrives from the new gateway's MAC
with the LB IP as source, minus the time of the write; per move the slowest
stream counts. Datagrams that never arrive (rejected or dropped during the
move) and datagrams with another source (leaks) are counted.

Under traffic the agents' logs also give when the last of the six data-plane
workers (firewall and routing on three nodes) logged "applied snapshot": that
comes after the worker deleted the conntrack entries of the moved sources,
and every datagram of the senders is a conntrack entry (the nodes' UDP
conntrack timeout is lowered to ``--udp-timeout``, default 2 s, to keep that
bounded).

**metaleg's share** is measured in a second phase, without traffic (the
senders stopped and their flows expired): ``--moves`` more moves, each timed
from the write to the last worker's "applied snapshot" (JSON logs,
millisecond timestamps), with the intermediate stages (each node's watcher
logging the new egress, the supervisor's new generation). The write time
stands in for the watcher receiving the change (the watch event reaches the
watchers over the lab network within a millisecond or two, included here).

Results: a table on stdout and ``bench/results/failover.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import select
import shutil
import socket
import struct
import sys
import time
from typing import Any

from bench import pyspy
from bench.agent import LogLine, parse_log_lines
from bench.common import (
    RESULTS_DIR,
    exit_on_sigterm,
    machine,
    ms,
    require_root,
    summary,
    table,
    write_results,
)
from tests.lab import INTERNET4, INTERNET6, LB_IP4, LB_IP6, Host, Lab, MasqueradeMode
from tests.lab.agents import EgressLab

NAMESPACE, SERVICE = "mail", "relay"
METALLB = "metallb-system"
PORT = 5999
MAGIC = b"MLBF"
PAYLOAD = struct.Struct("!4sBBId")  # magic, pod index, family, sequence, send time
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
LB = {4: LB_IP4, 6: LB_IP6}


# --- processes inside lab namespaces ---------------------------------------------------------------


def _enter(netns: str) -> None:
    from pyroute2 import netns as pyroute2_netns

    pyroute2_netns.setns(netns, flags=0)


def _sender_main(netns: str, pod: int, rate: float, stop: Any) -> None:
    _enter(netns)
    interval = 1.0 / rate
    targets = {4: (socket.AF_INET, (INTERNET4, PORT)), 6: (socket.AF_INET6, (INTERNET6, PORT))}
    sequence = 0
    started = time.monotonic()
    while not stop.is_set():
        for family, (address_family, target) in targets.items():
            with (
                contextlib.suppress(OSError),
                socket.socket(address_family, socket.SOCK_DGRAM) as s,
            ):
                s.sendto(PAYLOAD.pack(MAGIC, pod, family, sequence, time.monotonic()), target)
        sequence += 1
        time.sleep(max(0.0, started + sequence * interval - time.monotonic()))


def _parse(frame: bytes) -> tuple[str, str, int, int, int, float] | None:
    """(source MAC, source IP, pod, family, sequence, send time) of one of our datagrams."""
    if len(frame) < 14:
        return None
    mac = frame[6:12].hex(":")
    ethertype = int.from_bytes(frame[12:14], "big")
    offset = 14
    if ethertype == 0x8100 and len(frame) >= 18:
        ethertype = int.from_bytes(frame[16:18], "big")
        offset = 18
    if ethertype == 0x0800:
        header = frame[offset:]
        if len(header) < 20 or header[9] != 17:
            return None
        ihl = (header[0] & 0x0F) * 4
        source = socket.inet_ntop(socket.AF_INET, header[12:16])
        udp = header[ihl:]
    elif ethertype == 0x86DD:
        header = frame[offset:]
        if len(header) < 40 or header[6] != 17:
            return None
        source = socket.inet_ntop(socket.AF_INET6, header[8:24])
        udp = header[40:]
    else:
        return None
    if len(udp) < 8 + PAYLOAD.size or int.from_bytes(udp[2:4], "big") != PORT:
        return None
    magic, pod, family, sequence, sent = PAYLOAD.unpack(udp[8 : 8 + PAYLOAD.size])
    if magic != MAGIC:
        return None
    return mac, source, pod, family, sequence, sent


def _sniffer_main(netns: str, interface: str, conn: Any) -> None:
    _enter(netns)
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sniffer.bind((interface, 0))
    sniffer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    records: list[tuple[str, str, int, int, int, float, float]] = []
    conn.send("ready")
    while True:
        readable, _, _ = select.select([sniffer, conn], [], [])
        if sniffer in readable:
            for _ in range(256):
                try:
                    frame, address = sniffer.recvfrom(2048, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                parsed = _parse(frame)
                if parsed is not None:
                    records.append((*parsed, time.monotonic()))
        if conn in readable:
            try:
                request = conn.recv()
            except EOFError:
                return
            if request is None:
                return
            conn.send(records)
            records = []


class Sniffer:
    def __init__(self, netns: str, interface: str) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_sniffer_main, args=(netns, interface, child))
        self._process.start()
        child.close()
        if not self._conn.poll(10) or self._conn.recv() != "ready":
            raise RuntimeError("the sniffer did not start")

    def take(self) -> list[tuple[str, str, int, int, int, float, float]]:
        """Records since the last call: (mac, source, pod, family, seq, sent, received)."""
        self._conn.send("take")
        records: list[tuple[str, str, int, int, int, float, float]] = self._conn.recv()
        return records

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


# --- the scenario ----------------------------------------------------------------------------------


def read_log(path: str) -> list[LogLine]:
    with contextlib.suppress(OSError), open(path, "rb") as file:
        return parse_log_lines(file)
    return []


def stream_failover(
    records: list[tuple[str, str, int, int, int, float, float]],
    t0: float,
    new_mac: str,
    streams: list[tuple[int, int]],
) -> dict[str, Any]:
    """Per stream, the failover time (see the module doc), lost and leaked datagrams."""
    per: dict[str, float | None] = {}
    lost = leaked = 0
    for pod, family in streams:
        mine = {r[4]: r for r in records if r[2] == pod and r[3] == family and r[5] >= t0}
        if not mine:
            per[f"{pod}/{family}"] = None
            continue
        first, last = min(mine), max(mine)
        leaked += sum(1 for r in mine.values() if r[1] != LB[family])
        lost += (last - first + 1) - len(mine)
        # A datagram is good when it was seen, from the new gateway, with the LB IP;
        # one lost (rejected, dropped) counts as not yet failed over.
        last_bad = first - 1
        for sequence in range(first, last + 1):
            r = mine.get(sequence)
            if r is None or r[1] != LB[family] or r[0] != new_mac:
                last_bad = sequence
        if last_bad == last:
            per[f"{pod}/{family}"] = None
        else:
            per[f"{pod}/{family}"] = mine[last_bad + 1][5] - t0
    return {"streams": per, "lost": lost, "leaked": leaked}


def stages(logs: dict[str, list[LogLine]], wall: float, until: float) -> dict[str, float | None]:
    """From the agents' logs, seconds from the write (``wall``) to: each node's watcher
    logging the new egress, the supervisor's new generation, and each data-plane worker's
    "applied snapshot"; ``None`` where no such line came before ``until``."""
    out: dict[str, float | None] = {}
    for node, lines in logs.items():
        window = [x for x in lines if wall - 0.001 <= x.time <= until]

        def first(process: str, prefix: str, window: list[LogLine] = window) -> float | None:
            times = [x.time for x in window if x.process == process and x.msg.startswith(prefix)]
            return max(0.0, min(times) - wall) if times else None

        out[f"{node}/watcher"] = first("watcher", "service egress")
        out[f"{node}/supervisor"] = first("supervisor", "new desired state")
        out[f"{node}/routing"] = first("routing", "applied snapshot")
        out[f"{node}/firewall"] = first("firewall", "applied snapshot")
    return out


def slowest(per: dict[str, float | None], kind: str) -> float | None:
    """The latest of one kind of stage over the nodes (None if any node lacks it)."""
    values = [v for k, v in per.items() if k.endswith("/" + kind)]
    if not values or any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


def metaleg_share(per: dict[str, float | None]) -> float | None:
    """Write -> the last of the six data-plane workers logged "applied snapshot"."""
    workers = [slowest(per, "routing"), slowest(per, "firewall")]
    return None if None in workers else max(w for w in workers if w is not None)


class Scene:
    """The lab with the Service, its pods and the agents; moves the gateway."""

    def __init__(self, egress: EgressLab) -> None:
        self.egress = egress
        self.lab = egress.lab
        self.nodes = list(self.lab.nodes)
        self.gateway = self.nodes[0]

    def move(self) -> tuple[str, float, float]:
        """Point the ServiceL2Status and the announcement at the next node: (node, wall, t0)."""
        target = self.nodes[(self.nodes.index(self.gateway) + 1) % len(self.nodes)]
        wall = time.time()
        t0 = time.monotonic()
        self.egress.api.store.patch(
            "servicel2statuses",
            f"l2-{NAMESPACE}-{SERVICE}",
            {"status": {"node": target}},
            METALLB,
            subresource="status",
        )
        self.lab.announce(LB_IP4, target)
        self.lab.announce(LB_IP6, target)
        self.gateway = target
        return target, wall, t0

    def logs(self) -> dict[str, list[LogLine]]:
        return {node: read_log(agent.log_path) for node, agent in self.egress.agents.items()}

    def conntrack_entries(self) -> int:
        total = 0
        for node in self.nodes:
            output = self.lab.exec(node, "conntrack", "-C", check=False).strip()
            total += int(output) if output.isdigit() else 0
        return total


def traffic_phase(
    scene: Scene, backend: str, moves: int, rate: float, pods: list[Any]
) -> list[dict[str, Any]]:
    """Moves under traffic: failover seen in the packets, and the workers' finish times."""
    lab = scene.lab
    sniffer = Sniffer(lab.router.netns, "lan")
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    senders = [
        context.Process(target=_sender_main, args=(pod.netns, index, rate, stop))
        for index, pod in enumerate(pods)
    ]
    for sender in senders:
        sender.start()
    streams = [(i, f) for i in range(len(pods)) for f in (4, 6)]
    results: list[dict[str, Any]] = []
    try:
        time.sleep(2.0)
        sniffer.take()
        for move in range(moves):
            entries = scene.conntrack_entries()
            target, wall, t0 = scene.move()
            new_mac = lab.node(target).mac
            records: list[tuple[str, str, int, int, int, float, float]] = []
            # Watch until every stream has been on the new gateway for a second.
            deadline = t0 + 20.0
            while time.monotonic() < deadline:
                time.sleep(0.25)
                records += sniffer.take()
                outcome = stream_failover(records, t0, new_mac, streams)
                times = outcome["streams"].values()
                if all(t is not None for t in times):
                    latest = max(t for t in times if t is not None)
                    if time.monotonic() - t0 - latest > 1.0:
                        break
            time.sleep(0.5)
            outcome = stream_failover(records, t0, new_mac, streams)
            per = stages(scene.logs(), wall, wall + 20.0)
            values = [t for t in outcome["streams"].values() if t is not None]
            entry = {
                "move": move,
                "to": target,
                "failover": max(values) if len(values) == len(streams) else None,
                "streams": outcome["streams"],
                "lost": outcome["lost"],
                "leaked": outcome["leaked"],
                "conntrack_entries_before": entries,
                "metaleg_done": metaleg_share(per),
                "stages": per,
            }
            results.append(entry)
            print(
                f"{backend}: traffic move {move + 1}/{moves} -> {target}: "
                f"failover {ms(entry['failover'])}, workers done {ms(entry['metaleg_done'])} "
                f"({entries} conntrack entries), lost {outcome['lost']}, "
                f"leaked {outcome['leaked']}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        stop.set()
        for sender in senders:
            sender.join(5)
            if sender.is_alive():
                sender.kill()
        sniffer.close()
    return results


def quiet_phase(
    scene: Scene, backend: str, moves: int, profile: bool = False
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Moves without traffic: metaleg's own share from the logs (and py-spy profiles of the
    firewall and watcher workers of every node with ``profile``)."""
    results: list[dict[str, Any]] = []
    spies: dict[str, tuple[Any, str]] = {}
    if profile:
        for node, agent in scene.egress.agents.items():
            for worker in ("firewall", "watcher"):
                pid = agent.worker_pid(worker)
                path = str(RESULTS_DIR / f"failover-{backend}-{node}-{worker}.pyspy")
                spy = pyspy.record(pid, path) if pid else None
                if spy is not None:
                    spies[f"{node}/{worker}"] = (spy, path)
        time.sleep(1.0)
    for move in range(moves):
        target, wall, _ = scene.move()
        time.sleep(1.5)
        per = stages(scene.logs(), wall, wall + 1.5)
        share = metaleg_share(per)
        results.append({"move": move, "to": target, "metaleg_share": share, "stages": per})
        print(
            f"{backend}: quiet move {move + 1}/{moves} -> {target}: metaleg {ms(share)}",
            file=sys.stderr,
            flush=True,
        )
    for spy, _ in spies.values():
        pyspy.stop(spy)
    return results, {name: pyspy.collapse(path, 20) for name, (_, path) in spies.items()}


def run_backend(
    backend: str,
    moves: int,
    rate: float,
    udp_timeout: int,
    keep_logs: str | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    masquerade: MasqueradeMode = "legacy" if backend == "iptables" else "nft"
    with (
        Lab(masquerade=masquerade, recorder=False) as lab,
        EgressLab(
            lab, LOG_FORMAT="json", FIREWALL_BACKEND=backend, RECONCILIATION_INTERVAL="5m"
        ) as egress,
    ):
        scene = Scene(egress)
        pods = [egress.add_pod(n, f"relay-{n[-1]}", {"app": SERVICE}) for n in scene.nodes]
        cluster = egress.cluster
        cluster.service(NAMESPACE, SERVICE, (LB_IP4, LB_IP6))
        cluster.endpoints(NAMESPACE, SERVICE, "IPv4", [(p.ipv4, p.node) for p in pods])
        cluster.endpoints(NAMESPACE, SERVICE, "IPv6", [(p.ipv6, p.node) for p in pods])
        cluster.gateway(NAMESPACE, SERVICE, scene.gateway)
        lab.announce(LB_IP4, scene.gateway)
        lab.announce(LB_IP6, scene.gateway)
        for node in scene.nodes:
            egress.start_agent(node)
        for node in scene.nodes:
            egress.wait_ready(node, timeout=60)
        # Every datagram is a new flow: keep the conntrack tables small.
        targets: list[str | Host] = [*scene.nodes, lab.router]
        for target in targets:
            lab.exec(
                target, "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={udp_timeout}"
            )
        try:
            traffic = traffic_phase(scene, backend, moves, rate, pods)
            time.sleep(udp_timeout + 1.0)  # the senders' flows expire
            quiet, profiles = quiet_phase(scene, backend, moves, profile)
        finally:
            if keep_logs:
                os.makedirs(keep_logs, exist_ok=True)
                for node, agent in egress.agents.items():
                    shutil.copy(agent.log_path, os.path.join(keep_logs, f"{backend}-{node}.log"))

    def collect(entries: list[dict[str, Any]], key: str) -> list[float]:
        return [e[key] for e in entries if e.get(key) is not None]

    def stage(entries: list[dict[str, Any]], kind: str) -> list[float]:
        values = [slowest(e["stages"], kind) for e in entries]
        return [v for v in values if v is not None]

    return {
        "traffic": traffic,
        "quiet": quiet,
        "failover": summary(collect(traffic, "failover")),
        "workers_done_under_traffic": summary(collect(traffic, "metaleg_done")),
        "metaleg_share": summary(collect(quiet, "metaleg_share")),
        "quiet_stages": {
            kind: summary(stage(quiet, kind))
            for kind in ("watcher", "supervisor", "routing", "firewall")
        },
        "incomplete": sum(1 for r in traffic if r["failover"] is None),
        "lost": sum(r["lost"] for r in traffic),
        "leaked": sum(r["leaked"] for r in traffic),
        "conntrack_entries_before": summary(
            [float(r["conntrack_entries_before"]) for r in traffic]
        ),
        "rate": rate,
        "udp_timeout": udp_timeout,
        "profiles": profiles,
    }


def render_report(results: dict[str, Any]) -> str:
    rows = []
    for backend, r in results["backends"].items():
        f, d = r["failover"], r["workers_done_under_traffic"]
        rows.append(
            [
                backend,
                f["n"],
                ms(f["p50"]),
                ms(f["p99"]),
                ms(f["max"]),
                ms(d["p50"]),
                ms(d["p99"]),
                f"{r['conntrack_entries_before']['p50']:.0f}",
                r["incomplete"],
                r["lost"],
                r["leaked"],
            ]
        )
    rate = next(iter(results["backends"].values()))["rate"] if results["backends"] else 1.0
    lines = [
        "Under traffic: ServiceL2Status write -> every pod's new flows leave via the new "
        "gateway with the LB IP",
        table(
            [
                "backend",
                "moves",
                "p50",
                "p99",
                "max",
                "workers done p50",
                "p99",
                "conntrack",
                "incomplete",
                "lost",
                "leaked",
            ],
            rows,
        ),
        f"(one datagram every {1000 / rate:.0f} ms per pod and family, each a new flow; "
        "'workers done': write -> last of the 6 data-plane workers logged 'applied snapshot', "
        "which comes after the conntrack flush of the moved sources; 'conntrack': entries on "
        "the 3 nodes before a move)",
        "",
        "metaleg's share without traffic: write -> each stage, slowest of the 3 nodes (from logs)",
    ]
    rows = []
    for backend, r in results["backends"].items():
        q = r["quiet_stages"]
        s = r["metaleg_share"]
        rows.append(
            [
                backend,
                s["n"],
                ms(q["watcher"]["p50"]),
                ms(q["supervisor"]["p50"]),
                ms(q["routing"]["p50"]),
                ms(q["firewall"]["p50"]),
                ms(s["p50"]),
                ms(s["p99"]),
            ]
        )
    lines.append(
        table(
            [
                "backend",
                "moves",
                "watcher p50",
                "supervisor p50",
                "routing p50",
                "firewall p50",
                "share p50",
                "share p99",
            ],
            rows,
        )
    )
    goals = []
    for backend, r in results["backends"].items():
        for label, s in (
            ("metaleg's share (quiet)", r["metaleg_share"]),
            ("packets on the new gateway (traffic)", r["failover"]),
            ("workers done (traffic)", r["workers_done_under_traffic"]),
        ):
            ok = s["n"] > 0 and s["p50"] < 0.3 and s["p99"] < 0.3
            goals.append(
                [
                    f"{backend}: {label} p50/p99",
                    f"{ms(s['p50'])} / {ms(s['p99'])}",
                    "< 300 ms",
                    "yes" if ok else "NO",
                ]
            )
    lines.append("")
    lines.append(table(["goal", "value", "target", "met"], goals))
    for backend, r in results["backends"].items():
        for name, text in r.get("profiles", {}).items():
            lines += ["", f"py-spy, {backend}, {name}, during the quiet moves", text]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.failover", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--backends", default="iptables,nftables")
    parser.add_argument("--rate", type=float, default=100.0, help="datagrams/s per pod and family")
    parser.add_argument(
        "--udp-timeout",
        type=int,
        default=2,
        help="nf_conntrack_udp_timeout in the lab (every datagram is a new flow)",
    )
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the agents' logs to DIR")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the workers during the quiet moves"
    )
    parser.add_argument("--quick", action="store_true", help="6 moves, nftables only")
    args = parser.parse_args(argv)
    require_root()
    exit_on_sigterm()
    info = machine()
    moves, backends = args.moves, [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.quick:
        moves, backends = 6, ["nftables"]
    results: dict[str, Any] = {"moves": moves, "backends": {}}
    started = time.monotonic()
    for backend in backends:
        results["backends"][backend] = run_backend(
            backend, moves, args.rate, args.udp_timeout, args.keep_logs, args.profile
        )
    results["wall_seconds"] = time.monotonic() - started
    results["pid"] = os.getpid()
    path = write_results("failover" + ("-quick" if args.quick else ""), results, info)
    print(render_report(results))
    print(f"\n({results['wall_seconds']:.0f} s; results in {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
