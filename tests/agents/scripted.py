"""The scripted upstream the coding agents talk to: Anthropic's Messages API (Claude Code)
and OpenAI's Responses API (Codex), streamed as the real ones stream, on 127.0.0.1.

tests/scripted_upstream.py answers a queue in order; an agent sends side requests of its
own (titles, warm-ups, model lists) in an order no test controls, so here every reply is
chosen from the request itself:
- a request whose last user turn holds a tool result gets the final text, quoting the
  tool's output (so the test can see the tool ran);
- a request whose prompt holds TOOL_TRIGGER and that offers a shell tool gets a call of
  that tool running TOOL_COMMAND;
- anything else gets TEXT_ANSWER.

It serves on a LoopThread (tests/agents/loopback.py), so a test can run an agent with a
blocking subprocess call while it answers. It records every request and
every WebSocket handshake; a handshake is answered 426 (an HTTP-only Responses server,
which is what Codex falls back from after one try).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.agents.loopback import LoopThread

TOOL_TRIGGER = "RUN-THE-TOOL"
# Its output, "ran-42", is not in the command: seeing it proves the shell ran it.
TOOL_COMMAND = "echo ran-$((6*7))"
TOOL_OUTPUT = "ran-42"
TEXT_ANSWER = "Hello from the scripted upstream."
FINAL_PREFIX = "The tool said: "

MAX_BODY = 16 * 1024 * 1024  # an agent's request carries its whole conversation
MAX_STORED = 1000  # stored responses (a test makes a handful)
IDLE_TIMEOUT = 60.0  # an idle keep-alive connection ends after this

SHELL_TOOLS = ("Bash", "exec_command", "shell_command", "shell")


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


class ScriptedUpstream:
    """Serves on `loop` from construction; `url` is the root (an OpenAI-style base URL
    adds /v1)."""

    def __init__(self, loop: LoopThread) -> None:
        self.requests: list[Seen] = []
        self.handshakes: list[Seen] = []
        self._ids = itertools.count(1)
        # Stored responses (those not sent with `store: false`): id -> the whole
        # conversation up to and including its output, for `previous_response_id`.
        self._stored: dict[str, list[Any]] = {}
        self.port = loop.serve(self._serve)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def forget(self) -> None:
        """Start a new record (between one agent run and the next)."""
        self.requests.clear()
        self.handshakes.clear()

    async def _read(self, reader: asyncio.StreamReader) -> Seen | None:
        """The next request, or None at the end of the connection (or a malformed or
        oversized request: the connection then ends too)."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            body = await _read_body(reader, headers)
        except (asyncio.IncompleteReadError, TimeoutError, ValueError):
            return None
        path, _, query = target.partition("?")
        return Seen(method, path, query, headers, body)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (seen := await self._read(reader)) is not None:
            if seen.headers.get("upgrade", "").lower() == "websocket":
                self.handshakes.append(seen)
                writer.write(_json_head(426, 0, close=True))
                await writer.drain()
                return
            self.requests.append(seen)
            for part in self._answer(seen):
                writer.write(part)
            await writer.drain()

    def _answer(self, seen: Seen) -> Iterator[bytes]:
        body = seen.json()
        if seen.method == "POST" and seen.path.endswith("/messages/count_tokens"):
            yield from _json(200, {"input_tokens": max(1, len(seen.body) // 4)})
        elif seen.method == "POST" and seen.path.endswith("/messages") and body:
            yield from self._messages(body)
        elif seen.method == "POST" and seen.path.endswith("/responses") and body:
            yield from self._responses(body)
        elif seen.method == "GET" and seen.path.endswith("/models"):
            yield from _json(200, {"object": "list", "data": []})
        else:
            yield from _json(404, {"error": {"message": "not scripted", "type": "not_found"}})

    # --- Anthropic Messages -----------------------------------------------------------

    def _messages(self, body: dict[str, Any]) -> Iterator[bytes]:
        model = str(body.get("model", ""))
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        tools = {t.get("name") for t in body.get("tools") or () if isinstance(t, dict)}
        result = _tool_result_text(last.get("content"))
        block: dict[str, Any]
        if result is not None:
            block, stop = {"type": "text", "text": FINAL_PREFIX + _heard(result)}, "end_turn"
        elif TOOL_TRIGGER in _text_of(last.get("content")) and "Bash" in tools:
            call = {"command": TOOL_COMMAND, "description": "Print a number"}
            block = {"type": "tool_use", "id": f"toolu_{next(self._ids):04d}", "name": "Bash",
                     "input": call}  # fmt: skip
            stop = "tool_use"
        else:
            block, stop = {"type": "text", "text": TEXT_ANSWER}, "end_turn"
        msg_id = f"msg_{next(self._ids):04d}"
        usage = {"input_tokens": 12, "output_tokens": 6}
        if not body.get("stream"):
            yield from _json(200, {"id": msg_id, "type": "message", "role": "assistant",
                                   "model": model, "content": [block], "stop_reason": stop,
                                   "stop_sequence": None, "usage": usage})  # fmt: skip
            return
        start = {"id": msg_id, "type": "message", "role": "assistant", "model": model,
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": 12, "output_tokens": 1}}  # fmt: skip
        events: list[tuple[str, dict[str, Any]]] = [("message_start", {"message": start})]
        if block["type"] == "text":
            events += [
                ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
                ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": block["text"]}}),
            ]  # fmt: skip
        else:
            opened = {**block, "input": {}}
            partial = json.dumps(block["input"])
            events += [
                ("content_block_start", {"index": 0, "content_block": opened}),
                ("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": partial}}),
            ]  # fmt: skip
        events += [
            ("content_block_stop", {"index": 0}),
            ("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": 6}}),
            ("message_stop", {}),
        ]  # fmt: skip
        yield _sse_head()
        for name, data in events:
            yield _chunk(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n")
        yield b"0\r\n\r\n"

    # --- OpenAI Responses -------------------------------------------------------------

    def _responses(self, body: dict[str, Any]) -> Iterator[bytes]:
        model = str(body.get("model", ""))
        items = body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items or []
        last = items[-1] if items else {}
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in self._stored:
                # As OpenAI answers it: a response made with store: false is kept by no
                # one but a WebSocket that is still open (WebSocket mode's own cache).
                message = f"Previous response with id '{previous}' not found."
                yield from _json(400, {"error": {"message": message, "type": "invalid_request_error",
                                                 "param": "previous_response_id",
                                                 "code": "previous_response_not_found"}})  # fmt: skip
                return
            items = self._stored[previous] + items
        tools = {t.get("name") or t.get("type") for t in body.get("tools") or ()
                 if isinstance(t, dict)}  # fmt: skip
        shell = next((name for name in SHELL_TOOLS if name in tools), None)
        item: dict[str, Any]
        n = next(self._ids)
        if last.get("type") == "function_call_output":
            text = FINAL_PREFIX + _heard(_output_text(last.get("output")))
            item = _message_item(f"msg_{n:04d}", text)
        elif shell is not None and TOOL_TRIGGER in _text_of(_last_user(items)):
            item = {"type": "function_call", "id": f"fc_{n:04d}", "call_id": f"call_{n:04d}",
                    "name": shell, "arguments": json.dumps(_shell_arguments(shell)),
                    "status": "completed"}  # fmt: skip
        else:
            item = _message_item(f"msg_{n:04d}", TEXT_ANSWER)
        response: dict[str, Any] = {"id": f"resp_{n:04d}", "object": "response",
                                    "created_at": 1700000000, "status": "in_progress",
                                    "model": model, "output": []}  # fmt: skip
        usage = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": 18}  # fmt: skip
        done = {**response, "status": "completed", "output": [item], "usage": usage}
        if body.get("store") is not False and len(self._stored) < MAX_STORED:
            self._stored[response["id"]] = [*items, item]
        if not body.get("stream"):
            yield from _json(200, done)
            return
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": response}),
            ("response.output_item.added", {"output_index": 0, "item": {**item, "status": "in_progress"}}),
        ]  # fmt: skip
        if item["type"] == "message":
            text = item["content"][0]["text"]
            events.append(("response.output_text.delta", {"item_id": item["id"], "output_index": 0,
                                                          "content_index": 0, "delta": text}))  # fmt: skip
        else:
            events.append(("response.function_call_arguments.delta",
                           {"item_id": item["id"], "output_index": 0, "delta": item["arguments"]}))  # fmt: skip
        events += [
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": done}),
        ]
        yield _sse_head()
        for seq, (name, data) in enumerate(events):
            payload = {"type": name, "sequence_number": seq, **data}
            yield _chunk(f"event: {name}\ndata: {json.dumps(payload)}\n\n")
        yield b"0\r\n\r\n"


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """Content-Length or chunked, at most MAX_BODY (ValueError past it)."""
    if "content-length" in headers:
        size = int(headers["content-length"])
        if size > MAX_BODY:
            raise ValueError("body too large")
        return await reader.readexactly(size)
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    parts: list[bytes] = []
    total = 0
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
        total += size
        if total > MAX_BODY:
            raise ValueError("body too large")
        parts.append((await reader.readexactly(size + 2))[:-2])
    await reader.readuntil(b"\r\n")  # the empty trailer
    return b"".join(parts)


