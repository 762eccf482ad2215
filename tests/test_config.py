from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metaleg.config import (
    ENVIRONMENT,
    BindAddress,
    ConfigError,
    check_run_dir,
    load_config,
    parse_go_duration,
    parse_mask,
)


def test_defaults_match_the_reference_table() -> None:
    config = load_config({"NODE_NAME": "node-a"})
    assert config.node_name == "node-a"
    assert config.metallb_namespace == "metallb-system"
    assert config.filter_endpoints_for_node is True
    assert config.firewall_backend == "auto"
    assert config.firewall_mask == 0x00F00000
    assert config.exclude_dst_ipv4 == (
        "10.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
    )
    assert config.exclude_dst_ipv6 == ("fc00::/7", "fe80::/10")
    assert config.route_backend == "netlink"
    assert config.route_table_id_offset == 100000
    assert config.reconciliation_interval == 300.0
    assert config.metrics_bind_address == BindAddress("", 21793)
    assert config.health_probe_bind_address == BindAddress("", 21794)
    assert config.run_dir == "/run/metaleg"
    assert config.kubeconfig is None
    assert (config.log_level, config.log_format) == ("info", "json")
    assert config.log_level_libraries == "warning"
    assert (config.audit_log, config.audit_log_rate) == (True, 1000)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("0", 0),
        ("2h45m30.5s", 9930.5),
        ("100us", 1e-4),
        ("1µs", 1e-6),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "5 m", "1x", "1h-5m", "--1s", "1.2.3s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


@given(st.integers(1, 31), st.integers(0, 31))
def test_contiguous_masks_are_accepted(width: int, shift: int) -> None:
    mask = ((1 << width) - 1) << shift
    if mask > 0xFFFFFFFF:
        with pytest.raises(ValueError):
            parse_mask(hex(mask))
    else:
        assert parse_mask(hex(mask)) == mask
        assert parse_mask(f"{mask:08X}") == mask


@pytest.mark.parametrize("text", ["0x00F0F000", "0x0", "zz", "0x", "0x101", "-0x10"])
def test_bad_masks(text: str) -> None:
    with pytest.raises(ValueError):
        parse_mask(text)


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("FIREWALL_MASK", "0x00F0F000", "contiguous"),
        ("RECONCILIATION_INTERVAL", "5", "missing unit"),
        ("RECONCILIATION_INTERVAL", "0s", "positive"),
        ("METRICS_BIND_ADDRESS", "21793", "host:port"),
        ("METRICS_BIND_ADDRESS", ":99999", "out of range"),
        ("HEALTH_PROBE_BIND_ADDRESS", "::1:9000", "host:port"),
        ("FIREWALL_EXCLUDE_DST_CIDRS", "10.0.0.0/8, banana", "'banana' is not a CIDR"),
        ("FILTER_ENDPOINTS_FOR_NODE", "yes", "true or false"),
        ("FIREWALL_BACKEND", "ebpf", "one of auto, iptables, nftables"),
        ("ROUTE_BACKEND", "iproute", "one of netlink"),
        ("ROUTE_TABLE_ID_OFFSET", "-1", "non-negative"),
        ("ROUTE_TABLE_ID_OFFSET", "250", "reserved"),
        ("LOG_FORMAT", "xml", "one of json, text"),
        ("METALLB_NAMESPACE", "Metal_LB", "namespace"),
        ("LOG_LEVEL_LIBRARIES", "verbose", "one of debug, info, warning, error"),
        ("AUDIT_LOG", "true", "one of on, off"),
        ("AUDIT_LOG", "ON", "one of on, off"),
        ("AUDIT_LOG_RATE", "0", "must be positive (AUDIT_LOG=off turns the audit log off)"),
        ("AUDIT_LOG_RATE", "-5", "positive decimal integer"),
        ("AUDIT_LOG_RATE", "10/s", "positive decimal integer"),
        ("AUDIT_LOG_RATE", "1.5", "positive decimal integer"),
        ("AUDIT_LOG_RATE", "2000000", "at most 1000000 lines per second"),
    ],
)
def test_bad_values_name_the_variable_the_value_and_the_problem(
    variable: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"NODE_NAME": "n", variable: value})
    message = str(caught.value)
    assert f"{variable}={value!r}" in message
    assert fragment in message
    assert "\n" not in message


def test_missing_node_name() -> None:
    with pytest.raises(ConfigError, match="NODE_NAME"):
        load_config({})
    with pytest.raises(ConfigError, match="NODE_NAME"):
        load_config({"NODE_NAME": ""})


