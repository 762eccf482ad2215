"""The rules metaleg writes, as plain data: rules, tables, and the names of chains and sets.

:class:`Rule` (with its :class:`Match` and :class:`Option` parts) describes one
iptables rule the way ``iptables-save`` writes it, without addresses or
interfaces; :class:`TableSpec` is metaleg's part of one table. The functions
below build every rule metaleg uses (see :mod:`metaleg.firewall.iptables.backend`
for where each goes). The chain and set names are the Go original's, so that
an upgrade finds and cleans up its leftovers.
"""

from __future__ import annotations

import hashlib

import msgspec

from metaleg.model import Family

CHAIN_PREFIX = "METALEG-"
"""Every chain (and ipset) metaleg owns starts with this; garbage collection relies on it."""

VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})
"""Targets that are verdicts of the standard target rather than extensions."""

MARK_CHAIN = "METALEG-RT-MARK"
SNAT_CHAIN = "METALEG-SNAT"
REJECT_CHAIN = "METALEG-REJECT"
UNCOVERED_CHAIN = "METALEG-UNCOVERED"
"""filter: where traffic a destination policy does not cover goes (``-g``) from
``METALEG-REJECT``: only the transit guard's REJECT, as for an unlabelled pod."""
STRAY_CHAIN = "METALEG-STRAY"
"""filter: the stray reply DROP of a family with destination policies, after RETURNs for
the peers a policy does not cover."""
OPTIONAL_CHAINS = frozenset({UNCOVERED_CHAIN, STRAY_CHAIN})
"""Chains that exist only while the state needs them (a family with destination policies):
the helper deletes them when the final rules of a change no longer name them."""

_REJECT_WITH = {Family.IPV4: "icmp-port-unreachable", Family.IPV6: "icmp6-port-unreachable"}


class Option(msgspec.Struct, frozen=True, array_like=True):
    """One ``[!] --name value...`` option of a match or target."""

    name: str
    values: tuple[str, ...] = ()
    invert: bool = False

    def __str__(self) -> str:
        text = " ".join((f"--{self.name}", *self.values))
        return f"! {text}" if self.invert else text


class Match(msgspec.Struct, frozen=True, array_like=True):
    """A match extension (``-m name options``)."""

    name: str
    options: tuple[Option, ...] = ()

    def __str__(self) -> str:
        return " ".join((f"-m {self.name}", *(str(option) for option in self.options)))


class Rule(msgspec.Struct, frozen=True, array_like=True):
    """One iptables rule without addresses or interfaces: matches and a target.

    ``target`` is an extension (``MARK``, ``SNAT``, ``REJECT``), a verdict
    (``RETURN``) or the name of a chain to jump to (``goto``: ``-g``, the chain's end
    returns from the calling chain too). ``str(rule)`` is the rule in
    ``iptables-save`` syntax (without ``-A <chain>``).
    """

    target: str
    matches: tuple[Match, ...] = ()
    target_options: tuple[Option, ...] = ()
    goto: bool = False

    def __str__(self) -> str:
        parts = [str(match) for match in self.matches]
        parts.append(f"-g {self.target}" if self.goto else f"-j {self.target}")
        parts.extend(str(option) for option in self.target_options)
        return " ".join(parts)


class TableSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The desired metaleg part of one table.

    ``chains`` are metaleg's own chains with their complete contents. ``heads``
    are metaleg's rules at the top of built-in chains; built-in chains not listed
    must hold none of metaleg's rules. A head rule must be one the helper can
    recognise as metaleg's in the kernel: a jump to a ``METALEG-*`` chain or, in
    nat POSTROUTING, the mark skip ``-m mark ! --mark 0x0/<mask> -j RETURN``.
    """

    name: str
    chains: dict[str, tuple[Rule, ...]] = {}
    heads: dict[str, tuple[Rule, ...]] = {}


def exclude_set_name(family: Family) -> str:
    """The ``hash:net`` set of destinations that are never marked, SNATed or rejected."""
    return f"METALEG-EXCLUDE-DST-{int(family)}"


def transit_set_name(family: Family) -> str:
    """The ``hash:net`` set of the transit guard's sources (other nodes' pods)."""
    return f"METALEG-TRANSIT-{int(family)}"


def snatted_set_name(family: Family) -> str:
    """The ``hash:ip`` set of every SNAT Service's sources: the transit guard's exception
    for them, their reply leak and stray reply DROPs (one rule each for all Services)."""
    return f"METALEG-SNATTED-{int(family)}"


def rejected_set_name(family: Family) -> str:
    """The ``hash:ip`` set of every REJECT Service's sources (its REJECT and stray reply
    rules)."""
    return f"METALEG-REJECTED-{int(family)}"


def source_set_name(family: Family, namespace: str, name: str) -> str:
    """The ``hash:ip`` set of one Service's source IPs in one family.

    Derived from family and ``namespace/name`` only (not the action), so a
    Service changing between SNAT and REJECT keeps its set; a hash keeps
    it within ipset's 31 characters whatever the names' length.
    """
    digest = hashlib.sha256(f"{int(family)}/{namespace}/{name}".encode()).hexdigest()
    return f"METALEG-SRC-{int(family)}-{digest[:12]}"


def _set_match(set_name: str, direction: str, *, invert: bool = False) -> Match:
    return Match("set", (Option("match-set", (set_name, direction), invert=invert),))


NO_COUNTING = Option("update-counters", invert=True)
"""``! --update-counters``: this lookup leaves the set members' counters alone. The shared
SNAT, REJECT and mark sets count only the lookups of the rules that treat their members'
traffic (:func:`reply_leak_rule`, :func:`reject_rule`, :func:`mark_map_rule`)."""


def _uncounted_set_match(set_name: str, direction: str) -> Match:
    return Match("set", (Option("match-set", (set_name, direction)), NO_COUNTING))


def exclude_rule(family: Family) -> Rule:
    """``-m set --match-set METALEG-EXCLUDE-DST-<f> dst -j RETURN``."""
    return Rule("RETURN", (_set_match(exclude_set_name(family), "dst"),))


def mark_skip_rule(fwmask: int) -> Rule:
    """``-m mark ! --mark 0x0/<mask> -j RETURN``: marked packets skip the node's masquerade."""
    return Rule("RETURN", (Match("mark", (Option("mark", (f"0x0/{fwmask:#x}",), invert=True),)),))


def jump_rule(chain: str) -> Rule:
    """``-j <chain>``."""
    return Rule(chain)


def mark_map_rule(family: Family) -> Rule:
    """``-j SET --map-set METALEG-MARK-<f> src --map-mark``: the one MARK rule of a family.

    Each member of the ``hash:ip skbinfo`` set carries its mark as ``skbmark
    <mark>/<mask>``; the kernel applies it like ``MARK --set-xmark <mark>/<mask>``
    (``mark = (mark & ~mask) ^ value``: only FIREWALL_MASK bits change).
    """
    return Rule("SET", (), (Option("map-set", (mark_set_name(family), "src")), Option("map-mark")))


def mark_set_name(family: Family) -> str:
    """The ``hash:ip skbinfo`` set of every marked source of a family, with its mark."""
    return f"METALEG-MARK-{int(family)}"


def snat_rule(set_name: str, snat_ip: str) -> Rule:
    """``-m set --match-set <src> src -j SNAT --to-source <ip>``."""
    return Rule("SNAT", (_set_match(set_name, "src"),), (Option("to-source", (snat_ip,)),))


def reject_rule(set_name: str, family: Family) -> Rule:
    """``-m set --match-set <src> src -j REJECT --reject-with icmp(6)-port-unreachable``."""
    return Rule(
        "REJECT", (_set_match(set_name, "src"),), (Option("reject-with", (_REJECT_WITH[family],)),)
    )


