"""A stand-in worker for tests/test_forkserver.py, run by the fork server as ``__main__``.

What it does depends on the name it was started under (``/proc/self/comm`` is
``metaleg-<name>``): ``exit3`` exits with status 3, ``crash`` raises, ``sleep`` writes
what it sees to ``$FORKSERVER_TEST_DIR/<pid>.json`` (the parent-death signal the
fork server set for it, among others) and sleeps until a signal.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import time

from metaleg.lifecycle import PARENT_ENVIRONMENT, _libc

_PR_GET_PDEATHSIG = 2
PRELOADED_AT_START = "metaleg.worker" in sys.modules and "zmq" in sys.modules


def main() -> None:
    with open("/proc/self/comm") as comm:
        name = comm.read().strip().removeprefix("metaleg-")
    if name == "exit3":
        raise SystemExit(3)
    if name == "crash":
        raise RuntimeError("a worker that crashes")
    signal_number = ctypes.c_int()
    _libc().prctl(_PR_GET_PDEATHSIG, ctypes.byref(signal_number), 0, 0, 0)  # type: ignore[union-attr]
    report = {
        "parent_death_signal": signal_number.value,
        "parent_environment": os.environ.get(PARENT_ENVIRONMENT),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "name": name,
        "main": __name__,
        "preloaded": PRELOADED_AT_START,
        "frozen": gc.get_freeze_count(),
        "config": os.environ.get("METALEG_TEST_MARK", ""),
    }
    path = os.path.join(os.environ["FORKSERVER_TEST_DIR"], f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as file:
        json.dump(report, file)
    os.rename(path + ".tmp", path)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
