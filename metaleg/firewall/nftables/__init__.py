"""The nftables firewall backend: ``table inet metaleg`` through libnftables.

One module per concern, each importing only those listed before it:

- :mod:`.libnftables` — the ctypes binding of libnftables: run nft scripts, read JSON listings.
- :mod:`.layout` — the table's layout: its sets, maps and chains, the static rules, and why.
- :mod:`.content` — what the sets and maps hold (``TableContent``), in canonical form.
- :mod:`.scripts` — the nft scripts (one transaction each): the whole table, or a diff.
- :mod:`.incremental` — the applied table (``AppliedTable``) and a change's step, costing
  what it changes.
- :mod:`.counters` — per-Service counts: the count sets' per-source counters read over
  netlink and summed per Service, family and action.
- :mod:`.kernel` — reading the table back from the kernel and what differs from the desired.
- :mod:`.drift` — drift detection over the kernel's nftables notifications.
- :mod:`.backend` — ``NftablesBackend``: apply, re-sync, cleanup, which flows each call outdated.
"""
