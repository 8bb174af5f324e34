"""API families (SPEC §9) as data: what differs between chat, responses, messages and the
rest, so that the relay, late commit, usage and limits stay one path that asks.

A family says which body members it needs, where `model` lives in its stream events, what
counts as content and as an in-band error before the commit, whether the gateway may ask
a stream for usage on the client's behalf, which error envelope its clients read (its
error bodies and events: Envelope), and whether the ids it creates are remembered.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.families.envelopes import ANTHROPIC, OPENAI, OPENAI_TYPED, Envelope, inband_status
from gateway.wire.sse import CONTENT, ERROR, NOTHING, classify, read_payload


class Body(enum.Enum):
    JSON = "json"
    MULTIPART = "multipart"  # audio uploads: only the `model` part is rewritten
    NONE = "none"  # GET/DELETE by id: no body


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    # Members the body must have besides `model`; "messages" must be a non-empty list.
    required: tuple[str, ...] = ()
    # Where `model` sits in a stream event's JSON: () at the top level (chat's chunks),
    # ("response",) inside the top-level `response` object; None: events carry none.
    event_model: tuple[str, ...] | None = ()
    # Event `type`s that are content (typed streams: responses, messages); empty: the
    # chat chunk rules of sse.classify.
    content_types: frozenset[str] = frozenset()
    error_types: frozenset[str] = frozenset()
    # The gateway may add stream_options.include_usage (chat and completions only: the
    # other streams always carry usage).
    injects_usage: bool = False
    envelope: Envelope = OPENAI
    body: Body = Body.JSON
    # The answer may be binary (audio speech): `model` is rewritten only in JSON answers.
    binary_answer: bool = False
    # String members whose length stands for relayed text (a token estimate when a
    # stream ends without usage).
    content_fields: tuple[str, ...] = ("content", "text")
    # Token counting calls (Anthropic's count_tokens, Responses' input_tokens): never
    # charged tokens nor counted in rpm; their own count_tokens_rpm (SPEC §13).
    counts_only: bool = False
    # The `object` member of a count the gateway answers with its estimate (SPEC §14):
    # Responses' input_tokens has one, Anthropic's count_tokens none.
    count_object: str | None = None
    # A created response's id is remembered: the entry and key that made it (SPEC §9, §13).
    remembers_ids: bool = False

    def error_body(self, exc: GatewayError) -> bytes:
        """The body of an error answer, in the envelope this family's clients read."""
        return self.envelope.body(exc)

    def error_event(self, exc: GatewayError) -> bytes:
        """The one event that tells a committed stream's client it broke (the stream
        ends after it)."""
        return self.envelope.event(exc)

    def count_answer(self, tokens: int) -> bytes:
        """A counting call's answer from the gateway's own estimate, in the family's
        shape: {"input_tokens": N}."""
        head = (
            b"{" if self.count_object is None else b'{"object":"%s",' % self.count_object.encode()
        )
        return head + b'"input_tokens":%d}' % tokens

    def inband_status(self, payload: bytes) -> int:
        """The status an upstream's in-band error before the commit stands for (the
        payload of its error event): the HTTP error relayed if no other candidate serves."""
        return inband_status(payload)

    def classify(self, event: bytes) -> int:
        """CONTENT, ERROR, DONE or NOTHING for one event held before the commit."""
        if not self.content_types:
            return classify(event)
        name = _event_name(event)
        if name == b"error":
            return ERROR
        if name:
            # OpenAI's and Anthropic's streams name each event: no need to parse its JSON
            # (response.created carries the whole response object).
            named = name.decode("latin-1")
            if named in self.error_types:
                return ERROR
            return CONTENT if named in self.content_types else NOTHING
        obj = read_payload(event)
        if isinstance(obj, int):
            return obj
        kind = obj.get("type")
        if not isinstance(kind, str):
            return CONTENT
        if kind in self.error_types:
            return ERROR
        return CONTENT if kind in self.content_types else NOTHING


