"""The xtables helper process: makes iptables tables look like a plain-data description.

python-iptables (``iptc``) can serve only one address family per process: the
SNAT target (libxt_NAT) loads for the first family used and then fails for the
other one, and loading it again aborts the process. So the iptables backend
runs one long-lived helper per family (``python -m metaleg.firewall.iptables.helper
<4|6> <fd> <parent pid>``) and talks to it over a socket pair with msgspec-encoded messages:

* the parent sends a :class:`~metaleg.firewall.iptables.protocol.SyncRequest`
  ("make these tables look like this");
* the helper edits each table in one libiptc handle and commits it once (only
  if something differs) and answers with a
  :class:`~metaleg.firewall.iptables.protocol.SyncReply`.

This module is the helper's side (the messages are in
:mod:`metaleg.firewall.iptables.protocol`); ``iptc`` is imported only when the
server starts, so that a failure to load it is reported to the parent. The
helper exits when the pipe reaches EOF or its parent process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from metaleg.firewall.iptables.chain_diff import opcodes
from metaleg.firewall.iptables.codec import PartError, RuleCodec, create_target, option_values
from metaleg.firewall.iptables.protocol import (
    Mode,
    ReceivedRequest,
    ReceivedTable,
    SyncReply,
    SyncRequest,
    TableResult,
)
from metaleg.firewall.iptables.rules import (
    CHAIN_PREFIX,
    OPTIONAL_CHAINS,
    Rule,
    TableSpec,
)

_SKIP_CHAIN = ("nat", "POSTROUTING")
"""Where the mark skip rule lives (the only RETURN among metaleg's head rules)."""

_DECODED_LIMIT = 20_000
"""Encoded rules the helper keeps decoded (a few times the rules of 5000 Services)."""

DEFAULT_LOCK_PATH = "/run/xtables.lock"
"""The lock the iptables binaries take (``XTABLES_LOCKFILE`` overrides it)."""


class XtablesError(Exception):
    """A libiptc/libxtables operation failed; the message names table, chain and rule."""


def plain_error(error: BaseException) -> str:
    """An exception as one readable line (python-iptables puts ``b'...'`` in its messages)."""
    text = str(error) or type(error).__name__
    return re.sub(r"""b(['"])(.*?)\1""", r"\2", text)


def present_tables(family: int) -> set[str]:
    """The legacy tables that exist in this network namespace (without creating any)."""
    path = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
    try:
        with open(path) as names:
            return set(names.read().split())
    except FileNotFoundError:
        # The ip(6)_tables module is not loaded, so no legacy table exists.
        return set()


@contextlib.contextmanager
def xtables_lock(path: str, timeout: float) -> Iterator[None]:
    """Hold the lock the iptables binaries use, so that our commit and theirs
    (kube-router, kube-proxy) do not overwrite each other's table."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        # No writable /run (e.g. a read-only container root without the hostPath
        # mount): nobody else can take the lock either, so proceed without it.
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise XtablesError(
                        f"xtables lock {path}: still held by another process after {timeout:.0f}s"
                    ) from None
                # Short naps: the other family's helper holds it for milliseconds.
                time.sleep(0.001)
        yield
    finally:
        os.close(descriptor)  # also releases the lock


RuleKey = tuple[Any, ...]


class XtablesServer:
    """Edits the legacy tables of one address family with python-iptables."""

    def __init__(self, family: int, lock_path: str, lock_timeout: float = 30.0) -> None:
        import iptc

        self.family = family
        self._iptc = iptc
        self._table_class: Any = iptc.Table if family == 4 else iptc.Table6
        self._rule_class: Any = iptc.Rule if family == 4 else iptc.Rule6
        self._lock_path = lock_path
        self._lock_timeout = lock_timeout
        # python-iptables decides whether a target names a chain by opening every
        # table it believes available, which would create the raw and security
        # tables in the namespace. Our rules never need that lookup (jumps are
        # built as standard targets), so mark every table as unavailable for it.
        for name in self._table_class.ALL:
            self._table_class.existing_table_names[name] = False
        blank = self._rule_class()
        self._blank_fields = self._entry_fields(blank)
        self._match_base = ctypes.sizeof(iptc.xtables.xt_entry_match)
        self._target_base = ctypes.sizeof(iptc.xtables.xt_entry_target)
        self._codec = RuleCodec(self._rule_class)
        self._prebuilt: dict[str, tuple[list[bytes], list[RuleKey]]] = {}
        self._decoded: dict[bytes, Rule] = {}
        """Rules received encoded, by their bytes (see :class:`ReceivedTable`)."""
        self._heads: dict[Rule, Any] = {}
        """Built head rules (jumps and the mark skip: no sets, so they never go stale)."""

    # -- requests ---------------------------------------------------------

    def sync(self, request: SyncRequest | ReceivedRequest) -> SyncReply:
        """Apply one request; raises :class:`XtablesError` naming the failing object."""
        if request.collect_garbage and request.mode is not Mode.EXACT:
            raise XtablesError("garbage collection needs mode exact")
        self._codec.start_request(request.set_generation)
        # Build every desired rule before taking the xtables lock (the other
        # family's helper waits for it meanwhile); an invalid rule fails here,
        # before anything is touched.
        self._prebuilt = {
            context: self._build_entries(context, rules)
            for spec in request.tables
            for chain_name, rules in spec.chains.items()
            for context in (f"table {spec.name} chain {chain_name}",)
        }
        results = [
            self._sync_table(spec, request.mode, request.collect_garbage) for spec in request.tables
        ]
        if request.collect_garbage:
            named = {spec.name for spec in request.tables}
            for name in sorted(present_tables(self.family) - named):
                results.append(self._sync_table(TableSpec(name=name), Mode.EXACT, True))
        return SyncReply(results=tuple(results))

    # -- one table --------------------------------------------------------

    def _sync_table(
        self, spec: TableSpec | ReceivedTable, mode: Mode, collect_garbage: bool
    ) -> TableResult:
        with xtables_lock(self._lock_path, self._lock_timeout):
            table = self._open(spec.name)
            try:
                changed, exact = self._edit_table(table, spec, mode, collect_garbage)
                if changed:
                    try:
                        table.commit()
                    except Exception as error:
                        raise XtablesError(
                            f"table {spec.name}: commit failed: {plain_error(error)}"
                        ) from error
            finally:
                # Drop the handle (uncommitted edits included) so that the next
                # request starts from the kernel's current table.
                with contextlib.suppress(Exception):
                    table.close()
        return TableResult(name=spec.name, committed=changed, exact=exact)

    def _open(self, name: str) -> Any:
        try:
            table = self._table_class(name, autocommit=False)
            table.autocommit = False
            table.refresh()
        except Exception as error:
            raise XtablesError(f"table {name}: cannot open: {plain_error(error)}") from error
        return table

    def _edit_table(
        self, table: Any, spec: TableSpec | ReceivedTable, mode: Mode, collect_garbage: bool
    ) -> tuple[bool, bool]:
        changed = False
        exact = True
        existing = [chain.name for chain in table.chains]
        builtin = [name for name in existing if table.builtin_chain(name)]
        # Every chain first: a rule may jump to one of the others (libiptc resolves a
        # jump when the rule is inserted).
        for chain_name in spec.chains:
            if chain_name not in existing:
                try:
                    table.create_chain(chain_name)
                except Exception as error:
                    raise XtablesError(
                        f"table {spec.name} chain {chain_name}: cannot create: {plain_error(error)}"
                    ) from error
                changed = True
        for chain_name, rules in spec.chains.items():
            context = f"table {spec.name} chain {chain_name}"
            chain_changed, chain_exact = self._sync_chain(table, context, chain_name, rules, mode)
            changed |= chain_changed
            exact &= chain_exact
        for chain_name in builtin:
            context = f"table {spec.name} chain {chain_name}"
            head = spec.heads.get(chain_name, ())
            head_changed, head_exact = self._sync_head(table, context, chain_name, head, mode)
            changed |= head_changed
            exact &= head_exact
        unknown = set(spec.heads) - set(builtin)
        if unknown:
            raise XtablesError(f"table {spec.name}: no built-in chain {', '.join(sorted(unknown))}")
        stale = [
            name
            for name in existing
            if name.startswith(CHAIN_PREFIX) and name not in spec.chains and name not in builtin
        ]
        if stale and collect_garbage:
            # Built-in chains lose their jumps to stale chains above (they are
            # metaleg rules without a place in the heads) and metaleg's own chains
            # were just rewritten; only other components' chains are left to check.
            foreign = [
                name
                for name in existing
                if name not in stale and name not in builtin and name not in spec.chains
            ]
            self._delete_chains(table, spec.name, stale, foreign)
            changed = True
        elif stale:
            # Chains of this version that come and go with the state: gone for good once
            # the final (exact) rules no longer jump to them. Others wait for a re-sync.
            dropped = [name for name in stale if name in OPTIONAL_CHAINS and mode is Mode.EXACT]
            if dropped:
                self._delete_chains(table, spec.name, dropped, [])
                changed = True
            exact = len(dropped) == len(stale)
        return changed, exact

    def _sync_chain(
        self,
        table: Any,
        context: str,
        chain_name: str,
        rules: Sequence[Rule | msgspec.Raw],
        mode: Mode,
    ) -> tuple[bool, bool]:
        """Make one of metaleg's chains hold ``rules`` (plus, in KEEP_OLD mode, the rules it had).

        Rules are compared as raw entries (:mod:`metaleg.firewall.iptables.codec`):
        desired ones assembled from cached parts, the kernel's read without
        building python-iptables objects for them.
        """
        prebuilt = self._prebuilt.get(context)
        desired, desired_keys = prebuilt if prebuilt else self._build_entries(context, rules)
        try:
            entries = (
                self._codec.read_chain(table, chain_name) if table.is_chain(chain_name) else []
            )
        except Exception as error:
            raise XtablesError(f"{context}: cannot read rules: {plain_error(error)}") from error
        actual = [raw for raw, _ in entries]
        actual_keys = [key for _, key in entries]
        target_rules: list[bytes] = list(desired)
        target_keys = list(desired_keys)
        exact = True
        if mode is Mode.KEEP_OLD:
            # Keep rules that are going away until the final commit, so that
            # traffic stays covered while other tables change, in their place:
            # walk the difference and keep each unwanted rule where it was.
            wanted = set(desired_keys)
            target_rules, target_keys = [], []
            for tag, i1, i2, j1, j2 in opcodes(actual_keys, desired_keys):
                target_rules += desired[j1:j2]
                target_keys += desired_keys[j1:j2]
                if tag == "equal":
                    continue
                for raw, key in zip(actual[i1:i2], actual_keys[i1:i2], strict=True):
                    if key not in wanted:
                        target_rules.append(raw)
                        target_keys.append(key)
                        exact = False
        if actual_keys == target_keys:
            return False, exact
        self._rewrite(table, context, chain_name, actual_keys, target_rules, target_keys)
        return True, exact

    def _build_entries(
        self, context: str, rules: Sequence[Rule | msgspec.Raw]
    ) -> tuple[list[bytes], list[RuleKey]]:
        """Entry buffers and keys of ``rules`` (:class:`~metaleg.firewall.iptables.codec.RuleCodec`),
        given as structs or still encoded (decoded once per distinct encoding)."""
        desired: list[bytes] = []
        desired_keys: list[RuleKey] = []
        decoded = self._decoded
        if len(decoded) > _DECODED_LIMIT:
            decoded.clear()  # rules of Services long gone; what is still sent is decoded again
        for item in rules:
            if isinstance(item, msgspec.Raw):
                data = bytes(item)
                rule = decoded.get(data)
                if rule is None:
                    try:
                        rule = decoded[data] = msgspec.msgpack.decode(data, type=Rule)
                    except msgspec.DecodeError as error:
                        raise XtablesError(f"{context}: invalid rule: {error}") from error
            else:
                rule = item
            try:
                buffer, key = self._codec.build(rule)
            except PartError as error:
                raise XtablesError(
                    f"{context}: invalid rule '{rule}': {plain_error(error)}"
                ) from error
            desired.append(buffer)
            desired_keys.append(key)
        return desired, desired_keys

    def _rewrite(
        self,
        table: Any,
        context: str,
        chain_name: str,
        actual_keys: list[RuleKey],
        target: list[bytes],
        target_keys: list[RuleKey],
    ) -> None:
        """Edit a chain from ``actual_keys`` to ``target`` inside the (uncommitted) handle.

        Unchanged rules stay in place (keeping their counters): the difference is
        applied as deletes (by position) and inserts, last position first so
        earlier positions stay valid. ``target`` holds entry buffers (copies:
        entries read from the handle point into memory that editing frees).
        """
        try:
            if len(set(actual_keys)) != len(actual_keys):
                # Duplicates: the difference is ambiguous; rebuild the chain.
                table.flush_entries(chain_name)
                for buffer in target:
                    table.append_entry(chain_name, _entry_buffer(buffer))
                return
            for tag, i1, i2, j1, j2 in reversed(opcodes(actual_keys, target_keys)):
                if tag == "equal":
                    continue
                for _ in range(i2 - i1):
                    self._delete_at(table, chain_name, i1)
                for offset, buffer in enumerate(target[j1:j2]):
                    table.insert_entry(chain_name, _entry_buffer(buffer), i1 + offset)
        except Exception as error:
            raise XtablesError(f"{context}: cannot update rules: {plain_error(error)}") from error

    def _delete_at(self, table: Any, chain_name: str, position: int) -> None:
        """Delete the rule at ``position`` (0-based) of a chain in the handle."""
        if table._iptc.iptc_delete_num_entry(chain_name.encode(), position, table._handle) != 1:
            raise XtablesError(
                f"can't delete entry {position} from chain {chain_name}: {table.strerror()}"
            )

    def _sync_head(
        self, table: Any, context: str, chain_name: str, head: Sequence[Rule], mode: Mode
    ) -> tuple[bool, bool]:
        """Put metaleg's ``head`` rules first in a built-in chain, and (EXACT) nowhere else."""
        desired = [self._build_head(context, rule) for rule in head]
        for spec, rule in zip(head, desired, strict=True):
            if not self._is_ours(table.name, chain_name, spec.target, rule):
                # It would never be found again and be inserted on every call.
                raise XtablesError(
                    f"{context}: rule '{spec}' cannot be one of metaleg's head rules"
                )
        desired_keys = [self._key(rule) for rule in desired]
        try:
            positions, ours = self._our_rules(table, chain_name)
            our_keys = [self._key(rule) for rule in ours]
        except Exception as error:
            raise XtablesError(f"{context}: cannot read rules: {plain_error(error)}") from error
        count = len(desired)
        in_place = positions[:count] == list(range(count)) and our_keys[:count] == desired_keys
        if in_place and len(ours) == count:
            return False, True
        if mode is Mode.KEEP_OLD and in_place:
            return False, False  # only extra rules of ours remain; EXACT removes them
        buffers = [(rule.rule, rule.mask) for rule in ours] if mode is Mode.EXACT else []
        try:
            for entry, mask in buffers:
                table.delete_entry(chain_name, entry, mask)
            for index, rule in enumerate(desired):
                table.insert_entry(chain_name, rule.rule, index)
        except Exception as error:
            raise XtablesError(
                f"{context}: cannot update metaleg rules: {plain_error(error)}"
            ) from error
        return True, mode is Mode.EXACT or not ours

    def _our_rules(self, table: Any, chain_name: str) -> tuple[list[int], list[Any]]:
        """Positions and rules of metaleg's rules in a built-in chain.

        Ours are jumps to ``METALEG-*`` chains and, in nat POSTROUTING, the mark
        skip ``-m mark ! --mark 0x0/<any mask> -j RETURN`` (any mask, so that the
        rule of a former FIREWALL_MASK is found too). Only these entries are
        decoded; other components' rules are just walked past.
        """
        positions: list[int] = []
        ours: list[Any] = []
        chain = self._iptc.Chain(table, chain_name)
        entry = table.first_rule(chain_name)
        index = 0
        while entry:
            target = table.get_target(entry)
            name = target.decode() if isinstance(target, bytes) else str(target or "")
            if name.startswith(CHAIN_PREFIX) or (
                name == "RETURN" and (table.name, chain_name) == _SKIP_CHAIN
            ):
                rule = table.create_rule(entry, chain)
                if self._is_ours(table.name, chain_name, name, rule):
                    positions.append(index)
                    ours.append(rule)
            entry = table.next_rule(entry)
            index += 1
        return positions, ours

    def _is_ours(self, table_name: str, chain_name: str, target: str, rule: Any) -> bool:
        """Whether a rule in a built-in chain is metaleg's (see :meth:`_our_rules`)."""
        if target.startswith(CHAIN_PREFIX):
            return True
        return (
            target == "RETURN"
            and (table_name, chain_name) == _SKIP_CHAIN
            and self._is_mark_skip(rule)
        )

    def _is_mark_skip(self, rule: Any) -> bool:
        if self._entry_fields(rule) != self._blank_fields:
            return False
        matches = rule.matches
        if len(matches) != 1 or matches[0].name != "mark":
            return False
        values = matches[0].get_all_parameters().get("mark", [])
        return len(values) == 2 and values[0] == "!" and values[1].startswith("0x0/")

    def _delete_chains(
        self, table: Any, table_name: str, stale: list[str], others: list[str]
    ) -> None:
        """Delete leftover ``METALEG-*`` chains and every rule that still jumps to them."""
        for name in stale:
            try:
                table.flush_entries(name)
            except Exception as error:
                raise XtablesError(
                    f"table {table_name} chain {name}: cannot flush: {plain_error(error)}"
                ) from error
        doomed = set(stale)
        for name in others:
            chain = self._iptc.Chain(table, name)
            try:
                # Walk entries by target name; decode (and copy) only the jumps to delete.
                references = []
                entry = table.first_rule(name)
                while entry:
                    target = table.get_target(entry)
                    if isinstance(target, bytes) and target.decode() in doomed:
                        rule = table.create_rule(entry, chain)
                        references.append((rule.rule, rule.mask))
                    entry = table.next_rule(entry)
                for buffer, mask in references:
                    table.delete_entry(name, buffer, mask)
            except Exception as error:
                raise XtablesError(
                    f"table {table_name} chain {name}: cannot delete jumps to stale chains: "
                    f"{plain_error(error)}"
                ) from error
        for name in stale:
            try:
                table.delete_chain(name)
            except Exception as error:
                raise XtablesError(
                    f"table {table_name} chain {name}: cannot delete: {plain_error(error)}"
                ) from error

    # -- rules ------------------------------------------------------------

    def _build_head(self, context: str, spec: Rule) -> Any:
        """:meth:`_build`, cached: head rules reference no sets, so they never go stale."""
        rule = self._heads.get(spec)
        if rule is None:
            rule = self._heads[spec] = self._build(context, spec)
        return rule

    def _build(self, context: str, spec: Rule) -> Any:
        """A python-iptables rule for ``spec``, checked like iptables would before appending."""
        try:
            rule = self._rule_class()
            for match_spec in spec.matches:
                match = rule.create_match(match_spec.name)
                for option in match_spec.options:
                    match.set_parameter(option.name, option_values(option))
            create_target(rule, spec)
            rule.final_check()
        except Exception as error:
            raise XtablesError(f"{context}: invalid rule '{spec}': {plain_error(error)}") from error
        return rule

    def _entry_fields(self, rule: Any) -> tuple[Any, ...]:
        """Addresses, protocol and interfaces of a rule (metaleg's rules leave them unset)."""
        fields = (rule.src, rule.dst, rule.protocol, rule.in_interface, rule.out_interface)
        # Only the IPv4 entry has a fragment flag (python-iptables' Rule6 lacks it).
        return (*fields, rule.fragment) if self.family == 4 else fields

    def _key(self, rule: Any) -> RuleKey:
        """A hashable identity of a rule: what iptables compares, not counters or offsets.

        Mirrors ``iptc.Rule.__eq__`` (entry fields, each match's user data, the
        target's user data or, for standard targets, the verdict/chain name), but
        hashable so that whole chains compare and diff in linear time.
        """
        matches = tuple(
            (
                match.name,
                int(match.match.u.user.revision),
                bytes(match.match_buf[self._match_base : match.usersize]),
            )
            for match in rule.matches
        )
        target = rule.target
        # python-iptables keeps the libxtables module as a private attribute; the
        # standard target (verdicts and jumps) is the one named "standard". Its
        # data is a kernel offset, so it is compared by the verdict/chain name.
        if target._module.name == b"standard":
            target_key: tuple[Any, ...] = (target.name, bool(target.goto))
        else:
            raw = ctypes.string_at(ctypes.addressof(target.target), target.usersize)
            target_key = (target.name, int(target.target.u.user.revision), raw[self._target_base :])
        return (self._entry_fields(rule), matches, target_key)


def _entry_buffer(data: bytes) -> Any:
    """A C buffer holding one entry, for libiptc's insert/append (which copy it)."""
    return ctypes.create_string_buffer(data, len(data))


def serve(connection: Connection, server: XtablesServer, parent: int) -> None:
    """Answer requests until EOF on the pipe or until the parent process is gone."""
    while True:
        if not connection.poll(1.0):
            if os.getppid() != parent:
                return  # re-parented: the backend process died without closing the pipe
            continue
        try:
            data = connection.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            request = msgspec.msgpack.decode(data, type=ReceivedRequest)
            reply = server.sync(request)
        except Exception as error:  # reported to the parent, which raises BackendError
            reply = SyncReply(error=plain_error(error))
        try:
            connection.send_bytes(msgspec.msgpack.encode(reply))
        except OSError as error:
            if error.errno in (errno.EPIPE, errno.ECONNRESET):
                return
            raise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m metaleg.firewall.iptables.helper <4|6> <fd> <parent pid>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in ("4", "6"):
        print(
            "usage: python -m metaleg.firewall.iptables.helper <4|6> <fd> <parent pid>",
            file=sys.stderr,
        )
        return 2
    family, descriptor, parent = int(args[0]), int(args[1]), int(args[2])
    # Ctrl-C in a terminal reaches the whole process group; the backend decides
    # when this helper ends (by closing the pipe), never the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection = Connection(descriptor)
    if os.getppid() != parent:
        return 1  # the backend died before we even started
    lock_path = os.environ.get("XTABLES_LOCKFILE", DEFAULT_LOCK_PATH)
    try:
        server = XtablesServer(family, lock_path)
    except Exception as error:
        # Answer the first request with the reason, so the backend can report it.
        with contextlib.suppress(Exception):
            connection.recv_bytes()
            connection.send_bytes(
                msgspec.msgpack.encode(
                    SyncReply(error=f"cannot load python-iptables: {plain_error(error)}")
                )
            )
        return 1
    serve(connection, server, parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
