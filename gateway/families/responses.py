"""Which provider entry created a Responses id, and for which tenant (SPEC §9, §13): the
Responses API keeps state upstream, so a request continuing a response
(`previous_response_id`) and every `/v1/responses/{id}` path must reach the entry that
made it, and only the key that made it may name it."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import ResponseNotFound

PER_KEY = 10_000  # each key's share of the map (--response-ids-per-key)
# A gateway without keys has one tenant, which keeps at least SPEC §9's 100,000 ids.
ANONYMOUS_SHARE = 100_000
TTL = 24 * 3600.0
ANONYMOUS = ""  # the one tenant of a gateway without keys
# The first `"id"` string of a responses answer: the response's own id, which leads the
# JSON object and, in a stream, the `response` of response.created (the first event).
_ID = re.compile(rb'"id"[ \t]*:[ \t]*"([A-Za-z0-9_.:-]{1,256})"')


@dataclass(frozen=True, slots=True)
class Creator:
    slug: str  # the slug the client used: the `model` its later answers carry
    provider: str
    upstream_model: str
    at: float
    owner: str = ANONYMOUS  # the key that made it


class ResponseIds:
    """Per tenant, an LRU of id -> Creator: at most `per_key` ids each (one key's traffic
    never evicts another's), each kept `ttl` seconds after its last use. An id belongs to
    the first tenant that made it: an upstream repeating an id cannot hand it to
    another. Written by the relay (remember) and read by the endpoints (find), all on
    the event loop."""

    def __init__(
        self,
        per_key: int = PER_KEY,
        ttl: float = TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_key = per_key
        self.ttl = ttl
        self.clock = clock
        self._by_owner: dict[str, OrderedDict[str, Creator]] = {}
        self._owner: dict[str, str] = {}  # id -> its owner, across every share
        # With Redis: every new id also goes there, for the other workers and replicas.
        self.mirror: Callable[[str, Creator], None] | None = None

    def remember(
        self, response_id: str, slug: str, provider: str, upstream_model: str,
        owner: str = ANONYMOUS,
    ) -> None:  # fmt: skip
        if response_id in self._owner:
            return  # the first creator keeps it
        share = self._by_owner.get(owner)
        if share is None:
            share = self._by_owner[owner] = OrderedDict()
        creator = share[response_id] = Creator(slug, provider, upstream_model, self.clock(), owner)
        self._owner[response_id] = owner
        if self.mirror is not None:
            self.mirror(response_id, creator)
        cap = self.per_key if owner != ANONYMOUS else max(self.per_key, ANONYMOUS_SHARE)
        while len(share) > cap:
            gone, _ = share.popitem(last=False)
            del self._owner[gone]

    def find(self, response_id: str, owner: str = ANONYMOUS) -> Creator | None:
        """The id's creator when `owner` made it; None for an id never seen here;
        ResponseNotFound for another tenant's, told as if unknown. A find is a use: the
        id moves to the end of its owner's LRU."""
        made_by = self._owner.get(response_id)
        if made_by is not None and made_by != owner:
            raise not_found(response_id)
        share = self._by_owner.get(owner)
        found = None if share is None else share.get(response_id)
        if found is None or share is None:
            return None
        now = self.clock()
        if now - found.at > self.ttl:
            del share[response_id]
            del self._owner[response_id]
            return None
        share[response_id] = Creator(found.slug, found.provider, found.upstream_model, now, owner)
        share.move_to_end(response_id)
        return found

    def drop(self, response_id: str, owner: str) -> None:
        """This process's copy of an id made for `owner`, gone (another replica's owner
        made it first)."""
        if self._owner.get(response_id) == owner:
            del self._owner[response_id]
            del self._by_owner[owner][response_id]

    def forget(self, owners: set[str]) -> None:
        """Keys gone on reload: their ids go with them (SPEC §8)."""
        for owner in owners:
            for response_id in self._by_owner.pop(owner, {}):
                del self._owner[response_id]

    def held_by(self, owner: str) -> int:
        share = self._by_owner.get(owner)
        return 0 if share is None else len(share)

    def __len__(self) -> int:
        return len(self._owner)


def not_found(response_id: str) -> ResponseNotFound:
    """The one answer for an id this tenant may not name: the same as for an id never
    made, so it tells nothing of who made it or with which model."""
    return ResponseNotFound(
        f"no response {response_id!r} is known to this gateway", {"response_id": response_id}
    )


def first_id(data: bytes) -> str | None:
    """The response id in an answer's first bytes (JSON body or first events)."""
    found = _ID.search(data, 0, 64 * 1024)
    return found.group(1).decode() if found else None
