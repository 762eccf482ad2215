"""``python -m metaleg.firewall``: the firewall worker process (started by the supervisor)."""

from metaleg.lifecycle import start_worker
from metaleg.worker import DataplaneWorker


def main() -> None:
    config = start_worker("firewall")
    from metaleg.firewall.selection import build_firewall, report_unusable

    firewall = build_firewall(config)
    report_unusable(config, firewall)
    raise SystemExit(DataplaneWorker("firewall", firewall, config).run())


main()
