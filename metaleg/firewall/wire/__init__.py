"""Netfilter's netlink messages on the wire, encoded and decoded with ``struct``.

:mod:`.nfnetlink` is the framing (headers, attributes, a socket for batches and
dumps) that :mod:`.ipset` and :mod:`.conntrack` build on. Nothing here knows a
Service or a backend: these modules only speak the kernel's protocols.
"""