def source_return_rule(set_name: str) -> Rule:
    """``-m set --match-set <src> src ! --update-counters -j RETURN``: a transit guard
    exception (SNATed here; the SNATed set's counters count its traffic once, in
    :func:`reply_leak_rule`)."""
    return Rule("RETURN", (_uncounted_set_match(set_name, "src"),))


def stale_binding_rule(set_name: str, snat_ip: str, fwmask: int) -> Rule:
    """``-m set --match-set <src> src -m mark --mark 0x0/<mask> -m conntrack ! --ctrepldst
    <LB IP> --ctstatus CONFIRMED --ctdir ORIGINAL -j DROP``, in ``METALEG-REJECT`` for every
    SNAT Service.

    NAT is bound once per connection: a flow of a source this node SNATs whose conntrack
    entry already exists with another binding (none at all, from when the source was marked
    towards another gateway, the node's masquerade, or an old LB IP) would leave with the
    pod's or the node's IP in the moment between the commit and the conntrack flush that
    follows it (:mod:`metaleg.firewall.selection`). Drop it: fail closed. The reply
    destination of a correctly SNATed flow is the LB IP. The conditions:

    * ``--ctstatus CONFIRMED``: the entry existed before this packet, so its binding is
      settled (a connection's first packet is bound later, in nat POSTROUTING). Not
      ``--ctstate ESTABLISHED``: packets of a one-way flow (UDP without an answer yet, a
      retransmitted SYN) stay NEW although their entry and its binding exist;
    * ``--ctdir ORIGINAL``: only the pod's own flows; the pod's answers in connections
      others open to it (ingress through the LB IP) have the peer as reply destination;
    * unmarked only (``--mark 0x0/<mask>``): a marked packet goes to another gateway with
      the pod IP, as it should; this also keeps a source whose MARK rule is still in place
      during a change (mangle loses it after filter gains this rule) working until then.
    """
    return Rule(
        "DROP",
        (
            _set_match(set_name, "src"),
            Match("mark", (Option("mark", (f"0x0/{fwmask:#x}",)),)),
            Match(
                "conntrack",
                (
                    Option("ctrepldst", (snat_ip,), invert=True),
                    Option("ctstatus", ("CONFIRMED",)),
                    Option("ctdir", ("ORIGINAL",)),
                ),
            ),
        ),
    )


def stray_reply_rule(set_name: str, family: Family, excluded: bool, policed: bool = False) -> Rule:
    """``-m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m set --match-set <src> dst !
    --update-counters [-m set ! --match-set METALEG-EXCLUDE-DST-<f> src] -j DROP``, at the head of
    ``METALEG-REJECT``; ``policed`` (the family has destination policies): ``-j METALEG-STRAY``
    instead, which RETURNs for the peers a policy does not cover and drops the rest.

    A *stray reply*: right after a gateway move the old gateway still translates a
    peer's answers back to the pod IP and forwards them to the pod's node; if that node
    has just deleted the flow's conntrack entry, such an answer would open a new entry
    with the peer as originator, the pod's packets would be replies in it (no NAT is
    decided for replies) and leave with the pod IP for as long as the flow lives.
    Dropped, the entry is never confirmed. Traffic into the Service (LB IP, NodePort,
    ClusterIP) is DNATed, and in-cluster peers are excluded, so neither is affected.
    Before the exclusion RETURN: the destination (a pod IP) is usually excluded.
    """
    matches = [
        Match("conntrack", (Option("ctstate", ("NEW",)),)),
        # ctstate's virtual state DNAT: the original destination is not the reply source.
        Match("conntrack", (Option("ctstate", ("DNAT",), invert=True),)),
        _uncounted_set_match(set_name, "dst"),
    ]
    if excluded:
        matches.append(_set_match(exclude_set_name(family), "src", invert=True))
    return Rule(STRAY_CHAIN if policed else "DROP", tuple(matches))


