"""Agent configuration: environment variables, parsed and validated once.

The supervisor calls :func:`load_config` at start; a bad value raises
:class:`ConfigError` naming the variable, the value and what is wrong (the CLI
turns it into one line and exit status 2). Workers receive the validated
:class:`Config` from the supervisor, encoded with msgspec, and never read the
environment themselves.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from typing import Literal, TypeVar

import msgspec

from metaleg.model import fwmask_capacity

DEFAULT_EXCLUDE_DST_CIDRS = (
    "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, fc00::/7, fe80::/10"
)

# Every variable the agent reads, with its default (None: required or unset).
# The DaemonSet manifest and the README are checked against this table.
ENVIRONMENT: dict[str, str | None] = {
    "NODE_NAME": None,
    "METALLB_NAMESPACE": "metallb-system",
    "FILTER_ENDPOINTS_FOR_NODE": "true",
    "FIREWALL_BACKEND": "auto",
    "FIREWALL_MASK": "0x00F00000",
    "FIREWALL_EXCLUDE_DST_CIDRS": DEFAULT_EXCLUDE_DST_CIDRS,
    "ROUTE_BACKEND": "netlink",
    "ROUTE_TABLE_ID_OFFSET": "100000",
    "RECONCILIATION_INTERVAL": "5m",
    "WATCH_IDLE_TIMEOUT": "75s",
    "METRICS_BIND_ADDRESS": ":21793",
    "HEALTH_PROBE_BIND_ADDRESS": ":21794",
    "KUBECONFIG": None,
    "METALEG_RUN_DIR": "/run/metaleg",
    "LOG_LEVEL": "info",
    "LOG_LEVEL_LIBRARIES": "warning",
    "LOG_FORMAT": "json",
    "AUDIT_LOG": "on",
    "AUDIT_LOG_RATE": "1000",
}

FIREWALL_BACKENDS = ("auto", "iptables", "nftables")
ROUTE_BACKENDS = ("netlink",)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
AUDIT_LOG_SWITCH = ("on", "off")
AUDIT_LOG_RATE_MAX = 1_000_000

# Kernel routing table ids with a fixed meaning (unspec, default, main, local).
_RESERVED_TABLE_IDS = frozenset({0, 253, 254, 255})
_MAX_TABLE_ID = 2**32 - 1


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names it."""

    def __init__(self, variable: str, value: str | None, problem: str) -> None:
        self.variable = variable
        self.value = value
        self.problem = problem
        shown = f"{variable} is unset" if value is None else f"{variable}={value!r}"
        super().__init__(f"invalid configuration: {shown}: {problem}")


class BindAddress(msgspec.Struct, frozen=True):
    """A TCP listen address; ``host`` "" means every address."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def listen_candidates(self) -> list[tuple[str, socket.AddressFamily]]:
        """Where a server listens for this address, in the order to try: "" and "::" are
        every address, IPv6 (taking IPv4 too) first, then IPv4 alone for a node without
        IPv6."""
        if self.host in ("", "::"):
            return [("::", socket.AF_INET6), ("0.0.0.0", socket.AF_INET)]
        if ":" in self.host:
            return [(self.host, socket.AF_INET6)]
        return [(self.host, socket.AF_INET)]


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The validated agent configuration."""

    node_name: str
    metallb_namespace: str = "metallb-system"
    filter_endpoints_for_node: bool = True
    firewall_backend: Literal["auto", "iptables", "nftables"] = "auto"
    firewall_mask: int = 0x00F00000
    exclude_dst_ipv4: tuple[str, ...] = ()
    exclude_dst_ipv6: tuple[str, ...] = ()
    route_backend: Literal["netlink"] = "netlink"
    route_table_id_offset: int = 100000
    reconciliation_interval: float = 300.0
    watch_idle_timeout: float = 75.0
    """A watch connection that carries nothing (no event, no bookmark) this long is dead."""
    metrics_bind_address: BindAddress | None = None
    health_probe_bind_address: BindAddress | None = None
    kubeconfig: str | None = None
    run_dir: str = "/run/metaleg"
    log_level: str = "info"
    log_level_libraries: str = "warning"
    """The level of third-party libraries' loggers (pyroute2, urllib3, kubernetes, ...)."""
    log_format: str = "json"
    audit_log: bool = True
    """Run the SNAT audit process (:mod:`metaleg.audit`)."""
    audit_log_rate: int = 1000
    """Audit lines per second at most; the others are dropped and counted."""


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Parse a Go ``time.ParseDuration`` string (``5m``, ``1h30m``, ``250ms``) into seconds.

    Raises ``ValueError`` with the reason on malformed input. A sign is accepted
    as Go does; callers decide whether negative values make sense.
    """
    if not text:
        raise ValueError("empty duration")
    rest = text
    sign = 1.0
    if rest[0] in "+-":
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError("no number after the sign")
    total = 0.0
    position = 0
    while position < len(rest):
        match = _DURATION_PART.match(rest, position)
        if match is None:
            if rest[position].isdigit() or rest[position] == ".":
                raise ValueError(
                    f"missing unit after {rest[position:]!r} (use ns, us, ms, s, m, h)"
                )
            raise ValueError(f"unexpected {rest[position:]!r} (expected a number and a unit)")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return sign * total


def parse_bool(text: str) -> bool:
    """Parse a boolean as Go's ``strconv.ParseBool`` does."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError("expected true or false")


