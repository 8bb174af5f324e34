"""Which provider entry created a Responses id (SPEC §9): the Responses API keeps state
upstream, so a request continuing a response (`previous_response_id`) and every
`/v1/responses/{id}` path must reach the entry that made it."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

CAPACITY = 100_000
TTL = 24 * 3600.0
# The first `"id"` string of a responses answer: the response's own id, which leads the
# JSON object and, in a stream, the `response` of response.created (the first event).
_ID = re.compile(rb'"id"[ \t]*:[ \t]*"([A-Za-z0-9_.:-]{1,256})"')


@dataclass(frozen=True, slots=True)
class Creator:
    slug: str  # the slug the client used: the `model` its later answers carry
    provider: str
    upstream_model: str
    at: float


class ResponseIds:
    """An LRU of id -> Creator, at most `capacity` ids, each kept `ttl` seconds. Written
    by the relay (remember) and read by the endpoints (find), all on the event loop."""

    def __init__(
        self,
        capacity: int = CAPACITY,
        ttl: float = TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.clock = clock
        self._ids: OrderedDict[str, Creator] = OrderedDict()
        # With Redis: every new id also goes there, for the other workers and replicas.
        self.mirror: Callable[[str, Creator], None] | None = None

    def remember(self, response_id: str, slug: str, provider: str, upstream_model: str) -> None:
        ids = self._ids
        creator = ids[response_id] = Creator(slug, provider, upstream_model, self.clock())
        if self.mirror is not None:
            self.mirror(response_id, creator)
        ids.move_to_end(response_id)
        while len(ids) > self.capacity:
            ids.popitem(last=False)

    def find(self, response_id: str) -> Creator | None:
        found = self._ids.get(response_id)
        if found is None:
            return None
        if self.clock() - found.at > self.ttl:
            del self._ids[response_id]
            return None
        return found

    def __len__(self) -> int:
        return len(self._ids)


def first_id(data: bytes) -> str | None:
    """The response id in an answer's first bytes (JSON body or first events)."""
    found = _ID.search(data, 0, 64 * 1024)
    return found.group(1).decode() if found else None
