"""The nftables firewall backend: ``table inet metaleg`` through libnftables.

- :mod:`.backend` — :class:`~.backend.NftablesBackend`, the backend itself.
- :mod:`.drift` — drift detection over the kernel's nftables notifications.
- :mod:`.libnftables` — the ctypes binding of libnftables.
"""
