"""Receipts: the handle a lease hands out, ``<message id>.<lease token>.<queue uid>``.

The token is the sequence number of the record that granted the lease, so a later delivery
of the same message always carries a different receipt. The queue uid (random per queue
incarnation) keeps a receipt from a deleted queue from matching a new queue of the same name.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from shared.errors import InvalidRequest

_RECEIPT = re.compile(r"([0-9]{1,20})\.([0-9]{1,20})\.([0-9a-f]{16})")
_MAX_U64 = (1 << 64) - 1


class Receipt(NamedTuple):
    msg_id: int
    token: int
    queue_uid: str

    def __str__(self) -> str:
        return f"{self.msg_id}.{self.token}.{self.queue_uid}"

    @classmethod
    def parse(cls, text: object) -> Receipt:
        """Parse a receipt; raise ``InvalidRequest`` (400) if it is not one."""
        found = _RECEIPT.fullmatch(text) if isinstance(text, str) else None
        if found is None or int(found[1]) > _MAX_U64 or int(found[2]) > _MAX_U64:
            raise InvalidRequest("malformed receipt", field="receipt")
        return cls(int(found[1]), int(found[2]), found[3])
