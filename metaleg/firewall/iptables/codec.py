"""Fast rule buffers for the xtables helper: python-iptables parses, we assemble and compare.

Building every rule with python-iptables (``Rule``, ``create_match``,
``set_parameter``, ``final_check``) costs ~1.3 ms a rule, most of it in
``final_check``, which prints every extension's options through a pipe and
parses them again. metaleg's rules are made of few distinct parts: the same
``mark``/``conntrack`` matches, a dozen MARK/SNAT/REJECT targets, and one
``set`` match per Service. So :class:`RuleCodec` lets python-iptables parse
each distinct *part* once (the extension's own parser and final check, as
iptables runs them) and caches its bytes; a rule's buffer is the entry header
followed by its parts' bytes, which is exactly the layout python-iptables
itself hands to libiptc.

A ``set`` match holds the kernel's index of its set, which changes when a set
is destroyed and created again; so before cached bytes are used, the index
they hold is checked to still name that set (``getsockopt(SO_IP_SET,
IP_SET_OP_GET_BYINDEX)``), and rebuilt if not. The answers are kept while the
backend reports that no set was destroyed (``SyncRequest.set_generation``). A
``SET`` target (``--map-set``) also holds an index: such rules are built whole
each time (one per family).

Rules read back from the kernel are compared by :meth:`RuleCodec.key` over their raw
bytes (what iptables compares: entry fields, each extension's name, revision
and data; a standard target by its verdict or chain name), without building
python-iptables objects for them.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import Any

from metaleg.firewall.iptables.rules import CHAIN_PREFIX, VERDICTS, Match, Option, Rule

RawKey = tuple[Any, ...]

_SO_IP_SET = 83
_IP_SET_OP_VERSION = 0x00000100
_IP_SET_OP_GET_BYINDEX = 0x00000007
_SOL_IP = 0
_HEADER_SIZE = 32  # xt_entry_match / xt_entry_target: u16 size, char name[29], u8 revision
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")
_VERDICT_NAMES = {-1: "DROP", -2: "ACCEPT", -4: "QUEUE", -5: "RETURN"}
"""The standard target's verdicts (``-NF_<verdict> - 1``; RETURN is ``-NF_REPEAT - 1``)."""
_CACHE_LIMIT = 20_000
"""Cached rules (and matches) before the caches start over: a few times the rules of
N=5000 Services (~1300 a family)."""


class PartError(Exception):
    """python-iptables rejected a part of a rule (the message is python-iptables')."""


class SetIndexes:
    """Kernel indexes of ipsets, as ``libxt_set`` sees them (``getsockopt(SO_IP_SET)``).

    Looking a set up by name makes the kernel scan its whole table of sets, by
    index it is one array access; so cached indexes are checked by index
    (:meth:`holds`), once per request.
    """

    def __init__(self) -> None:
        self._libc: Any = None
        self._socket: socket.socket | None = None
        self._version = 0
        self._names: dict[int, str | None] = {}

    def clear(self) -> None:
        """Forget what was looked up (sets may have changed since)."""
        self._names.clear()

    def _getsockopt(self, buffer: ctypes.Array[ctypes.c_char]) -> None:
        if self._socket is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._socket = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        size = ctypes.c_uint(len(buffer))
        result = self._libc.getsockopt(
            self._socket.fileno(), _SOL_IP, _SO_IP_SET, buffer, ctypes.byref(size)
        )
        if result != 0:
            raise OSError(ctypes.get_errno(), "getsockopt(SO_IP_SET) failed")

    def name(self, index: int) -> str | None:
        """The name of the set with ``index``; None when there is none (or no ipset support)."""
        if index in self._names:
            return self._names[index]
        found: str | None
        try:
            if not self._version:
                request = ctypes.create_string_buffer(struct.pack("=II", _IP_SET_OP_VERSION, 0), 8)
                self._getsockopt(request)
                self._version = struct.unpack_from("=II", request.raw)[1]
            request = ctypes.create_string_buffer(
                struct.pack("=IIH30x", _IP_SET_OP_GET_BYINDEX, self._version, index), 40
            )
            self._getsockopt(request)
            found = request.raw[8:40].split(b"\0", 1)[0].decode() or None
        except (OSError, UnicodeDecodeError):
            found = None
        self._names[index] = found
        return found

    def holds(self, index: int, name: str) -> bool:
        """Whether the set with ``index`` is (still) the set called ``name``."""
        return self.name(index) == name


