"""Netfilter's netlink messages on the wire, encoded and decoded with ``struct``.

:mod:`.nfnetlink` is the framing (headers, attributes, a socket for batches and
dumps) that :mod:`.ipset` and :mod:`.conntrack` build on; :mod:`.ipset_members`
decodes many set members in one pass, :mod:`.ipset_counters` reads members'
counters, :mod:`.ipset_ports` writes ``hash:ip,port`` members as runs of ports.
Nothing here knows a Service or a backend: these modules only speak the kernel's
protocols.
"""