def test_valid_alternatives() -> None:
    config = load_config(
        {
            "NODE_NAME": "n",
            "METRICS_BIND_ADDRESS": "[::1]:9000",
            "HEALTH_PROBE_BIND_ADDRESS": "0",
            "FIREWALL_EXCLUDE_DST_CIDRS": " 10.1.2.3/8 ,fd00::/8,, ",
            "FILTER_ENDPOINTS_FOR_NODE": "F",
            "RECONCILIATION_INTERVAL": "1h30m",
            "KUBECONFIG": "/tmp/kc",
        }
    )
    assert config.metrics_bind_address == BindAddress("::1", 9000)
    assert str(config.metrics_bind_address) == "[::1]:9000"
    assert config.health_probe_bind_address is None
    assert config.exclude_dst_ipv4 == ("10.0.0.0/8",)
    assert config.exclude_dst_ipv6 == ("fd00::/8",)
    assert config.filter_endpoints_for_node is False
    assert config.reconciliation_interval == 5400
    assert config.kubeconfig == "/tmp/kc"
    assert load_config(
        {"NODE_NAME": "n", "METRICS_BIND_ADDRESS": "127.0.0.1:9000"}
    ).metrics_bind_address == BindAddress("127.0.0.1", 9000)
    logs_and_audit = load_config(
        {
            "NODE_NAME": "n",
            "LOG_LEVEL_LIBRARIES": "debug",
            "AUDIT_LOG": "off",
            "AUDIT_LOG_RATE": " 100 ",
        }
    )
    assert logs_and_audit.log_level_libraries == "debug"
    assert (logs_and_audit.audit_log, logs_and_audit.audit_log_rate) == (False, 100)


def test_environment_table_lists_every_variable_read() -> None:
    assert set(ENVIRONMENT) >= {
        "NODE_NAME",
        "METALLB_NAMESPACE",
        "FILTER_ENDPOINTS_FOR_NODE",
        "FIREWALL_BACKEND",
        "FIREWALL_MASK",
        "FIREWALL_EXCLUDE_DST_CIDRS",
        "ROUTE_BACKEND",
        "ROUTE_TABLE_ID_OFFSET",
        "RECONCILIATION_INTERVAL",
        "METRICS_BIND_ADDRESS",
        "HEALTH_PROBE_BIND_ADDRESS",
        "KUBECONFIG",
        "METALEG_RUN_DIR",
        "LOG_LEVEL",
        "LOG_LEVEL_LIBRARIES",
        "LOG_FORMAT",
        "AUDIT_LOG",
        "AUDIT_LOG_RATE",
    }


def test_run_dir_must_fit_the_socket_paths() -> None:
    # "/" + 94 characters + "/control.sock": 108 bytes, one too many.
    longest = "/" + "r" * 93
    assert load_config({"NODE_NAME": "n", "METALEG_RUN_DIR": longest}).run_dir == longest
    for value in (longest + "r", "/" + "é" * 47):
        with pytest.raises(ConfigError) as caught:
            load_config({"NODE_NAME": "n", "METALEG_RUN_DIR": value})
        message = str(caught.value)
        assert f"METALEG_RUN_DIR={value!r}" in message and "too long" in message
        assert "\n" not in message
    with pytest.raises(ConfigError, match="METALEG_RUN_DIR='': must not be empty"):
        load_config({"NODE_NAME": "n", "METALEG_RUN_DIR": ""})


def test_check_run_dir(tmp_path: pathlib.Path) -> None:
    check_run_dir(str(tmp_path))  # exists
    check_run_dir(str(tmp_path / "new" / "deeper"))  # can be created
    afile = tmp_path / "file"
    afile.write_text("")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    for path, fragment in (
        (afile, "exists and is not a directory"),
        (afile / "sub", "cannot be created: a parent is not a directory"),
        (foreign, "owned by uid 12345"),
    ):
        with pytest.raises(ConfigError) as caught:
            check_run_dir(str(path))
        assert f"METALEG_RUN_DIR={str(path)!r}" in str(caught.value)
        assert fragment in str(caught.value)
    # A read-only file system: a read-only bind mount, in a mount namespace of its own.
    probe = (
        "import sys\n"
        "from metaleg.config import ConfigError, check_run_dir\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        check_run_dir(path)\n"
        "    except ConfigError as error:\n"
        "        print(error)\n"
    )
    script = (
        f"mount --bind {readonly} {readonly} && mount -o remount,bind,ro {readonly} && "
        f'{sys.executable} -c "$0" {readonly}/sub {readonly}'
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, probe],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2, (result.stdout, result.stderr)
    assert "cannot be created: no permission to write in" in lines[0]
    assert "no permission to write in it" in lines[1]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("AUDIT_LOG", "yes"), ("AUDIT_LOG_RATE", "0"), ("LOG_LEVEL_LIBRARIES", "trace")],
)
def test_the_supervisor_refuses_bad_audit_and_log_values_with_exit_2(
    variable: str, value: str
) -> None:
    supervisor = os.path.join(os.path.dirname(sys.executable), "metaleg-supervisor")
    result = subprocess.run(
        [supervisor, "run"],
        env={"PATH": os.environ["PATH"], "NODE_NAME": "n", variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{variable}={value!r}" in lines[0], result.stderr
