"""Drift detection for the ``iptables`` backend: a cheap check twice a second.

Legacy iptables and ipsets send no notifications, so, like kube-proxy's canary
chains, the worker looks. What it compares (twice a second) is metaleg's part of the kernel as
it was right after metaleg's own last write (the *baseline*, taken by
:meth:`IptablesDriftCheck.rebaseline`):

* per family and table (mangle, nat, filter), read with the same ``getsockopt``
  calls iptables-legacy uses (``IPT_SO_GET_INFO``, ``IPT_SO_GET_ENTRIES``, no
  process started, no lock taken): the rules at the top of the built-in chains
  that are metaleg's (jumps to ``METALEG-*`` chains, nat's mark skip), which must
  stay in front of every other rule (``iptables_jump``), and the rules of every
  ``METALEG-*`` chain (``iptables_chain``). Rules are compared as the kernel
  holds them, without counters, a jump as the name of its chain. The table's
  size, entry count and chain offsets (``GET_INFO``, 84 bytes) are read every
  time; the rules only when those changed, and every :data:`FULL_EVERY` checks
  anyway (an in-place replacement of a rule by one of the same size changes
  neither);
* the ``METALEG-*`` ipsets: type and element count of each, from one header-only
  dump (``ipset``). A member replaced by another (same count) is left to the
  periodic re-sync.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import socket
import struct
from collections.abc import Callable, Iterator

from metaleg.backend import Drift
from metaleg.firewall.wire.ipset import (
    ATTR_DATA,
    ATTR_FLAGS,
    ATTR_PROTOCOL,
    ATTR_SETNAME,
    ATTR_TYPENAME,
    IpsetSocket,
    _u8,
)
from metaleg.firewall.wire.nfnetlink import NFGEN, attr, parse_attributes
from metaleg.model import Family

CHECK_INTERVAL = 0.5
"""Seconds between checks: drift is found within this, and repaired a re-sync later."""
FULL_EVERY = 20
"""Read the rules of an unchanged-looking table every this many checks (10 s)."""
PREFIX = b"METALEG-"
TABLE_HEADS = {"mangle": ("PREROUTING", 0), "nat": ("POSTROUTING", 4), "filter": ("FORWARD", 2)}
"""Per table, the built-in chain metaleg puts its jumps at the top of, and its hook number."""

SO_GET_INFO = 64
SO_GET_ENTRIES = 65
_LEVEL = {Family.IPV4: socket.IPPROTO_IP, Family.IPV6: socket.IPPROTO_IPV6}
_DOMAIN = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_INFO = struct.Struct("=32sI5I5III")  # name, valid_hooks, hook_entry, underflow, num_entries, size
_ENTRIES_HEADER = 40  # ipt_get_entries: name[32], size, padding (entries are 8-byte aligned)


class _Layout:
    """Where the fields of an ``ipt_entry`` / ``ip6t_entry`` are (x86_64 and friends)."""

    def __init__(self, ip_size: int, header: int) -> None:
        self.ip_size = ip_size
        """Size of the address part (ipt_ip / ip6t_ip6): compared as it is."""
        self.header = header
        """Size of the entry header: matches start here."""
        self.target_offset = ip_size + 4
        self.next_offset = ip_size + 6


_LAYOUT = {Family.IPV4: _Layout(84, 112), Family.IPV6: _Layout(136, 168)}
_STANDARD = b"\0" * 29
_ERROR = b"ERROR"
_XT_RETURN = -5  # -NF_REPEAT - 1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]


def _getsockopt(
    sock: socket.socket, level: int, option: int, buffer: ctypes.Array[ctypes.c_char]
) -> None:
    """getsockopt with a buffer that carries input (the table's name) as well as output."""
    length = ctypes.c_uint32(len(buffer))
    if _libc.getsockopt(sock.fileno(), level, option, buffer, ctypes.byref(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, errno.errorcode.get(code, str(code)))


TableInfo = tuple[int, ...]
Rules = tuple[bytes, ...]


class LegacyTableReader:
    """Reads legacy iptables tables of one family in the current network namespace."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self.layout = _LAYOUT[family]
        self._socket: socket.socket | None = None

    def _sock(self) -> socket.socket:
        if self._socket is None:
            self._socket = socket.socket(_DOMAIN[self.family], socket.SOCK_RAW, socket.IPPROTO_RAW)
        return self._socket

    def info(self, table: str) -> TableInfo | None:
        """(valid hooks, hook entries, underflows, entry count, size); None: no such table."""
        buffer = ctypes.create_string_buffer(table.encode(), _INFO.size)
        try:
            _getsockopt(self._sock(), _LEVEL[self.family], SO_GET_INFO, buffer)
        except OSError as error:
            if error.errno == errno.ENOENT:
                return None
            raise
        return tuple(_INFO.unpack(buffer.raw)[1:])

    def entries(self, table: str, info: TableInfo) -> bytes | None:
        """The table's entries (None when it changed size meanwhile: read the info again)."""
        size = info[-1]
        buffer = ctypes.create_string_buffer(_ENTRIES_HEADER + size)
        struct.pack_into("=32sI", buffer, 0, table.encode(), size)
        try:
            _getsockopt(self._sock(), _LEVEL[self.family], SO_GET_ENTRIES, buffer)
        except OSError as error:
            if error.errno == errno.EAGAIN:
                return None
            raise
        return buffer.raw[_ENTRIES_HEADER:]

    def ours(self, table: str) -> tuple[TableInfo | None, dict[str, Rules]]:
        """The table's info and metaleg's part: ``"<builtin>"`` -> the leading rules that are
        metaleg's, ``METALEG-*`` -> that chain's rules (each rule as comparable bytes)."""
        for _ in range(3):
            info = self.info(table)
            if info is None:
                return None, {}
            blob = self.entries(table, info)
            if blob is not None:
                return info, self._parse(table, info, blob)
        raise OSError(errno.EAGAIN, f"{table}: changed during every reading")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _walk(self, blob: bytes) -> Iterator[int]:
        offset, end, at = 0, len(blob), self.layout.next_offset
        while offset < end:
            yield offset
            step = int.from_bytes(blob[offset + at : offset + at + 2], "little")
            if step <= 0:
                return
            offset += step

    def _parse(self, table: str, info: TableInfo, blob: bytes) -> dict[str, Rules]:
        layout = self.layout
        offsets = list(self._walk(blob))
        chain_at: dict[int, str] = {}  # offset of a user chain's first rule -> its name
        chains: dict[str, list[int]] = {}
        current: list[int] | None = None
        for index, offset in enumerate(offsets):
            target = offset + int.from_bytes(
                blob[offset + layout.target_offset : offset + layout.target_offset + 2], "little"
            )
            if blob[target + 2 : target + 7] == _ERROR and blob[target + 7] == 0:
                name = blob[target + 32 : target + 64].split(b"\0", 1)[0]
                current = None
                if index + 1 < len(offsets):
                    chain_at[offsets[index + 1]] = name.decode(errors="replace")
                if name.startswith(PREFIX):
                    current = chains.setdefault(name.decode(errors="replace"), [])
                continue
            if current is not None:
                current.append(offset)
        # User chains end with a RETURN entry of their own (the policy): not a rule.
        parts: dict[str, Rules] = {
            name: tuple(self._rule(blob, offset, chain_at) for offset in members[:-1])
            for name, members in chains.items()
        }
        builtin, hook = TABLE_HEADS[table]
        hook_entry, underflow = info[1 + hook], info[6 + hook]
        leading: list[bytes] = []
        for offset in offsets:
            if offset < hook_entry:
                continue
            if offset >= underflow:
                break
            rule = self._rule(blob, offset, chain_at)
            if not self._is_ours(rule):
                break
            leading.append(rule)
        parts[builtin] = tuple(leading)
        return parts

    def _rule(self, blob: bytes, offset: int, chain_at: dict[int, str]) -> bytes:
        """A rule as comparable bytes: address part, matches, target; a jump as its chain's name
        (offsets move when anything before it changes); no counters."""
        layout = self.layout
        target_offset = int.from_bytes(
            blob[offset + layout.target_offset : offset + layout.target_offset + 2], "little"
        )
        next_offset = int.from_bytes(
            blob[offset + layout.next_offset : offset + layout.next_offset + 2], "little"
        )
        address = blob[offset : offset + layout.ip_size]
        matches = blob[offset + layout.header : offset + target_offset]
        target = blob[offset + target_offset : offset + next_offset]
        if target[2:31] == _STANDARD and len(target) >= 36:
            verdict = int.from_bytes(target[32:36], "little", signed=True)
            if verdict >= 0:
                return address + matches + b"-j " + chain_at.get(verdict, "?").encode()
            return address + matches + b"-v " + str(verdict).encode()
        return address + matches + target

    @staticmethod
    def _is_ours(rule: bytes) -> bool:
        """A jump to a METALEG-* chain, or a RETURN on a mark match (nat's mark skip)."""
        if b"-j " + PREFIX in rule:
            return rule[rule.rindex(b"-j ") + 3 :].startswith(PREFIX)
        return rule.endswith(b"-v " + str(_XT_RETURN).encode()) and b"mark" in rule


IPSET_FLAG_LIST_HEADER = 1 << 2
IPSET_ATTR_ELEMENTS = 24


class IpsetHeaders(IpsetSocket):
    """Header-only ipset listings: every set's type and element count, no members.

    The kernel sends one message per set, and a node's sets seldom change, so each
    message is looked up among the last listing's before it is parsed (parsing was
    most of a listing's cost)."""

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[bytes, tuple[str, str, int]] = {}

    def counts(self, wanted: Callable[[str], bool]) -> dict[str, tuple[str, int]]:
        """Name -> (type, element count) of the sets ``wanted`` accepts."""
        self._open()
        try:
            attributes = _u8(ATTR_PROTOCOL, self._protocol) + attr(
                ATTR_FLAGS, struct.pack("!I", IPSET_FLAG_LIST_HEADER)
            )
            found: dict[str, tuple[str, int]] = {}
            previous, parsed = self._parsed, {}
            for payload in self._list(attributes):
                header = previous.get(payload)
                if header is None:
                    header = _parse_header(payload)
                parsed[payload] = header
                name, kind, count = header
                if wanted(name):
                    found[name] = (kind, count)
            self._parsed = parsed
            return found
        except BaseException:
            self.close()
            raise


def _parse_header(payload: bytes) -> tuple[str, str, int]:
    """(name, type, element count; -1 if not given) of one set's header message."""
    fields = dict(parse_attributes(payload, NFGEN.size))
    name = fields.get(ATTR_SETNAME, b"").rstrip(b"\0").decode(errors="replace")
    count = -1
    for attribute, value in parse_attributes(fields.get(ATTR_DATA, b"")):
        if attribute == IPSET_ATTR_ELEMENTS and len(value) >= 4:
            count = struct.unpack_from("!I", value)[0]
    kind = fields.get(ATTR_TYPENAME, b"").rstrip(b"\0").decode(errors="replace")
    return name, kind, count


def _is_metaleg_set(name: str) -> bool:
    return name.startswith(PREFIX.decode())


class IptablesDriftCheck:
    """Compares metaleg's iptables rules and ipsets with the baseline every :data:`CHECK_INTERVAL`."""

    check_interval: float | None = CHECK_INTERVAL

    def __init__(self) -> None:
        self._readers = {family: LegacyTableReader(family) for family in Family}
        self._ipsets = IpsetHeaders()
        self._baseline: dict[tuple[Family, str], dict[str, Rules]] | None = None
        self._sets: dict[str, tuple[str, int]] = {}
        self._info: dict[tuple[Family, str], TableInfo | None] = {}
        self._checks = 0
        self._stale = False

    def fds(self) -> list[int]:
        return []

    def after_own_write(self) -> None:
        """metaleg has just written: the next check takes the new baseline instead of comparing.

        The worker checks right after it has reported the write, so the reading is not
        part of a change's latency (at N=5000, ~12 ms), and a foreign change can slip into
        the baseline only in that moment (the periodic re-sync would repair it)."""
        self._stale = True

    def rebaseline(self) -> None:
        """Take the kernel's current state as metaleg's (right after its own write)."""
        self._stale = False
        baseline: dict[tuple[Family, str], dict[str, Rules]] = {}
        for family, reader in self._readers.items():
            for table in TABLE_HEADS:
                try:
                    info, parts = reader.ours(table)
                except OSError:
                    continue  # this family or table is not there (ipv6.disable=1)
                self._info[family, table] = info
                baseline[family, table] = parts
        self._baseline = baseline
        with contextlib.suppress(Exception):
            self._sets = self._ipsets.counts(_is_metaleg_set)

    def check(self) -> list[Drift]:
        """The differences from the baseline (none before the first baseline)."""
        if self._stale:
            self.rebaseline()
            return []
        baseline = self._baseline
        if baseline is None:
            return []
        self._checks += 1
        full = self._checks % FULL_EVERY == 0
        found: list[Drift] = []
        for (family, table), want in baseline.items():
            reader = self._readers[family]
            info = reader.info(table)
            if not full and info == self._info.get((family, table)):
                continue
            info, have = reader.ours(table)
            differences = _compare(family, table, want, have)
            if not differences:
                self._info[family, table] = info  # a change elsewhere in the table
            found += differences
        sets = self._ipsets.counts(_is_metaleg_set)
        for name in sorted(sets.keys() | self._sets.keys()):
            if name not in sets:
                found.append(Drift("ipset", f"ipset {name} destroyed"))
            elif name not in self._sets:
                found.append(Drift("ipset", f"ipset {name} created"))
            elif sets[name] != self._sets[name]:
                (kind, count), (_, want_count) = sets[name], self._sets[name]
                found.append(
                    Drift("ipset", f"ipset {name} ({kind}) holds {count} members, not {want_count}")
                )
        return found

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._ipsets.close()


def _compare(
    family: Family, table: str, want: dict[str, Rules], have: dict[str, Rules]
) -> list[Drift]:
    tool = "iptables" if family == Family.IPV4 else "ip6tables"
    found: list[Drift] = []
    builtin = TABLE_HEADS[table][0]
    if want.get(builtin) != have.get(builtin):
        want_count, have_count = len(want.get(builtin, ())), len(have.get(builtin, ()))
        found.append(
            Drift(
                "iptables_jump",
                f"{tool} -t {table} {builtin}: {have_count} of metaleg's {want_count} rules "
                "in front (deleted, changed or preceded by another rule)",
            )
        )
    for chain in sorted((want.keys() | have.keys()) - {builtin}):
        if chain not in have:
            found.append(Drift("iptables_chain", f"{tool} -t {table} chain {chain} deleted"))
        elif chain not in want:
            found.append(Drift("iptables_chain", f"{tool} -t {table} chain {chain} created"))
        elif want[chain] != have[chain]:
            found.append(
                Drift(
                    "iptables_chain",
                    f"{tool} -t {table} chain {chain}: {len(have[chain])} rules, "
                    f"{len(want[chain])} expected, or changed",
                )
            )
    return found
