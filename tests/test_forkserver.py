"""The fork server (metaleg.forkserver) with real processes: what a forked worker
inherits, how its end is reported, and what happens when either side dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from metaleg.config import Config
from metaleg.forkserver import ForkedProcess, ForkServer, ForkServerError
from metaleg.lifecycle import CONFIG_ENVIRONMENT
from tests.processes import process_alive, process_name
from tests.waiting import wait_until

CHILD = "tests.forkserver_child"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ForkServer]:
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "FORKSERVER_TEST_DIR": str(tmp_path),
        "METALEG_TEST_MARK": "from-the-supervisor",
        CONFIG_ENVIRONMENT: msgspec.json.encode(Config(node_name="node-a")).decode(),
    }
    forkserver = ForkServer(environment, stop_grace=10)
    try:
        yield forkserver
    finally:
        pids = list(forkserver.children)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        forkserver.close()
        for pid in pids:
            wait_until(lambda pid=pid: not process_alive(pid), timeout=10, message=f"{pid} gone")


def _report(tmp_path: Path, child: ForkedProcess) -> dict[str, Any]:
    path = tmp_path / f"{child.pid}.json"
    wait_until(path.exists, timeout=15, message=f"{child.name} reporting")
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def test_a_worker_is_forked_with_the_common_modules_loaded(
    server: ForkServer, tmp_path: Path
) -> None:
    child = server.start("sleep", CHILD)
    report = _report(tmp_path, child)
    assert server.process is not None
    assert report["ppid"] == server.process.pid  # forked by the server, not started anew
    assert report["main"] == "__main__"  # run as `python -m` would
    assert report["preloaded"] is True  # metaleg.worker and zmq were there before it ran
    assert report["frozen"] > 1000  # the server froze its objects out of the collector's way
    assert report["config"] == "from-the-supervisor"  # the environment the server got
    # It ends with the server, which told it its pid for the check that it is still there.
    assert report["parent_death_signal"] == signal.SIGTERM
    assert report["parent_environment"] == str(server.process.pid)
    assert process_name(child.pid) == "metaleg-sleep"
    assert process_name(server.process.pid) == "metaleg-fork"
    assert child.poll() is None
    child.send_signal(signal.SIGTERM)
    assert child.wait(10) == -signal.SIGTERM
    assert child.poll() == -signal.SIGTERM
    child.send_signal(signal.SIGTERM)  # ended: nothing is signalled, nothing raised


def test_exit_statuses_are_reported_like_popen(server: ForkServer) -> None:
    exits = server.start("exit3", CHILD)
    crashes = server.start("crash", CHILD)
    assert exits.wait(10) == 3
    assert crashes.wait(10) == 1  # an exception: the traceback on stderr, status 1
    with pytest.raises(subprocess.TimeoutExpired):
        server.start("sleep", CHILD).wait(0.2)


def test_a_dead_server_counts_its_workers_dead_and_stops_them(
    server: ForkServer, tmp_path: Path
) -> None:
    first = server.start("sleep", CHILD)
    _report(tmp_path, first)
    assert server.process is not None
    old_server = server.process.pid
    os.kill(old_server, signal.SIGKILL)

    def noticed() -> bool:
        server.receive()  # what the supervisor's loop does when the channel is readable
        return first.poll() is not None

    wait_until(noticed, timeout=10, message="the loss noticed")
    assert first.returncode == -signal.SIGKILL
    assert server.lost == [first]
    server.reap_lost(timeout=10)
    assert not process_alive(first.pid)  # no second copy of a worker can run
    assert server.lost == []
    second = server.start("sleep", CHILD)  # a new server
    assert server.process is not None and server.process.pid != old_server
    assert _report(tmp_path, second)["ppid"] == server.process.pid


def test_the_server_and_its_workers_end_with_the_supervisor(
    server: ForkServer, tmp_path: Path
) -> None:
    child = server.start("sleep", CHILD)
    _report(tmp_path, child)
    assert server.process is not None and server.channel is not None
    server_pid = server.process.pid
    server.channel.close()  # what the supervisor's death does to the channel
    server.channel = None
    wait_until(lambda: server.process.poll() is not None, timeout=10, message="server gone")  # type: ignore[union-attr]
    wait_until(lambda: not process_alive(child.pid), timeout=10, message="worker gone")
    assert not process_alive(server_pid)
    server.children.clear()


def test_a_server_that_cannot_start_is_a_clear_error() -> None:
    # A "python" that exits at once: the server ends before it says it is ready.
    server = ForkServer({"PATH": "/usr/bin:/bin"}, stop_grace=10, python="/bin/false")
    try:
        with pytest.raises(ForkServerError, match="ended before the fork server's start"):
            server.start("sleep", CHILD)
        assert server.process is None and server.channel is None
    finally:
        server.close()


def test_a_malformed_request_is_dropped_and_the_server_goes_on(server: ForkServer) -> None:
    first = server.start("exit3", CHILD)
    assert server.channel is not None
    server.channel.send(b"\xc1 not msgpack")
    assert first.wait(10) == 3
    assert server.start("exit3", CHILD).wait(10) == 3


def test_a_server_that_died_between_starts_is_replaced_by_the_next_start(
    server: ForkServer, tmp_path: Path
) -> None:
    first = server.start("sleep", CHILD)
    _report(tmp_path, first)
    assert server.process is not None
    old_server = server.process
    old_server.kill()
    old_server.wait()
    second = server.start("sleep", CHILD)  # no ForkServerError: the loss is found first
    assert first.returncode == -signal.SIGKILL
    assert not process_alive(first.pid)
    assert server.process is not None and server.process is not old_server
    assert _report(tmp_path, second)["ppid"] == server.process.pid
