"""The ``iptables`` firewall backend: legacy iptables/ip6tables rules plus ipsets.

What is where, from the desired state down to the kernel:

* :mod:`.rules`: the rule vocabulary (:class:`~.rules.Rule`, :class:`~.rules.TableSpec`),
  the chain and set names and a constructor per rule metaleg writes;
* :mod:`.render`: a desired state -> every set and table (the kernel layout is
  described there);
* :mod:`.policy`: destination policies: which sources are policed, their classes and
  ports, the policy sets and what a change does to them;
* :mod:`.counters`: the per-Service counters, from the counted sets' members;
* :mod:`.incremental`: the step between two states, from the Services that differ
  (sets' members only unless a rule changes);
* :mod:`.backend`: :class:`~.backend.IptablesBackend`, which carries a change out
  make-before-break: ipsets around one commit per table and family;
* :mod:`.ipsets`: set descriptions, set plans and the batched netlink client;
* :mod:`.helper_client`: the backend's side of the helper processes (start, send,
  receive, stop);
* :mod:`.protocol`: the messages between backend and helper;
* :mod:`.helper`: the helper process (one per family, since python-iptables serves
  one family per process), which edits tables through libiptc;
* :mod:`.codec`: the helper's rule buffers, assembled from cached parts and
  compared as raw bytes;
* :mod:`.chain_diff`: the edit operations between two rule sequences;
* :mod:`.drift`: the periodic check of metaleg's chains, jumps and sets against
  what it last wrote.

Nothing is imported here, so that the helper process (``python -m
metaleg.firewall.iptables.helper``) loads only what it uses.
"""