def reply_leak_rule(set_name: str) -> Rule:
    """``-m set --match-set <src> src -m conntrack ! --ctstate DNAT --ctdir REPLY -j DROP``,
    in ``METALEG-REJECT`` over the SNATed set (after the exclusion RETURN).

    A pod's answers in a connection opened *to* its pod IP (not DNATed) from outside the
    excluded networks leave un-NATed, with the pod IP: such entries come from before the
    source was ours or from a stray reply (:func:`stray_reply_rule`). Fail closed.
    """
    return Rule(
        "DROP",
        (
            _set_match(set_name, "src"),
            Match(
                "conntrack",
                (Option("ctstate", ("DNAT",), invert=True), Option("ctdir", ("REPLY",))),
            ),
        ),
    )


def transit_reject_rule(family: Family) -> Rule:
    """``-m conntrack --ctstate NEW -m set --match-set METALEG-TRANSIT-<f> src -j REJECT ...``."""
    return Rule(
        "REJECT",
        (
            Match("conntrack", (Option("ctstate", ("NEW",)),)),
            _set_match(transit_set_name(family), "src"),
        ),
        (Option("reject-with", (_REJECT_WITH[family],)),),
    )


def is_stale_binding(rule: Rule) -> bool:
    """Whether ``rule`` is a :func:`stale_binding_rule` (a DROP that allows one LB IP)."""
    return rule.target == "DROP" and any(
        option.name == "ctrepldst" for match in rule.matches for option in match.options
    )


# -- destination policies (see metaleg.firewall.iptables.policy) ----------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def policy_set_names(family: Family, networks: tuple[str, ...]) -> tuple[str, str]:
    """The sets of one destination policy class (its canonical networks): ``hash:ip``
    ``METALEG-DSTSRC-<f>-<12 hex>`` (the sources it polices) and ``hash:net``
    ``METALEG-DSTNET-<f>-<12 hex>`` (the networks)."""
    digest = _digest(f"{int(family)}/{','.join(networks)}")
    return f"METALEG-DSTSRC-{int(family)}-{digest}", f"METALEG-DSTNET-{int(family)}-{digest}"


def port_source_set_name(family: Family) -> str:
    """The ``hash:ip`` set of the sources a port policy polices."""
    return f"METALEG-PORTSRC-{int(family)}"


def port_set_name(family: Family) -> str:
    """The ``hash:ip,port`` set of every policed source's protocols and ports."""
    return f"METALEG-PORTS-{int(family)}"


def uncovered_rule(
    policed_set: str, covered_set: str, covered_direction: str, *, into: str, reply: bool = False
) -> Rule:
    """``-m set --match-set <policed> src -m set ! --match-set <covered> <direction> -j|-g
    <into>``: traffic of a policed source that its policy does not cover leaves metaleg's chain
    (``into`` RETURN, or ``-g`` :data:`UNCOVERED_CHAIN`).

    ``covered_direction`` is ``dst`` for a destination class's networks, ``src,dst`` for the
    ports set (source address, destination port). ``reply``: the same for a packet *to* the
    source (its source is the peer): every direction swapped (``dst`` and ``src``,
    ``dst,src``), for :data:`STRAY_CHAIN`.
    """
    policed_direction = "src"
    if reply:
        swap = {"src": "dst", "dst": "src"}
        policed_direction = "dst"
        covered_direction = ",".join(swap[part] for part in covered_direction.split(","))
    goto = into.startswith(CHAIN_PREFIX)
    return Rule(
        into,
        (
            _set_match(policed_set, policed_direction),
            _set_match(covered_set, covered_direction, invert=True),
        ),
        goto=goto,
    )


def drop_rule() -> Rule:
    """``-j DROP``: the end of :data:`STRAY_CHAIN`."""
    return Rule("DROP")
