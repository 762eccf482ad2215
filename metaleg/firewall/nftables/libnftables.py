"""A minimal ctypes binding of libnftables (``libnftables.so.1``), the library behind ``nft``.

Why the C library and not the alternatives:

- ``nft -f -`` (the binary) would need a fork+exec per transaction and a pipe
  for the script; it parses the same language with the same library, so it adds
  latency (a few ms per call) and a second failure mode (binary missing or a
  different version than the library) without adding anything.
- pyroute2's nftables support speaks raw netlink but covers only a small part of
  the expression language (no maps with ``snat ... map``, no verdict maps); we
  would be re-implementing nft's compiler.
- Debian's ``python3-nftables`` is the same ctypes approach, but it lives in the
  system interpreter's dist-packages and is not importable from a venv.

libnftables gives us, in-process: one atomic kernel transaction per
:meth:`Nft.run` call (the whole buffer is one netlink batch), nft's own parser
and error messages (with the failing line), and JSON listings to read the state
back. A context is cheap; it must be created in the network namespace it acts
on (the netlink socket is opened in the caller's namespace), and it is not
thread-safe (one per backend, used from one thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

import msgspec

# Output flags of libnftables.h (stable ABI since nftables 0.9.x).
OUTPUT_JSON = 1 << 4
OUTPUT_TERSE = 1 << 11

_LIBRARY_NAMES = ("libnftables.so.1", "nftables")
_library: ctypes.CDLL | None = None
_library_lock = threading.Lock()


class NftError(RuntimeError):
    """An nft command failed; the message holds nft's own error text (with the failing line)."""


def _load_library() -> ctypes.CDLL:
    """Load and declare the library once per process (ctypes needs the prototypes)."""
    global _library
    with _library_lock:
        if _library is not None:
            return _library
        errors: list[str] = []
        for name in _LIBRARY_NAMES:
            path = name if name.endswith(".1") else ctypes.util.find_library(name)
            if path is None:
                continue
            try:
                lib = ctypes.CDLL(path, use_errno=True)
            except OSError as error:
                errors.append(f"{path}: {error}")
                continue
            break
        else:
            raise NftError(
                "cannot load libnftables (Debian package libnftables1): " + "; ".join(errors)
            )
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        # c_char_p as restype copies the C string into Python bytes right away,
        # which matters: the buffers are reused by the next command.
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _library = lib
        return lib


def _shorten_error(message: str, width: int = 240, max_lines: int = 12) -> str:
    """nft echoes the failing command with a caret line under it; with thousands of
    elements on one line that is megabytes. Keep the message readable: the first
    lines, long ones cut to a window around the caret."""
    lines = message.splitlines()[:max_lines]
    result: list[str] = []
    for index, line in enumerate(lines):
        if len(line) <= width:
            result.append(line)
            continue
        if line.strip() and set(line.strip()) <= {"^", "~"}:
            caret = line.find("^")
            start = max(0, caret - width // 2)
            result.append(("   " if start else "") + line[start : start + width].rstrip())
            continue
        below = lines[index + 1] if index + 1 < len(lines) else ""
        caret = below.find("^") if below.strip() and set(below.strip()) <= {"^", "~"} else -1
        start = max(0, caret - width // 2) if caret >= 0 else 0
        result.append(("..." if start else "") + line[start : start + width] + "...")
    return "\n".join(result)


class Nft:
    """One libnftables context: run nft scripts and read JSON listings."""

    def __init__(self) -> None:
        self._lib = _load_library()
        ctx = self._lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise NftError("nft_ctx_new failed (out of memory?)")
        self._ctx: int | None = ctx
        # Buffer both streams: otherwise libnftables prints to our stdout/stderr.
        if self._lib.nft_ctx_buffer_output(ctx) or self._lib.nft_ctx_buffer_error(ctx):
            self.close()
            raise NftError("cannot buffer libnftables output")

    def run(self, script: str, flags: int = 0) -> str:
        """Run ``script`` (nft syntax, several commands) as ONE transaction; return its output.

        Either every command of the script takes effect or none does: libnftables
        sends the whole script as one netlink batch, which the kernel commits
        atomically. Raises :class:`NftError` with nft's message on failure.
        """
        return self._run(script, flags).decode(errors="replace")

    def _run(self, script: str, flags: int) -> bytes:
        if self._ctx is None:
            raise NftError("the libnftables context is closed")
        self._lib.nft_ctx_output_set_flags(self._ctx, flags)
        status = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
        output: bytes = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        if status != 0:
            error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            raise NftError(_shorten_error(error.strip()) or f"nft failed with status {status}")
        return output

    def json(self, command: str, terse: bool = False) -> dict[str, Any]:
        """Run a listing command with JSON output and return the decoded document.

        The output is decoded straight from the bytes libnftables wrote (msgspec: no
        intermediate text copy, and faster than ``json`` for big listings).
        """
        output = self._run(command, OUTPUT_JSON | (OUTPUT_TERSE if terse else 0))
        try:
            document = msgspec.json.decode(output)
        except msgspec.DecodeError as error:
            raise NftError(f"{command!r} returned invalid JSON: {error}") from error
        if not isinstance(document, dict):
            raise NftError(f"{command!r} returned unexpected JSON: {output[:200]!r}")
        return document

    def close(self) -> None:
        """Free the context; idempotent."""
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
