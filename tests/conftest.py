from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip kernel tests with a clear reason where they cannot run (not root, no ip netns)."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root for network namespaces"
    elif shutil.which("ip") is None:
        reason = "needs iproute2"
    if reason is None:
        return
    for item in items:
        if "netns" in item.keywords or "lab" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
