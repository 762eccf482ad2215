"""Process checks shared by the tests that start real processes."""

from __future__ import annotations

from metaleg.lifecycle import process_running, process_stat, process_tree


def process_state(pid: int) -> str:
    """The state letter of ``/proc/<pid>/stat`` (``R``, ``S``, ``Z``...; '' when gone)."""
    stat = process_stat(pid)
    return stat[0] if stat is not None else ""


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (not gone, not a zombie waiting to be reaped)."""
    return process_running(pid)


def process_name(pid: int) -> str:
    """``/proc/<pid>/comm`` ('' when gone): the fork server names each worker it forks
    ``metaleg-<worker>`` (15 bytes kept: ``metaleg-firewal``)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    return process_tree().get(pid, [])


def agent_processes(supervisor_pid: int) -> dict[str, int]:
    """The processes of a running ``metaleg-supervisor run``, by name: ``forkserver`` (the
    supervisor's child) and the workers forked from it (``watcher``, ``firewall``,
    ``routing``, ``audit``), told apart by their process names. Dead ones (zombies
    not yet reaped) are left out."""
    found: dict[str, int] = {}
    workers = {f"metaleg-{name}"[:15]: name for name in ("watcher", "firewall", "routing", "audit")}
    for child in children_of(supervisor_pid):
        if process_name(child) != "metaleg-fork" or not process_alive(child):
            continue
        found["forkserver"] = child
        for worker in children_of(child):
            name = workers.get(process_name(worker))
            if name is not None and process_alive(worker):
                found[name] = worker
    return found
