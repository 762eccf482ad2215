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
"""

from __future__ import annotations

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
