"""Network namespaces for tests: unique names, guaranteed deletion, code run inside.

Every namespace a test creates goes through :func:`namespace` (a context
manager) so that it is deleted even when the test fails. Code that must run in
a namespace runs in a child process (:func:`run_in_netns`): kernel interfaces
like python-iptables act on the namespace of the calling process, and a fresh
process also sidesteps python-iptables' one-address-family-per-process limit.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import subprocess
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_counter = itertools.count()


def unique_name(prefix: str) -> str:
    """A namespace name unique to this process: ``<prefix>-<pid>-<n>`` (at most 15 chars is not needed)."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def sh(*args: str, check: bool = True, netns: str | None = None, timeout: float = 30) -> str:
    """Run a command (optionally inside a namespace) and return its stdout."""
    command = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def create_namespace(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "link", "set", "lo", "up", netns=name)


def delete_namespace(name: str) -> None:
    """Delete a namespace, killing whatever still runs in it first."""
    pids = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def namespace(prefix: str = "mlt") -> Iterator[str]:
    """Create a uniquely named namespace with lo up; always delete it afterwards."""
    name = unique_name(prefix)
    create_namespace(name)
    try:
        yield name
    finally:
        delete_namespace(name)


def _child(conn: Any, name: str, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        from pyroute2 import netns as pyroute2_netns

        pyroute2_netns.setns(name)
        conn.send(("ok", function(*args)))
    except BaseException as error:
        conn.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_in_netns(name: str, function: Callable[..., T], *args: Any, timeout: float = 60) -> T:
    """Run ``function(*args)`` in a fresh child process inside namespace ``name``; return its result.

    The function and its result must be picklable; an exception in the child is
    re-raised here as ``RuntimeError`` with the child's traceback.
    """
    context = multiprocessing.get_context("fork")
    parent_conn, child_conn = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(child_conn, name, function, args))
    process.start()
    child_conn.close()
    try:
        if not parent_conn.poll(timeout):
            raise TimeoutError(
                f"{getattr(function, '__name__', function)} in {name} took over {timeout}s"
            )
        status, value = parent_conn.recv()
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if status == "error":
        raise RuntimeError(f"in namespace {name}: {value}")
    return value  # type: ignore[no-any-return]
