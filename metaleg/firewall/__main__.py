"""``python -m metaleg.firewall``: the firewall worker process (started by the supervisor)."""

from metaleg.lifecycle import start_worker
from metaleg.worker import DataplaneWorker


def main() -> None:
    config = start_worker("firewall")
    from metaleg.firewall.iptables import IptablesBackend

    raise SystemExit(DataplaneWorker("firewall", IptablesBackend(), config).run())


main()
