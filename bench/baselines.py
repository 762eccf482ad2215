"""Baselines for :mod:`bench.apply_scale`: the same final kernel state, written other ways.

* :func:`original_method` — what the Go original does (see
  ``shared/design/reference-behaviour.md``, "Kernel objects", and its
  ``internal/utils/ipset`` / go-iptables): one ``ipset`` or ``iptables``
  **process per object**. Per set: ``ipset create`` and ``ipset list -o xml``
  (it reads the members before syncing them), then one ``ipset add`` per
  member; per chain: a check (``iptables -S <chain>``) and ``-N``; per rule:
  a check ``-C`` and then ``-A`` (built-in chains: ``-I <chain> <pos>``).
  Measured on an empty node, so every check finds nothing and every object is
  written.
* :func:`restore_limit` — what the kernel interfaces allow at best: one
  ``iptables-restore``, one ``ip6tables-restore`` and one ``ipset restore`` of
  the same chains, rules and sets.
* :func:`nft_limit` — one ``nft -f`` of the script the nftables backend itself
  sends for a full re-sync (the kernel and libnftables' share, without Python).

Everything is derived from :func:`metaleg.firewall.iptables.render.render`, so the
baselines follow the backend's layout (chains, rule order, set names) as it
changes. The legacy binaries (``iptables-legacy``) are used because the
iptables backend writes the legacy tables (python-iptables).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections import Counter
from typing import Any

from metaleg.firewall.iptables.render import FAMILIES, TABLES, DesiredFirewall, render
from metaleg.firewall.iptables.rules import TableSpec
from metaleg.model import Family, NodeDesiredState

IPTABLES = {Family.IPV4: "iptables-legacy", Family.IPV6: "ip6tables-legacy"}
RESTORE = {Family.IPV4: "iptables-legacy-restore", Family.IPV6: "ip6tables-legacy-restore"}
SAVE = {Family.IPV4: "iptables-legacy-save", Family.IPV6: "ip6tables-legacy-save"}
_IPSET_FAMILY = {Family.IPV4: "inet", Family.IPV6: "inet6"}
_ENV = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}


def _run(argv: list[str], *, check: bool = True, stdin: str | None = None) -> int:
    result = subprocess.run(
        argv,
        input=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_ENV,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ...: {result.stderr.strip()}")
    return result.returncode


def _ordered_sets(desired: DesiredFirewall) -> list[Any]:
    return [desired.sets[name] for name in sorted(desired.sets)]


# --- the original's method --------------------------------------------------------------------


def _original_table(family: Family, spec: TableSpec, counts: Counter[str]) -> None:
    tool = IPTABLES[family]
    table = ["-w", "-t", spec.name]
    for chain in spec.chains:
        # go-iptables ChainExists lists the chain; then NewChain.
        exists = _run([tool, *table, "-S", chain], check=False) == 0
        counts["iptables"] += 1
        if not exists:
            _run([tool, *table, "-N", chain])
            counts["iptables"] += 1
    # The check's answer is not used: on an empty node every rule is missing, and
    # ip6tables-legacy 1.8.9 answers -C wrongly for `-m set` rules (it reports a rule
    # with another set and another mark as present), which would leave rules out.
    for chain, rules in spec.chains.items():
        for rule in rules:
            words = str(rule).split()
            _run([tool, *table, "-C", chain, *words], check=False)
            _run([tool, *table, "-A", chain, *words])
            counts["iptables"] += 2
    for chain, rules in spec.heads.items():
        for position, rule in enumerate(rules, start=1):
            words = str(rule).split()
            _run([tool, *table, "-C", chain, *words], check=False)
            _run([tool, *table, "-I", chain, str(position), *words])
            counts["iptables"] += 2


def original_method(state: NodeDesiredState) -> dict[str, Any]:
    """Write ``state`` (iptables layout) one process per object; run inside a fresh namespace.

    Returns the seconds taken and the number of processes per tool.
    """
    desired = render(state)
    counts: Counter[str] = Counter()
    started = time.perf_counter()
    for spec in _ordered_sets(desired):
        kind = _IPSET_FAMILY[spec.family]
        # "already exists" would be fine, as in the original: no check of the status.
        # (kind may carry options, e.g. "hash:ip skbinfo"; members too: "<ip> skbmark <m>/<mask>")
        _run(["ipset", "create", spec.name, *spec.kind.split(), "family", kind], check=False)
        _run(["ipset", "list", "-o", "xml", spec.name])
        counts["ipset"] += 2
        for member in sorted(spec.members):
            _run(["ipset", "add", spec.name, *member.split()])
            counts["ipset"] += 1
    ipset_seconds = time.perf_counter() - started
    for family in FAMILIES:
        for name in TABLES:
            _original_table(family, desired.tables[family][name], counts)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "ipset_seconds": ipset_seconds,
        "iptables_seconds": seconds - ipset_seconds,
        "processes": dict(counts),
        "rules": rule_count(desired),
        "members": sum(len(s.members) for s in desired.sets.values()),
        "sets": len(desired.sets),
    }


def rule_count(desired: DesiredFirewall) -> int:
    return sum(
        len(rules)
        for family in FAMILIES
        for spec in desired.tables[family].values()
        for group in (spec.chains, spec.heads)
        for rules in group.values()
    )


# --- the single-transaction limit -------------------------------------------------------------


def restore_text(family: Family, desired: DesiredFirewall) -> str:
    """``iptables-restore --noflush`` input for metaleg's chains and head rules of one family."""
    lines: list[str] = []
    for name in TABLES:
        spec = desired.tables[family][name]
        lines.append(f"*{name}")
        lines += [f":{chain} - [0:0]" for chain in spec.chains]
        for chain, rules in spec.chains.items():
            lines += [f"-A {chain} {rule}" for rule in rules]
        for chain, rules in spec.heads.items():
            lines += [f"-I {chain} {position} {rule}" for position, rule in enumerate(rules, 1)]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def ipset_restore_text(desired: DesiredFirewall) -> str:
    lines: list[str] = []
    for spec in _ordered_sets(desired):
        lines.append(f"create {spec.name} {spec.kind} family {_IPSET_FAMILY[spec.family]}")
        lines += [f"add {spec.name} {member}" for member in sorted(spec.members)]
    return "\n".join(lines) + "\n"