def _set_name(match: Match) -> str | None:
    if match.name != "set":
        return None
    for option in match.options:
        if option.name == "match-set" and option.values:
            return option.values[0]
    return None


def option_values(option: Option) -> list[str]:
    """An option's values as python-iptables' ``set_parameter`` takes them (``!`` first
    when inverted)."""
    return ["!", *option.values] if option.invert else list(option.values)


class RuleCodec:
    """Rule buffers and keys from cached parts; see the module docstring.

    ``rule_class`` is python-iptables' ``Rule`` or ``Rule6``.
    """

    def __init__(self, rule_class: Any) -> None:
        self._rule_class = rule_class
        blank = rule_class()
        entry_type = type(blank.entry)
        self._entry_size = ctypes.sizeof(entry_type)
        self._ip_size = ctypes.sizeof(entry_type._fields_[0][1])  # ipt_ip or ip6t_ip6
        self._target_offset_at = entry_type.target_offset.offset
        self._next_offset_at = entry_type.next_offset.offset
        self._header = bytearray(ctypes.string_at(ctypes.addressof(blank.entry), self._entry_size))
        # A goto (-g) is the standard target with a flag in the entry's ipt_ip / ip6t_ip6.
        ip_type = entry_type._fields_[0][1]
        self._flags_at = ip_type.flags.offset
        self._goto_flag = next(
            getattr(ip_type, name) for name in dir(ip_type) if name.endswith("_F_GOTO")
        )
        self._matches: dict[Match, bytes] = {}
        self._targets: dict[tuple[str, tuple[Option, ...]], bytes] = {}
        self._rules: dict[Rule, tuple[tuple[tuple[str, int], ...], bytes, RawKey]] = {}
        self.indexes = SetIndexes()
        self._generation = -1

    def start_request(self, set_generation: int = -1) -> None:
        """Call before each request: set indexes are checked again unless ``set_generation``
        is the previous request's (no set destroyed since; -1 means unknown)."""
        if set_generation < 0 or set_generation != self._generation:
            self.indexes.clear()
        self._generation = set_generation
        if len(self._rules) > _CACHE_LIMIT or len(self._matches) > _CACHE_LIMIT:
            # Rules of Services long gone; what is still wanted is rebuilt once.
            self._rules.clear()
            self._matches.clear()

    # -- building --------------------------------------------------------

    def build(self, spec: Rule) -> tuple[bytes, RawKey]:
        """The entry buffer and key of ``spec`` (raises :class:`PartError`)."""
        if spec.target in _SET_TARGETS:
            return self._build_uncached(spec)
        cached = self._rules.get(spec)
        if cached is not None and all(self.indexes.holds(index, name) for name, index in cached[0]):
            return cached[1], cached[2]
        sets: list[tuple[str, int]] = []
        parts = []
        for match in spec.matches:
            part = self._match(match)
            name = _set_name(match)
            if name is not None:
                index = _U16.unpack_from(part, _HEADER_SIZE)[0]
                if not self.indexes.holds(index, name):
                    # Built for a set of this name that has since been destroyed.
                    self._matches.pop(match, None)
                    part = self._match(match)
                    index = _U16.unpack_from(part, _HEADER_SIZE)[0]
                sets.append((name, index))
            parts.append(part)
        target = self._target(spec)
        matches_size = sum(len(part) for part in parts)
        header = bytearray(self._header)
        if spec.goto:
            header[self._flags_at] |= self._goto_flag
        target_offset = self._entry_size + matches_size
        _U16.pack_into(header, self._target_offset_at, target_offset)
        _U16.pack_into(header, self._next_offset_at, target_offset + len(target))
        buffer = bytes(header) + b"".join(parts) + target
        standard = spec.target if _is_standard(spec.target) else None
        key = self.key(buffer, standard)
        self._rules[spec] = (tuple(sets), buffer, key)
        return buffer, key

    def _build_uncached(self, spec: Rule) -> tuple[bytes, RawKey]:
        """A rule whose target refers to sets by index (``SET``): built whole every time."""
        try:
            rule = self._rule_class()
            for match_spec in spec.matches:
                match = rule.create_match(match_spec.name)
                for option in match_spec.options:
                    match.set_parameter(option.name, option_values(option))
                match._final_check()
            target = rule.create_target(spec.target)
            for option in spec.target_options:
                target.set_parameter(option.name, option_values(option))
            target._final_check()
            buffer = bytes(rule.rule)
        except Exception as error:
            raise PartError(str(error) or type(error).__name__) from error
        return buffer, self.key(buffer, None)

    def _match(self, spec: Match) -> bytes:
        """The bytes of a match; a ``set`` match holds the index its set had when built."""
        part = self._matches.get(spec)
        if part is None:
            try:
                rule = self._rule_class()
                match = rule.create_match(spec.name)
                for option in spec.options:
                    match.set_parameter(option.name, option_values(option))
                match._final_check()  # the extension's own check, without the save/parse round trip
                part = bytes(match.match_buf[: match.size])
            except Exception as error:
                raise PartError(str(error) or type(error).__name__) from error
            self._matches[spec] = part
        return part

    def _target(self, spec: Rule) -> bytes:
        cache_key = (spec.target, spec.target_options)
        part = self._targets.get(cache_key)
        if part is None:
            try:
                target = create_target(self._rule_class(), spec)
                if not _is_standard(spec.target):
                    target._final_check()
                part = ctypes.string_at(ctypes.addressof(target.target), target.size)
            except Exception as error:
                raise PartError(str(error) or type(error).__name__) from error
            self._targets[cache_key] = part
        return part

    # -- comparing -------------------------------------------------------

    def key(self, raw: bytes, standard: str | None) -> RawKey:
        """What iptables compares of an entry: entry fields, matches, target.

        ``standard`` is the verdict or chain name when the target is the standard
        one (in the kernel its data is an offset, so it is compared by name).
        Name fields are compared up to their NUL: the kernel writes only that much.
        """
        target_offset = _U16.unpack_from(raw, self._target_offset_at)[0]
        next_offset = _U16.unpack_from(raw, self._next_offset_at)[0]
        matches = []
        offset = self._entry_size
        while offset < target_offset:
            size = _U16.unpack_from(raw, offset)[0]
            if size < _HEADER_SIZE:
                break
            matches.append(
                (
                    raw[offset + 2 : offset + 31].split(b"\0", 1)[0],
                    raw[offset + 31],
                    raw[offset + _HEADER_SIZE : offset + size],
                )
            )
            offset += size
        if standard is not None:
            target: tuple[Any, ...] = ("", standard)
        else:
            target = (
                raw[target_offset + 2 : target_offset + 31].split(b"\0", 1)[0],
                raw[target_offset + 31],
                raw[target_offset + _HEADER_SIZE : next_offset],
            )
        return (raw[: self._ip_size], tuple(matches), target)

    def read_chain(self, table: Any, chain_name: str) -> list[tuple[bytes, RawKey]]:
        """The entries of a chain in the (python-iptables) table handle: raw bytes and keys."""
        result = []
        entry = table.first_rule(chain_name)
        while entry:
            address = ctypes.addressof(entry)
            raw = ctypes.string_at(address, entry.next_offset)
            target_offset = entry.target_offset
            standard = None
            if raw[target_offset + 2] == 0:  # the standard target has the empty name
                # A verdict is in the bytes; a jump's data is an offset into the table,
                # so its chain's name comes from the handle. (Keys are not cached by
                # the bytes: besides the counters, name fields hold whatever followed
                # their NUL in libiptc's buffer, which differs between reads.)
                verdict = _I32.unpack_from(raw, target_offset + _HEADER_SIZE)[0]
                standard = _VERDICT_NAMES.get(verdict)
                if standard is None:
                    name = table.get_target(entry)
                    standard = name.decode() if isinstance(name, bytes) else str(name or "")
            result.append((raw, self.key(raw, standard)))
            entry = table.next_rule(entry)
        return result


_SET_TARGETS = frozenset({"SET"})
"""Targets whose data holds set indexes (never cached)."""


def create_target(rule: Any, spec: Rule) -> Any:
    """``spec``'s target on the python-iptables ``rule``: jumps and verdicts as the standard
    target named after them (python-iptables' name lookup would scan and create tables),
    other targets with their options set."""
    if _is_standard(spec.target):
        target = rule.create_target("")
        target.standard_target = spec.target
        return target
    target = rule.create_target(spec.target)
    for option in spec.target_options:
        target.set_parameter(option.name, option_values(option))
    return target


def _is_standard(target: str) -> bool:
    return target in VERDICTS or target.startswith(CHAIN_PREFIX)