def _event_name(event: bytes) -> bytes | None:
    """The value of an `event:` line, if the event has one."""
    at = event.find(b"event:")
    if at < 0 or (at > 0 and event[at - 1] not in b"\r\n"):
        return None
    end = at + 6
    stop = len(event)
    for ending in (b"\r", b"\n"):
        found = event.find(ending, end)
        if 0 <= found < stop:
            stop = found
    return event[end:stop].strip()


CHAT = Family("chat", required=("messages",), injects_usage=True)
COMPLETIONS = Family("completions", required=("prompt",), injects_usage=True)
EMBEDDINGS = Family("embeddings", required=("input",), event_model=None)
RESPONSES = Family(
    "responses",
    event_model=("response",),
    content_types=frozenset(
        {
            "response.output_text.delta",
            "response.function_call_arguments.delta",
            "response.output_item.added",
            "response.completed",
        }
    ),
    error_types=frozenset({"response.failed", "error"}),
    envelope=OPENAI_TYPED,
    content_fields=("delta",),  # output_text.delta and function_call_arguments.delta
    remembers_ids=True,
)
MESSAGES = Family(
    "messages",
    required=("messages",),
    event_model=("message",),
    content_types=frozenset(
        {"content_block_start", "content_block_delta", "message_delta", "message_stop"}
    ),
    error_types=frozenset({"error"}),
    envelope=ANTHROPIC,
    content_fields=("text", "partial_json"),  # text_delta and input_json_delta
)
IMAGES = Family("images", required=("prompt",), event_model=None)
AUDIO_SPEECH = Family("audio", required=("input",), event_model=None, binary_answer=True)
AUDIO_UPLOAD = Family("audio", event_model=None, body=Body.MULTIPART)
MODERATIONS = Family("moderations", required=("input",), event_model=None)
RERANK = Family("rerank", required=("query", "documents"), event_model=None)
# Counting and lookups in the responses and messages families: same family, no stream.
RESPONSES_TOKENS = Family(
    "responses", event_model=None, counts_only=True, count_object="response.input_tokens"
)
MESSAGES_TOKENS = Family(
    "messages",
    required=("messages",),
    event_model=None,
    envelope=ANTHROPIC,
    counts_only=True,
)
RESPONSES_BY_ID = Family("responses", event_model=None, body=Body.NONE)

ALL = ("chat", "completions", "embeddings", "responses", "images", "audio", "moderations",
       "rerank", "messages")  # fmt: skip
# What a provider serves without `apis:` (SPEC §9): everything but messages, which only
# Anthropic-compatible upstreams speak.
DEFAULT_APIS = frozenset(ALL) - {"messages"}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One relayed path: its family and the path sent upstream (after the base URL)."""

    family: Family
    upstream_path: str


# Paths under each prefix (SPEC §9): "" and "/v1", "/api/v1", "/openai/v1".
RELAYED: dict[str, Family] = {
    "/chat/completions": CHAT,
    "/completions": COMPLETIONS,
    "/embeddings": EMBEDDINGS,
    "/responses": RESPONSES,
    "/responses/input_tokens": RESPONSES_TOKENS,
    "/messages": MESSAGES,
    "/messages/count_tokens": MESSAGES_TOKENS,
    "/images/generations": IMAGES,
    "/audio/speech": AUDIO_SPEECH,
    "/audio/transcriptions": AUDIO_UPLOAD,
    "/audio/translations": AUDIO_UPLOAD,
    "/moderations": MODERATIONS,
    "/rerank": RERANK,
}
PREFIXES = ("/v1", "", "/api/v1", "/openai/v1")
# Azure OpenAI's deployment paths: the slug is the deployment.
AZURE_DEPLOYMENT = {"chat/completions", "completions", "embeddings"}


def endpoints() -> dict[str, Endpoint]:
    """Every relayed path under every prefix -> its endpoint."""
    return {
        prefix + path: Endpoint(family, path)
        for prefix in PREFIXES
        for path, family in RELAYED.items()
    }