def parse_mask(text: str) -> int:
    """Parse a hexadecimal firewall mask that is one contiguous, non-empty block of ones."""
    digits = text[2:] if text.lower().startswith("0x") else text
    if not digits or not re.fullmatch(r"[0-9a-fA-F]+", digits):
        raise ValueError("expected a hexadecimal number such as 0x00F00000")
    mask = int(digits, 16)
    if mask == 0:
        raise ValueError("the mask must not be zero")
    if mask > 0xFFFFFFFF:
        raise ValueError("the mask must fit in 32 bits")
    # A contiguous block of ones, shifted down to bit 0, is 2**n - 1.
    lowest = mask & -mask
    if (mask // lowest) & ((mask // lowest) + 1):
        raise ValueError("the mask must be one contiguous block of ones (such as 0x00F00000)")
    return mask


def parse_cidrs(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Parse comma-separated CIDRs (spaces allowed) into sorted IPv4 and IPv6 network strings."""
    ipv4: set[ipaddress.IPv4Network] = set()
    ipv6: set[ipaddress.IPv6Network] = set()
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        if "/" not in item:
            raise ValueError(f"{item!r} is not a CIDR (expected address/prefix-length)")
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError as error:
            raise ValueError(f"{item!r} is not a CIDR: {error}") from None
        if isinstance(network, ipaddress.IPv4Network):
            ipv4.add(network)
        else:
            ipv6.add(network)
    return tuple(str(n) for n in sorted(ipv4)), tuple(str(n) for n in sorted(ipv6))


def parse_bind_address(text: str) -> BindAddress | None:
    """Parse ``:21793``, ``127.0.0.1:9000``, ``[::1]:9000``; ``0`` disables (None)."""
    if text == "0":
        return None
    match = re.fullmatch(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)", text)
    if match is None:
        raise ValueError("expected host:port, :port, [ipv6]:port or 0 to disable")
    host = match.group("v6") if match.group("v6") is not None else match.group("host")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    if host and host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
        if match.group("v6") is not None and address.version != 6:
            raise ValueError("brackets are only for IPv6 addresses")
        if match.group("v6") is None and address.version == 6:
            raise ValueError("write IPv6 addresses in brackets, such as [::1]:9000")
        host = str(address)
    return BindAddress(host=host, port=port)


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def _positive_duration(text: str) -> float:
    seconds = parse_go_duration(text)
    if seconds <= 0:
        raise ValueError("the interval must be positive")
    return seconds


UNIX_PATH_MAX = 107
"""Bytes of a Unix socket path (``sun_path`` is 108 bytes with its terminating NUL)."""
RUN_DIR_SOCKETS = ("bus.sock", "control.sock")
"""The Unix sockets the supervisor binds in METALEG_RUN_DIR (:mod:`metaleg.ipc`)."""


def _run_dir(text: str) -> str:
    """METALEG_RUN_DIR: non-empty, and short enough for the socket paths in it."""
    if not text:
        raise ValueError("must not be empty")
    if "\0" in text:
        raise ValueError("must not contain a NUL byte")
    longest = max(len(os.path.join(text, name).encode()) for name in RUN_DIR_SOCKETS)
    if longest > UNIX_PATH_MAX:
        raise ValueError(
            f"too long for a Unix socket path: {os.path.join(text, 'control.sock')!r} is "
            f"{longest} bytes, at most {UNIX_PATH_MAX} are possible"
        )
    return text


def check_run_dir(path: str) -> None:
    """Whether the supervisor can use ``path`` as METALEG_RUN_DIR; raises :class:`ConfigError`.

    Reads the file system, changes nothing: ``path`` is a directory this user owns and
    may write and enter, or it does not exist and its nearest existing parent is a
    directory this user may write and enter (the supervisor creates it with mode 0700).
    """

    def refuse(problem: str) -> ConfigError:
        return ConfigError("METALEG_RUN_DIR", path, problem)

    try:
        status = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent) and parent != os.path.dirname(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise refuse(f"cannot be created: {parent} is not a directory") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise refuse(f"cannot be created: no permission to write in {parent}") from None
        return
    except NotADirectoryError:
        raise refuse("cannot be created: a parent is not a directory") from None
    except OSError as error:
        raise refuse(f"cannot be read: {error.strerror or error}") from None
    if not stat.S_ISDIR(status.st_mode):
        raise refuse("exists and is not a directory")
    if status.st_uid != os.geteuid():
        raise refuse(
            f"is owned by uid {status.st_uid}, not by this user (uid {os.geteuid()}); its "
            "sockets accept any local peer that can reach them"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise refuse("no permission to write in it (read-only file system or mode)")


def _audit_rate(text: str) -> int:
    """AUDIT_LOG_RATE: lines per second, a positive decimal integer."""
    if not re.fullmatch(r"\d+", text):
        raise ValueError("expected a positive decimal integer (lines per second)")
    rate = int(text)
    if rate == 0:
        raise ValueError("must be positive (AUDIT_LOG=off turns the audit log off)")
    if rate > AUDIT_LOG_RATE_MAX:
        raise ValueError(f"at most {AUDIT_LOG_RATE_MAX} lines per second")
    return rate


def _table_offset(text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise ValueError("expected a non-negative decimal integer")
    return int(text)


T = TypeVar("T")


def load_config(environ: Mapping[str, str]) -> Config:
    """Build the :class:`Config` from an environment mapping, or raise :class:`ConfigError`."""

    def get(name: str, parse: Callable[[str], T]) -> T:
        default = ENVIRONMENT[name]
        raw = environ.get(name, default)
        if raw is None:
            raise ConfigError(name, None, "required (set it from the downward API: spec.nodeName)")
        try:
            return parse(raw.strip() if name != "NODE_NAME" else raw)
        except ValueError as error:
            raise ConfigError(name, raw, str(error)) from None

    def node_name(text: str) -> str:
        if not text:
            raise ValueError("required (set it from the downward API: spec.nodeName)")
        if text != text.strip() or "/" in text:
            raise ValueError("not a valid node name")
        return text

    def namespace(text: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", text):
            raise ValueError("not a valid namespace name (RFC 1123 label)")
        return text

    firewall_mask = get("FIREWALL_MASK", parse_mask)
    offset = get("ROUTE_TABLE_ID_OFFSET", _table_offset)
    capacity = fwmask_capacity(firewall_mask)
    clashes = [table for table in _RESERVED_TABLE_IDS if offset < table <= offset + capacity]
    if clashes or offset + capacity > _MAX_TABLE_ID:
        raise ConfigError(
            "ROUTE_TABLE_ID_OFFSET",
            environ.get("ROUTE_TABLE_ID_OFFSET", ENVIRONMENT["ROUTE_TABLE_ID_OFFSET"]),
            f"tables {offset + 1}..{offset + capacity} (one per mark of FIREWALL_MASK) must avoid "
            f"the reserved ids 0, 253, 254, 255 and stay below 2^32",
        )
    exclude_ipv4, exclude_ipv6 = get("FIREWALL_EXCLUDE_DST_CIDRS", parse_cidrs)
    kubeconfig = environ.get("KUBECONFIG") or None
    return Config(
        node_name=get("NODE_NAME", node_name),
        metallb_namespace=get("METALLB_NAMESPACE", namespace),
        filter_endpoints_for_node=get("FILTER_ENDPOINTS_FOR_NODE", parse_bool),
        firewall_backend=get("FIREWALL_BACKEND", _choice(FIREWALL_BACKENDS)),  # type: ignore[arg-type]
        firewall_mask=firewall_mask,
        exclude_dst_ipv4=exclude_ipv4,
        exclude_dst_ipv6=exclude_ipv6,
        route_backend=get("ROUTE_BACKEND", _choice(ROUTE_BACKENDS)),  # type: ignore[arg-type]
        route_table_id_offset=offset,
        reconciliation_interval=get("RECONCILIATION_INTERVAL", _positive_duration),
        watch_idle_timeout=get("WATCH_IDLE_TIMEOUT", _positive_duration),
        metrics_bind_address=get("METRICS_BIND_ADDRESS", parse_bind_address),
        health_probe_bind_address=get("HEALTH_PROBE_BIND_ADDRESS", parse_bind_address),
        kubeconfig=kubeconfig,
        run_dir=get("METALEG_RUN_DIR", _run_dir),
        log_level=get("LOG_LEVEL", _choice(LOG_LEVELS)),
        log_level_libraries=get("LOG_LEVEL_LIBRARIES", _choice(LOG_LEVELS)),
        log_format=get("LOG_FORMAT", _choice(LOG_FORMATS)),
        audit_log=get("AUDIT_LOG", _choice(AUDIT_LOG_SWITCH)) == "on",
        audit_log_rate=get("AUDIT_LOG_RATE", _audit_rate),
    )
