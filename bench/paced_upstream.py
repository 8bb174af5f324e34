"""A paced SSE upstream for `make bench` (scenarios 4 and 5): stdlib asyncio only.

Any POST gets a chunked `text/event-stream` answer: `bench_events` chat.completion.chunk
events (from the JSON request body; default 50), one every `bench_interval_ms` (default
20), then a finish event, a usage event and `data: [DONE]`. Every paced event carries
`"t"`: time.time_ns() taken just before its write, so a client can measure the relay
delay of each event. Every event carries content, so a gateway's late commit (which holds
events before the first content) does not show up as a relay delay. With
`"bench_role": true` (the SPEC §15 stream) a role event without content and without a
stamp goes first, at once, and content event i follows (i + 1) intervals later: the
gateway holds the role event until the first content, as it would a real model's.
Connections are kept alive. Usage: `paced_upstream.py --port PORT` (always 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)
EVENT = (
    b'data: {"id":"chatcmpl-paced","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"upstream-model","choices":[{"index":0,"delta":{"content":"tok "},'
    b'"finish_reason":null}],"t":%d}\n\n'
)
# The first content event of a role stream also carries "r": time.time_ns() when the
# request was read, so a client can take the upstream's own time (its pacing timer) out
# of the time to first token.
FIRST = EVENT.replace(b',"t":', b',"r":%d,"t":')
TAIL = (
    b'data: {"id":"chatcmpl-paced","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"upstream-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"chatcmpl-paced","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"upstream-model","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":%d,"total_tokens":%d}}\n\n'
    b"data: [DONE]\n\n"
)
ROLE = (
    b'data: {"id":"chatcmpl-paced","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"upstream-model","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"finish_reason":null}]}\n\n'
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return bytes(body)
        body += await reader.readexactly(size + 2)
        del body[-2:]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes, int] | None:
    """(method, body, time.time_ns() once read) of the next request on the connection;
    None when it closes."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        method = lines[0].split(b" ", 1)[0]
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return method, await read_chunked(reader), time.time_ns()
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        return method, body, time.time_ns()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        return None


def pace(body: bytes) -> tuple[float, int, bool]:
    """(interval in seconds, content events, role event first) from the request body."""
    try:
        fields = json.loads(body)
        return (
            float(fields.get("bench_interval_ms", 20)) / 1000,
            int(fields.get("bench_events", 50)),
            bool(fields.get("bench_role", False)),
        )
    except (ValueError, AttributeError, TypeError):
        return 0.02, 50, False


async def stream(
    writer: asyncio.StreamWriter, interval: float, events: int, role: bool = False, read_ns: int = 0
) -> bool:
    """Write one paced response; False when the client went away."""
    loop = asyncio.get_running_loop()
    writer.write(HEAD + chunk(ROLE) if role else HEAD)
    start = loop.time() + (interval if role else 0.0)
    for i in range(events):
        delay = start + i * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if writer.is_closing():
            return False
        if role and i == 0:
            writer.write(chunk(FIRST % (read_ns, time.time_ns())))
        else:
            writer.write(chunk(EVENT % time.time_ns()))
    writer.write(chunk(TAIL % (events, events + 9)) + b"0\r\n\r\n")
    await writer.drain()
    return True


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (request := await read_request(reader)) is not None:
            method, body, read_ns = request
            if method != b"POST":
                writer.write(NOT_FOUND)
                continue
            interval, events, role = pace(body)
            if not await stream(writer, interval, events, role, read_ns):
                break
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:  # uvloop when installed: a cheaper upstream holds more streams on the load core
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(main(args.port))
