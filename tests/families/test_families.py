"""Pure parts of the API families (SPEC §9): classification, nested splices, usage,
Anthropic's error types, the Responses id map."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.families import CHAT, COMPLETIONS, MESSAGES, MESSAGES_TOKENS, RESPONSES, endpoints
from gateway.families.envelopes import anthropic_type
from gateway.families.responses import ResponseIds, first_id
from gateway.wire.sse import CONTENT, DONE, ERROR, NOTHING, NestedSplicer, splicer_for
from gateway.wire.usage import Tally, usage_tokens


def ev(kind: str, named: bool = True, **data: object) -> bytes:
    head = f"event: {kind}\n" if named else ""
    return (head + "data: " + orjson.dumps({"type": kind, **data}).decode() + "\n\n").encode()


@pytest.mark.parametrize(
    ("family", "event", "kind"),
    [
        (RESPONSES, ev("response.created", response={}), NOTHING),
        (RESPONSES, ev("response.in_progress"), NOTHING),
        (RESPONSES, ev("response.output_text.delta", delta="x"), CONTENT),
        (RESPONSES, ev("response.function_call_arguments.delta", delta="{"), CONTENT),
        (RESPONSES, ev("response.output_item.added", item={}), CONTENT),
        (RESPONSES, ev("response.completed", response={}), CONTENT),
        (RESPONSES, ev("response.failed", response={}), ERROR),
        (RESPONSES, ev("error", named=False, message="x"), ERROR),
        (MESSAGES, ev("message_start", message={}), NOTHING),
        (MESSAGES, ev("ping"), NOTHING),
        (MESSAGES, ev("content_block_start", index=0), CONTENT),
        (MESSAGES, ev("content_block_delta", index=0), CONTENT),
        (MESSAGES, ev("message_delta"), CONTENT),
        (MESSAGES, ev("message_stop"), CONTENT),
        (MESSAGES, b"event: error\ndata: {}\n\n", ERROR),
        (MESSAGES, b": comment\n\n", NOTHING),
        (RESPONSES, b"data: [DONE]\n\n", DONE),
        (CHAT, b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n', CONTENT),
        (CHAT, b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n', NOTHING),
    ],
)
def test_each_family_says_what_is_content_and_error(
    family: object, event: bytes, kind: int
) -> None:
    assert family.classify(event) == kind  # type: ignore[attr-defined]


def test_nested_splice_rewrites_only_the_named_objects_model() -> None:
    splicer = NestedSplicer(b'"m"', ("response",))
    event = (
        b'event: response.created\ndata: {"type":"response.created","model":"top",'
        b'"response":{"id":"r","tools":[{"model":"tool"}],"model":"up","x":1}}\n\n'
    )
    out = splicer.event(event)
    assert orjson.loads(out.split(b"data: ")[1])["response"]["model"] == "m"
    assert b'"model":"top"' in out and b'{"model":"tool"}' in out
    delta = ev("response.output_text.delta", delta='say "model": no')
    assert splicer.block(delta + event) == delta + out
    assert splicer_for(("message",), b'"m"').block(b"data: {}\n\n") == b"data: {}\n\n"


def test_messages_usage_merges_start_and_running_output() -> None:
    tally = Tally(False)
    usage = {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 2}
    tally.block(ev("message_start", message={"usage": usage}))
    tally.block(ev("message_delta", usage={"output_tokens": 5}))
    tally.block(ev("message_delta", usage={"output_tokens": 9}))
    assert tally.usage is not None and usage_tokens(tally.usage) == 10 + 2 + 9
    responses = Tally(False)
    responses.block(ev("response.completed", response={"usage": {"input_tokens": 3,
                                                                  "output_tokens": 4,
                                                                  "total_tokens": 7}}))  # fmt: skip
    assert responses.usage is not None and usage_tokens(responses.usage) == 7
    assert usage_tokens({"prompt_tokens": 2, "completion_tokens": 3}) == 5


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (413, "invalid_request_error"),
     (422, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
     (404, "not_found_error"), (429, "rate_limit_error"), (503, "overloaded_error"),
     (529, "overloaded_error"), (500, "api_error"), (502, "api_error"), (504, "api_error")],
)  # fmt: skip
def test_anthropic_error_types(status: int, kind: str) -> None:
    assert anthropic_type(status) == kind
    error = GatewayError("boom")
    error.status = status
    for family in (MESSAGES, MESSAGES_TOKENS):
        assert orjson.loads(family.error_body(error)) == {
            "type": "error", "error": {"type": kind, "message": "boom"}
        }  # fmt: skip
    assert CHAT.error_body(error) == RESPONSES.error_body(error) == error.body()


def test_each_family_writes_its_own_error_event() -> None:
    exc = GatewayError("boom")
    exc.status, exc.type, exc.code = 504, "server_error", "upstream_timeout"
    chat = {"error": {"message": "boom", "type": "server_error", "code": "upstream_timeout"}}
    assert CHAT.error_event(exc) == b"data: " + orjson.dumps(chat) + b"\n\n"
    assert COMPLETIONS.error_event(exc) == CHAT.error_event(exc)
    typed = {"type": "error", "code": "upstream_timeout", "message": "boom", "param": None}
    assert RESPONSES.error_event(exc) == b"event: error\ndata: " + orjson.dumps(typed) + b"\n\n"
    anthropic = {"type": "error", "error": {"type": "api_error", "message": "boom"}}
    assert MESSAGES.error_event(exc) == b"event: error\ndata: " + orjson.dumps(anthropic) + b"\n\n"


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b'{"error":{"code":429,"message":"x"}}', 429),
        (b'{"error":{"code":"429"}}', 502),  # a string code is not a status
        (b'{"error":{"code":600}}', 502),
        (b'{"error":{"type":"overloaded_error"}}', 529),
        (b'{"error":{"type":"rate_limit_error"}}', 429),
        (b'{"error":{"type":"api_error"}}', 500),
        (b'{"error":{"type":"invalid_request_error"}}', 502),  # not one that fails over
        (b'{"error":{"type":["x"]}}', 502),
        (b'{"error":"x"}', 502),
        (b'{"type":"response.failed"}', 502),
        (b"not json", 502),
        (b"", 502),
    ],
)
def test_inband_error_status(payload: bytes, status: int) -> None:
    for family in (CHAT, RESPONSES, MESSAGES):
        assert family.inband_status(payload) == status


def test_only_responses_remembers_ids() -> None:
    table = endpoints()
    assert {ep.family.name for ep in table.values() if ep.family.remembers_ids} == {"responses"}
    assert RESPONSES.remembers_ids and not table["/v1/responses/input_tokens"].family.remembers_ids


def test_response_ids_are_bounded_and_expire() -> None:
    now = [0.0]
    ids = ResponseIds(per_key=3, ttl=10.0, clock=lambda: now[0])
    for i in range(4):
        ids.remember(f"r{i}", "m", "p", "up", "k")
    assert len(ids) == 3 and ids.find("r0", "k") is None  # the oldest went
    found = ids.find("r3", "k")
    assert found is not None and (found.slug, found.provider) == ("m", "p")
    now[0] = 10.5
    assert ids.find("r1", "k") is None and len(ids) == 2


def test_first_id_is_the_responses_own() -> None:
    body = b'{"id":"resp_1","object":"response","output":[{"id":"msg_2"}]}'
    assert first_id(body) == "resp_1"
    assert first_id(ev("response.created", response={"id": "resp_3"})) == "resp_3"
    assert first_id(b'{"object":"response"}') is None


def test_every_family_path_under_every_prefix() -> None:
    table = endpoints()
    for prefix in ("/v1", "", "/api/v1", "/openai/v1"):
        assert table[prefix + "/responses"].family is RESPONSES
        assert table[prefix + "/messages"].family is MESSAGES
        assert table[prefix + "/messages/count_tokens"].upstream_path == "/messages/count_tokens"
    assert len(table) == 4 * 13


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b'{"type":"x","response":{"object":"response","model":"a"}}', 23),
        (b'{"a":[1],"response":{"model":"a"}}', 20),  # a container first: the member scan
        (b'{"type":"x","response":"response"}', None),  # not an object
        (b'{"type":"response"}', None),
        (b'{"x":{"response":{}}}', None),  # nested deeper: not this object's member
    ],
)
def test_object_start_finds_only_a_top_level_object_member(line: bytes, want: int | None) -> None:
    from gateway.wire.jsonscan import object_start

    assert object_start(line, b'"response"') == want


def test_response_ids_keep_at_least_100k_for_a_day() -> None:
    """SPEC §9's 100,000 for the one tenant of a gateway without keys; each key of a
    gateway with keys has its own share (SPEC §13, tests/e2e/test_tenancy.py)."""
    ids = ResponseIds()
    assert ids.ttl >= 24 * 3600
    for i in range(100_000):
        ids.remember(f"r{i}", "m", "p", "up")
    assert ids.find("r0") is not None and len(ids) == 100_000