def _shell_arguments(tool: str) -> dict[str, Any]:
    if tool == "exec_command":
        return {"cmd": TOOL_COMMAND}
    if tool == "shell_command":
        return {"command": TOOL_COMMAND}
    return {"command": ["bash", "-lc", TOOL_COMMAND]}


def _message_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip


def _last_user(items: list[Any]) -> Any:
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role") == "user":
            return item.get("content")
    return None


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or its blocks' text joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def _tool_result_text(content: Any) -> str | None:
    """The text of an Anthropic tool_result block in a user turn, or None."""
    if not isinstance(content, list):
        return None
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            inner = block.get("content")
            return inner if isinstance(inner, str) else _text_of(inner)
    return None


def _heard(output: str) -> str:
    """What the final answer quotes: TOOL_OUTPUT if the tool's output holds it (agents
    wrap it in reminders, chunk ids and exit codes), else that nothing came."""
    return TOOL_OUTPUT if TOOL_OUTPUT in output else "nothing"


def _output_text(output: Any) -> str:
    """A function_call_output's output: a string, or content items with text."""
    return output if isinstance(output, str) else _text_of(output)


def _json_head(status: int, length: int, close: bool = False) -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n"
    return (head + ("connection: close\r\n" if close else "") + "\r\n").encode()


def _json(status: int, obj: Any) -> Iterator[bytes]:
    body = json.dumps(obj).encode()
    yield _json_head(status, len(body)) + body


def _sse_head() -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )


def _chunk(text: str) -> bytes:
    data = text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)
