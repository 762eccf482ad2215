from __future__ import annotations

import subprocess

import pytest

from tests.netns import namespace, run_in_netns


def _own_namespace_inode() -> int:
    import os

    return os.stat("/proc/self/ns/net").st_ino


@pytest.mark.netns
def test_run_in_netns_runs_inside_and_namespace_is_deleted() -> None:
    import os

    root_inode = os.stat("/proc/self/ns/net").st_ino
    with namespace("mlt-help") as name:
        inside = run_in_netns(name, _own_namespace_inode)
        assert inside != root_inode
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in listed


def _fail() -> None:
    raise ValueError("boom")


@pytest.mark.netns
def test_run_in_netns_reports_child_errors() -> None:
    with namespace("mlt-help") as name, pytest.raises(RuntimeError, match="ValueError: boom"):
        run_in_netns(name, _fail)
