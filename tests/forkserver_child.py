"""A stand-in worker for tests/test_forkserver.py, run by the fork server as ``__main__``.

What it does depends on the name it was started under (``/proc/self/comm`` is
``metaleg-<name>``): ``exit3`` exits with status 3, ``crash`` raises, ``sleep`` writes
what it sees to ``$FORKSERVER_TEST_DIR/<pid>.json`` and sleeps until a signal.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from metaleg.lifecycle import die_with_parent

PRELOADED_AT_START = "metaleg.worker" in sys.modules and "zmq" in sys.modules


def main() -> None:
    with open("/proc/self/comm") as comm:
        name = comm.read().strip().removeprefix("metaleg-")
    if name == "exit3":
        raise SystemExit(3)
    if name == "crash":
        raise RuntimeError("a worker that crashes")
    die_with_parent()
    report = {
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
