"""Which firewall backend fits this node: the one matching the iptables mode the node uses.

kube-proxy and kube-router program iptables either through the legacy kernel
interface (ip_tables) or through nf_tables (iptables-nft); a node agent that
works beside them must find out which, the way kube-proxy's image and
iptables-wrapper do: look at what the node's components have already
installed. We read the rule sets of both modes (``iptables-legacy-save``,
``iptables-nft-save`` and the ``ip6tables`` variants; this runs once at start,
so the binaries are fine) and decide with :func:`decide`, a pure function:

1. a hint chain (``KUBE-IPTABLES-HINT`` from kubelet/kube-proxy, or kubelet's
   ``KUBE-KUBELET-CANARY``) names the mode (nft checked first, as
   iptables-wrapper does);
2. otherwise the mode that alone holds ``KUBE-*`` chains (kube-proxy,
   kube-router's ``KUBE-ROUTER-*``);
3. otherwise the mode with more rules; a tie (e.g. no rules at all) goes to nft.

Legacy mode -> backend ``iptables`` (legacy tables, where those components'
rules are); nft mode -> backend ``nftables``. metaleg's own rules
(``METALEG-*`` chains of the iptables backend) are not counted, so a previous
run cannot vote for itself.

Reading the rule sets changes nothing: ``iptables-legacy-save`` lists only
tables that exist (it does not load ip_tables), ``iptables-nft-save`` only
lists.

The chosen backend must also be able to run on this kernel: :func:`choose_for_node`
probes it (throwaway objects, see the section below) and :func:`choose`, a pure
function, decides what to use when it cannot — possibly nothing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable
from typing import Literal

import msgspec

Mode = Literal["legacy", "nft"]
BackendName = Literal["iptables", "nftables"]

HINT_CHAINS = frozenset({"KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"})
KUBE_PREFIX = "KUBE-"
OWN_PREFIX = "METALEG-"
SAVE_TIMEOUT = 10.0

SAVE_COMMANDS: dict[Mode, tuple[str, ...]] = {
    "legacy": ("iptables-legacy-save", "ip6tables-legacy-save"),
    "nft": ("iptables-nft-save", "ip6tables-nft-save"),
}
BACKEND_OF_MODE: dict[Mode, BackendName] = {"legacy": "iptables", "nft": "nftables"}


class RuleSetCounts(msgspec.Struct, frozen=True):
    """What one ``*-save`` output holds (metaleg's own chains and rules left out)."""

    rules: int = 0
    chains: frozenset[str] = frozenset()


class ModeEvidence(msgspec.Struct, frozen=True):
    """Everything read from one mode (IPv4 and IPv6 together)."""

    mode: Mode
    rules: int = 0
    kube_chains: tuple[str, ...] = ()
    """Sorted ``KUBE-*`` chain names (hint chains included)."""
    hint: bool = False
    errors: tuple[str, ...] = ()
    """Commands that failed or are missing (their output, if any, still counts)."""

    def describe(self) -> str:
        kube = ", ".join(self.kube_chains[:5]) + (" ..." if len(self.kube_chains) > 5 else "")
        text = f"{self.mode}: {self.rules} rules, {len(self.kube_chains)} KUBE-* chains"
        if kube:
            text += f" ({kube})"
        if self.hint:
            text += ", hint chain"
        if self.errors:
            text += f", errors: {'; '.join(self.errors)}"
        return text


class Detection(msgspec.Struct, frozen=True):
    """The chosen backend and why."""

    backend: BackendName
    reason: str
    legacy: ModeEvidence
    nft: ModeEvidence

    def describe(self) -> str:
        """One line for the log: the choice, the rule, the evidence of both modes."""
        return (
            f"firewall backend {self.backend}: {self.reason} "
            f"[{self.legacy.describe()}] [{self.nft.describe()}]"
        )


def parse_save(text: str) -> RuleSetCounts:
    """Count the rules and collect the chain names of an ``iptables-save`` output.

    Lines: ``*table``, ``:CHAIN POLICY [p:b]``, ``-A CHAIN ...``, ``COMMIT``,
    comments. Rules in or jumping to metaleg's own chains are not counted.
    """
    rules = 0
    chains: set[str] = set()
    for line in text.splitlines():
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name and not name.startswith(OWN_PREFIX):
                chains.add(name)
        elif line.startswith("-A "):
            words = line.split()
            chain = words[1] if len(words) > 1 else ""
            target = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "-g")), "")
            if chain.startswith(OWN_PREFIX) or target.startswith(OWN_PREFIX):
                continue
            rules += 1
    return RuleSetCounts(rules, frozenset(chains))


