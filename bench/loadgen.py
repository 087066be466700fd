"""A lean closed-loop HTTP/1.1 load generator for loopback benchmarks.

Each client owns one keep-alive connection and sends its next request when the previous answer has
been read, so latency is what a waiting caller sees. Requests are pre-encoded and responses parsed
only as far as the status line and Content-Length: the generator shares the machine with the server,
and a general-purpose client (httpx costs ~3 ms of CPU per request here) would take the CPU the
server needs and measure itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LevelResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0


def encode_post(host: str, port: int, path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Status code of one response, its body read and dropped (Content-Length framing only)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length:
        await reader.readexactly(length)
    return status


async def run_closed_loop(
    host: str, port: int, clients: int, requests: int, make_request: Callable[[], bytes], cap_s: float
) -> LevelResult:
    """`clients` connections share `requests` requests (or stop at `cap_s`); latencies of 200s only."""
    result = LevelResult()
    remaining = requests
    deadline = time.monotonic() + cap_s

    async def one_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal remaining
        try:
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                request = make_request()
                started = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                elapsed = (time.perf_counter() - started) * 1000
                if status == 200:
                    result.latencies_ms.append(elapsed)
                else:
                    result.errors += 1
        finally:
            writer.close()

    # Every client connects and has one answer before the clock starts, as keep-alive clients of a
    # running service have: a server busy answering accepts new connections late (uvloop here), which
    # would time connection set-up instead of requests.
    connections = [await asyncio.open_connection(host, port) for _ in range(clients)]
    for _reader, writer in connections:
        writer.write(make_request())
    await asyncio.gather(*(_read_response(reader) for reader, _writer in connections))
    started = time.perf_counter()
    await asyncio.gather(*(one_client(reader, writer) for reader, writer in connections))
    result.wall_s = time.perf_counter() - started
    return result


def run(coroutine):
    """Run on uvloop when it is installed (it comes with uvicorn[standard]): less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