def restore_limit(state: NodeDesiredState) -> dict[str, Any]:
    """One ``ipset restore`` + one restore per family; run inside a fresh namespace.

    The input texts are prepared before the clock starts (they are data, not work).
    """
    desired = render(state)
    sets_text = ipset_restore_text(desired)
    texts = {family: restore_text(family, desired) for family in FAMILIES}
    started = time.perf_counter()
    _run(["ipset", "restore"], stdin=sets_text)
    ipset_seconds = time.perf_counter() - started
    for family in FAMILIES:
        _run([RESTORE[family], "-w", "--noflush"], stdin=texts[family])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "ipset_seconds": ipset_seconds, "processes": 3}


def nft_limit(state: NodeDesiredState) -> dict[str, Any]:
    """One ``nft -f`` of the nftables backend's full script; run inside a fresh namespace."""
    from metaleg.firewall.nftables.backend import NftablesBackend
    from metaleg.firewall.nftables.incremental import AppliedTable
    from metaleg.firewall.nftables.scripts import full_script

    backend = NftablesBackend()
    script = full_script(AppliedTable(state).content, state.fwmask, backend.reject_with)
    with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as file:
        file.write(script)
        path = file.name
    try:
        started = time.perf_counter()
        _run(["nft", "-f", path])
        seconds = time.perf_counter() - started
    finally:
        os.unlink(path)
    return {"seconds": seconds, "processes": 1, "script_lines": script.count("\n")}


# --- comparing final states -------------------------------------------------------------------


def iptables_fingerprint() -> dict[str, Any]:
    """The legacy tables and ipsets of the current namespace, normalised for comparison.

    Rules without counters, per family and table, in order; sets as name -> (type,
    family, sorted members). Run inside the namespace.
    """
    rules: dict[str, list[str]] = {}
    for family in FAMILIES:
        output = subprocess.run(
            [SAVE[family]], capture_output=True, text=True, check=True, env=_ENV
        ).stdout
        table = ""
        for line in output.splitlines():
            if line.startswith("*"):
                table = f"{int(family)}/{line[1:]}"
                rules[table] = []
            elif line.startswith(("-A", ":")) and table:
                rules[table].append(line.split(" [", 1)[0] if line.startswith(":") else line)
    sets: dict[str, list[str]] = {}
    output = subprocess.run(
        ["ipset", "save"], capture_output=True, text=True, check=True, env=_ENV
    ).stdout
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "create":
            sets[words[1]] = [" ".join(w for w in words[2:5])]
        elif len(words) >= 3 and words[0] == "add":
            sets[words[1]].append(words[2])
    return {
        "rules": rules,
        "sets": {name: [m[0], *sorted(m[1:])] for name, m in sorted(sets.items())},
    }