def evidence(
    mode: Mode, outputs: Iterable[RuleSetCounts], errors: Iterable[str] = ()
) -> ModeEvidence:
    """Combine the parsed outputs (IPv4, IPv6) of one mode."""
    rules = 0
    chains: set[str] = set()
    for counts in outputs:
        rules += counts.rules
        chains |= counts.chains
    kube = tuple(sorted(c for c in chains if c.startswith(KUBE_PREFIX)))
    return ModeEvidence(mode, rules, kube, bool(chains & HINT_CHAINS), tuple(errors))


def decide(legacy: ModeEvidence, nft: ModeEvidence) -> Detection:
    """The backend for the evidence of both modes (see the module doc for the rules)."""

    def chosen(mode: Mode, reason: str) -> Detection:
        return Detection(BACKEND_OF_MODE[mode], reason, legacy, nft)

    if nft.hint:
        return chosen("nft", "hint chain in iptables-nft")
    if legacy.hint:
        return chosen("legacy", "hint chain in iptables-legacy")
    if legacy.kube_chains and not nft.kube_chains:
        return chosen("legacy", "KUBE-* chains only in iptables-legacy")
    if nft.kube_chains and not legacy.kube_chains:
        return chosen("nft", "KUBE-* chains only in iptables-nft")
    if legacy.rules > nft.rules:
        return chosen("legacy", f"more rules in iptables-legacy ({legacy.rules} > {nft.rules})")
    if nft.rules:
        return chosen(
            "nft", f"at least as many rules in iptables-nft ({nft.rules} >= {legacy.rules})"
        )
    return chosen("nft", "no iptables rules in either mode")


Runner = Callable[[str], str]
"""Runs one ``*-save`` command, returns its stdout; raises ``OSError`` (missing binary),
``subprocess.SubprocessError`` (failure, timeout)."""


def run_save(command: str) -> str:
    """Run ``command`` (no arguments) with a timeout; raise if it fails."""
    result = subprocess.run(
        [command], capture_output=True, text=True, timeout=SAVE_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode, command, result.stdout, result.stderr
        )
    return result.stdout


def gather(mode: Mode, run: Runner = run_save) -> ModeEvidence:
    """Read and parse both families of one mode; failures become evidence, not exceptions."""
    outputs: list[RuleSetCounts] = []
    errors: list[str] = []
    for command in SAVE_COMMANDS[mode]:
        try:
            outputs.append(parse_save(run(command)))
        except FileNotFoundError:
            errors.append(f"{command}: not installed")
        except subprocess.CalledProcessError as error:
            # Partial output (e.g. one unreadable table) still counts.
            outputs.append(parse_save(error.stdout or ""))
            detail = (error.stderr or "").strip().splitlines()
            errors.append(f"{command}: exit {error.returncode}: {detail[0] if detail else ''}")
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(f"{command}: {error}")
    return evidence(mode, outputs, errors)


def detect_backend(run: Runner = run_save) -> Detection:
    """Look at the node's iptables rules (both modes, both families) and choose a backend."""
    return decide(gather("legacy", run), gather("nft", run))


# --- can this kernel run a backend at all? -----------------------------------------------
#
# A kernel without nf_tables (or a container without libnftables) cannot run the
# nftables backend; one without legacy ip_tables or ip_set cannot run the iptables
# backend. :func:`probe_kernel` finds out by doing what each backend needs, with
# throwaway objects deleted at once; :func:`choose` decides with the detection
# (a pure function, tested by table). The kernel loads the modules on the first
# request if it can (nfnetlink and ip_tables ask for them); a node that needs a
# manual ``modprobe`` shows the probe's error.


class KernelSupport(msgspec.Struct, frozen=True):
    """Which backends this kernel (and this image) can run, and why not."""

    nftables: bool
    iptables: bool
    nftables_error: str = ""
    iptables_error: str = ""

    def error(self, backend: BackendName) -> str:
        return self.nftables_error if backend == "nftables" else self.iptables_error

    def usable(self, backend: BackendName) -> bool:
        return self.nftables if backend == "nftables" else self.iptables


class Choice(msgspec.Struct, frozen=True):
    """The backend to run (None: none can run here) and why."""

    backend: BackendName | None
    reason: str


_NEEDS: dict[BackendName, str] = {
    "nftables": "nf_tables",
    "iptables": "legacy ip_tables and ip_set",
}


def strong_evidence(detection: Detection) -> bool:
    """The node's components were seen in one mode (a hint chain, or ``KUBE-*`` chains in
    one mode only): the other backend would leave their masquerade in effect."""
    legacy, nft = detection.legacy, detection.nft
    return legacy.hint or nft.hint or bool(legacy.kube_chains) != bool(nft.kube_chains)


