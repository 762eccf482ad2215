"""``python -m metaleg.routing``: the routing worker process (started by the supervisor)."""

from metaleg.lifecycle import start_worker
from metaleg.worker import DataplaneWorker


def main() -> None:
    config = start_worker("routing")
    from metaleg.routing.backend import NetlinkRoutingBackend

    backend = NetlinkRoutingBackend(config.route_table_id_offset, config.firewall_mask)
    raise SystemExit(DataplaneWorker("routing", backend, config, routes_only=True).run())


main()
