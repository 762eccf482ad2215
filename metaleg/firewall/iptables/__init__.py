"""The ``iptables`` firewall backend: legacy iptables/ip6tables rules plus ipsets.

* :mod:`.backend`: :class:`~metaleg.firewall.iptables.backend.IptablesBackend`, rendering,
  the incremental diff and the parent side of the helper processes;
* :mod:`.helper`: the per-family helper process that edits tables with python-iptables;
* :mod:`.codec`: rule buffers for the helper, built from cached parts;
* :mod:`.ipsets`: set descriptions, set plans and the batched netlink client;
* :mod:`.drift`: the periodic drift check of legacy tables and ipsets.

Nothing is imported here: the helper process (``python -m
metaleg.firewall.iptables.helper``) loads only what it needs.
"""