def choose(configured: str, detection: Detection | None, support: KernelSupport) -> Choice:
    """The backend for FIREWALL_BACKEND ``configured``, the node's ``detection`` (for
    ``auto``) and what the kernel supports.

    A forced backend is used if it can run, else none. ``auto``: the detected backend
    if it can run; else the other one only when the detection rests on rule counts
    alone (no component of the node was seen in the detected mode — e.g. no rules at
    all on a kernel without nf_tables); else none.
    """
    if configured in ("iptables", "nftables"):
        forced: BackendName = "iptables" if configured == "iptables" else "nftables"
        if support.usable(forced):
            return Choice(forced, "set by FIREWALL_BACKEND")
        return Choice(
            None,
            f"FIREWALL_BACKEND={forced}, but {_NEEDS[forced]} cannot be used on this node: "
            f"{support.error(forced)}",
        )
    assert detection is not None, "auto needs the detection"
    detected = detection.backend
    other: BackendName = "iptables" if detected == "nftables" else "nftables"
    if support.usable(detected):
        return Choice(detected, detection.describe())
    unusable = f"{_NEEDS[detected]} cannot be used on this node ({support.error(detected)})"
    if strong_evidence(detection):
        return Choice(
            None,
            f"the node's components use the {detected} backend's mode ({detection.reason}), "
            f"but {unusable}",
        )
    if support.usable(other):
        return Choice(other, f"{detection.reason}, but {unusable}: using {other}")
    return Choice(
        None,
        f"no usable firewall backend: {_NEEDS[detected]}: {support.error(detected)}; "
        f"{_NEEDS[other]}: {support.error(other)}",
    )


def probe_nftables() -> str:
    """ "" if nf_tables works here (a throwaway table with a nat chain, added and deleted
    in one transaction), else the error."""
    try:
        from metaleg.firewall.nftables.libnftables import Nft

        table = f"metaleg_probe_{os.getpid()}"
        with Nft() as nft:
            nft.run(
                f"add table inet {table}\n"
                f"add chain inet {table} probe {{ type nat hook postrouting priority 100; }}\n"
                f"delete table inet {table}\n"
            )
    except Exception as error:
        return _one_line(error)
    return ""


def probe_iptables(run: Callable[[list[str]], None] | None = None) -> str:
    """ "" if legacy ip_tables (the nat, mangle and filter tables) and ip_set work here (a
    throwaway hash:ip set, created and destroyed), else the first error."""
    commands = [["iptables-legacy", "-w", "5", "-t", table, "-S"] for table in TABLES]
    try:
        for command in commands:
            (run or _run_quietly)(command)
    except Exception as error:
        return _one_line(error)
    try:
        from metaleg.firewall.wire.ipset import IpsetSocket

        name = f"metaleg-probe-{os.getpid()}"[:31]
        ipsets = IpsetSocket()
        try:
            failed = ipsets.run([ipsets.create(name, "hash:ip", 2), ipsets.destroy(name)])
        finally:
            ipsets.close()
        if failed:
            return f"ip_set: {failed[0].error}"
    except Exception as error:
        return f"ip_set: {_one_line(error)}"
    return ""


TABLES = ("nat", "mangle", "filter")


def _run_quietly(command: list[str]) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=SAVE_TIMEOUT, check=False
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(
            f"{' '.join(command)}: exit {result.returncode}: {detail[0] if detail else ''}"
        )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


PROBES: dict[BackendName, Callable[[], str]] = {
    "nftables": probe_nftables,
    "iptables": probe_iptables,
}


def support_of(errors: dict[BackendName, str]) -> KernelSupport:
    """The :class:`KernelSupport` of probe results (a backend not probed: not usable)."""
    return KernelSupport(
        nftables=errors.get("nftables", "not tried") == "",
        iptables=errors.get("iptables", "not tried") == "",
        nftables_error=errors.get("nftables", "not tried"),
        iptables_error=errors.get("iptables", "not tried"),
    )


def probe_kernel() -> KernelSupport:
    """Try both backends' kernel interfaces in the current network namespace."""
    return support_of({backend: probe() for backend, probe in PROBES.items()})


def choose_for_node(
    configured: str,
    detect: Callable[[], Detection] = detect_backend,
    probe: Callable[[BackendName], str] = lambda backend: PROBES[backend](),
) -> Choice:
    """Detect (for ``auto``), probe and :func:`choose`. Only what the choice needs is
    probed, after the detection has read the rule sets (a probe may create empty
    tables): the detected or forced backend, and the other one only when :func:`choose`
    could fall back to it."""
    detection = detect() if configured == "auto" else None
    if detection is None:
        first: BackendName = "iptables" if configured == "iptables" else "nftables"
    else:
        first = detection.backend
    errors = {first: probe(first)}
    if errors[first] and detection is not None and not strong_evidence(detection):
        other: BackendName = "iptables" if first == "nftables" else "nftables"
        errors[other] = probe(other)
    return choose(configured, detection, support_of(errors))
