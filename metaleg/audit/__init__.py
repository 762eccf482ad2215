"""The SNAT audit log: one line per new connection this node SNATs to a LoadBalancer IP.

``python -m metaleg.audit`` is a process of its own under the supervisor
(``AUDIT_LOG=on``), so that reading conntrack events never delays rule
application: the firewall never waits for it. Its parts, one concern each:

- :mod:`.listener`: conntrack NEW events over netlink (``NFNLGRP_CONNTRACK_NEW``),
  decoded with :mod:`metaleg.firewall.wire.conntrack`; counts events the kernel
  dropped because the socket's buffer was full;
- :mod:`.records`: which Service an event belongs to (the desired state's SNAT
  sources and LB IPs) and the fields of its line;
- :mod:`.ratelimit`: the ``AUDIT_LOG_RATE`` bound and the once-per-burst reports;
- :mod:`.process`: the loop around them and the desired state from the supervisor.
"""
