"""``python -m metaleg.firewall``: the firewall worker process (started by the supervisor)."""

from metaleg.lifecycle import start_worker
from metaleg.worker import DataplaneWorker


def main() -> None:
    config = start_worker("firewall")
    from metaleg.firewall.selection import build_firewall

    raise SystemExit(DataplaneWorker("firewall", build_firewall(config), config).run())


main()
