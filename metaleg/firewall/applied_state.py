"""The firewall's last applied state on disk: a snapshot, then the changes after it.

The iptables backend's conntrack scoping needs, after a restart of the firewall
worker, what was applied before (so that it deletes only the entries whose
treatment changed, see :mod:`metaleg.firewall.selection`). Rewriting the whole
state after every change would cost what the state holds (~1 MiB of msgpack at
1000 Services); instead each change appends the Services it changed, and the
file is rewritten as one snapshot (atomically: a temporary file renamed over
it) when the appended changes outgrow the snapshot.

Format: records, each a 4-byte big-endian length and a msgpack :class:`Snapshot`
or :class:`Patch`; the first is a snapshot. A record cut short (the process died
while writing it) ends the file: the state is the one before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct

import msgspec

from metaleg.firewall.claims import ServiceChange
from metaleg.model import NodeDesiredState, ServiceEgress

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")


class Snapshot(msgspec.Struct, frozen=True, tag="snapshot"):
    """A whole state."""

    state: NodeDesiredState


class Patch(msgspec.Struct, frozen=True, tag="patch"):
    """The step to the next state: its fields except ``services`` (in ``header``, whose
    ``services`` is empty), and the Services that changed or went."""

    header: NodeDesiredState
    upserts: tuple[ServiceEgress, ...]
    removals: tuple[tuple[str, str], ...]


_DECODER = msgspec.msgpack.Decoder(Snapshot | Patch)
_ENCODER = msgspec.msgpack.Encoder()


class AppliedStateFile:
    """Reads and writes the applied state at ``path`` (see the module doc)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._snapshot_size = 0
        self._appended = 0
        """Bytes of patches after the snapshot this process wrote (0: none written yet)."""

    def load(self) -> NodeDesiredState | None:
        """The last state written, or None when there is none (or it cannot be read;
        logged)."""
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            log.warning("ignoring unreadable %s: %s", self.path, error)
            return None
        try:
            state, size = _replay(data)
        except (msgspec.DecodeError, ValueError) as error:
            log.warning("ignoring unreadable %s: %s", self.path, error)
            return None
        if size < len(data):
            log.warning(
                "%s: the last change was written only in part; using the state before it",
                self.path,
            )
        return state

    def save(self, state: NodeDesiredState, changes: list[ServiceChange] | None) -> None:
        """Record ``state``: as a patch of ``changes`` (the Services that differ from the
        last state saved) when given, else, or when patches outgrew the snapshot, as a
        new snapshot. Errors are logged (the state in memory stays right)."""
        try:
            if changes is None or self._appended >= max(self._snapshot_size, 64 * 1024):
                self._write_snapshot(state)
            else:
                self._append(state, changes)
        except OSError as error:
            log.warning("cannot save the applied state to %s: %s", self.path, error)

    def remove(self) -> None:
        """Delete the file (no error if it does not exist)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._snapshot_size = self._appended = 0

    def _write_snapshot(self, state: NodeDesiredState) -> None:
        record = _frame(_ENCODER.encode(Snapshot(state)))
        temporary = f"{self.path}.tmp"
        with open(temporary, "wb") as file:
            file.write(record)
        os.replace(temporary, self.path)
        self._snapshot_size, self._appended = len(record), 0

    def _append(self, state: NodeDesiredState, changes: list[ServiceChange]) -> None:
        if not self._snapshot_size:  # nothing of ours to append to yet
            self._write_snapshot(state)
            return
        patch = Patch(
            header=msgspec.structs.replace(state, services=()),
            upserts=tuple(after for _, _, after in changes if after is not None),
            removals=tuple(key for key, _, after in changes if after is None),
        )
        record = _frame(_ENCODER.encode(patch))
        # One write of a whole record: a crash leaves at most this record cut short.
        with open(self.path, "ab") as file:
            file.write(record)
        self._appended += len(record)


def _frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


def _replay(data: bytes) -> tuple[NodeDesiredState | None, int]:
    """The state the records in ``data`` end in, and how many bytes of whole records
    there were."""
    offset = 0
    state: NodeDesiredState | None = None
    while offset + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        end = offset + _LENGTH.size + length
        if end > len(data):
            break
        record = _DECODER.decode(data[offset + _LENGTH.size : end])
        if isinstance(record, Snapshot):
            state = record.state
        else:
            if state is None:
                raise ValueError("a change without a snapshot before it")
            services = {(s.namespace, s.name): s for s in state.services}
            for key in record.removals:
                services.pop(key, None)
            for service in record.upserts:
                services[service.namespace, service.name] = service
            state = msgspec.structs.replace(
                record.header, services=tuple(services[key] for key in sorted(services))
            )
        offset = end
    return state, offset
