"""Reading the packet and byte counters of an ipset's members.

A set created with the ``counters`` extension keeps, per member, the packets and
bytes of every lookup that found the member (unless the rule's set match says
``! --update-counters``). The iptables backend reads them for its per-Service
counters (:meth:`metaleg.firewall.iptables.backend.IptablesBackend.read_counts`):
a few sets of tens of thousands of members, every few seconds, one listing per set,
decoded by :class:`~metaleg.firewall.wire.ipset_members.MemberDecoder` (one
``struct`` pass per message).
"""

from __future__ import annotations

import errno

from metaleg.firewall.wire.ipset import (
    ATTR_ADT,
    ATTR_PROTOCOL,
    ATTR_SETNAME,
    IpsetError,
    IpsetSocket,
    _string,
    _u8,
)
from metaleg.firewall.wire.ipset_members import MemberDecoder
from metaleg.firewall.wire.nfnetlink import NFGEN, parse_attributes

MemberCount = tuple[bytes, int, int]
"""(packed address, bytes, packets) of one member: the kernel's order of the attributes,
so that the members of a message are unpacked as they are."""


class IpsetCounterReader(IpsetSocket):
    """Lists one set at a time with its members' counters (one dump request per set)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = MemberDecoder(("address", "bytes", "packets"))

    def counters(self, name: str) -> list[MemberCount] | None:
        """Every member of set ``name`` with its counters; None when there is no such set.

        Members of a set without the counters extension are not listed."""
        self._open()
        attributes = _u8(ATTR_PROTOCOL, self._protocol) + _string(ATTR_SETNAME, name)
        counts: list[MemberCount] = []
        try:
            for payload in self._list(attributes):
                for attribute, value in parse_attributes(payload, NFGEN.size):
                    if attribute == ATTR_ADT:
                        counts.extend(self.decoder.decode(value))
        except IpsetError as error:
            if error.code == errno.ENOENT:
                return None
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        return counts
