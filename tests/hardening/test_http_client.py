"""The load generator's HTTP/1.1 client against a scripted server on a real loopback socket: bodies by length and
chunked, answers split across packets, connections the server closes, malformed answers, timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from benchmarks.http_client import Answer, Connection, HttpError, request_bytes

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    length = next(
        (int(line.split(":")[1]) for line in head.split("\r\n") if line.lower().startswith("content-length")), 0
    )
    return head, await reader.readexactly(length)


def _exchange(script: Script, requests: list[bytes], timeout_s: float = 5.0) -> list[Answer | Exception]:
    """Each of `requests` sent in turn on one Connection to a server running `script` per connection."""

    async def main() -> list[Answer | Exception]:
        server = await asyncio.start_server(script, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        results: list[Answer | Exception] = []
        async with server, Connection(f"http://127.0.0.1:{port}") as connection:
            for request in requests:
                try:
                    results.append(await connection.send(request, timeout_s))
                except (HttpError, TimeoutError) as error:
                    results.append(error)
        return results

    return asyncio.run(main())


def test_requests_go_out_as_http_1_1_with_their_body() -> None:
    seen: list[tuple[str, bytes]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    requests = [request_bytes("POST", "h:1", "/v1/x", b'{"a": 1}'), request_bytes("GET", "h:1", "/healthz")]
    answers = _exchange(echo, requests)
    assert [a.status for a in answers if isinstance(a, Answer)] == [200, 200]  # one connection, kept alive
    (post, body), (get, empty) = seen
    assert post.startswith("POST /v1/x HTTP/1.1\r\nHost: h:1\r\n") and "Content-Length: 8" in post
    assert "Content-Type: application/json" in post and body == b'{"a": 1}'
    assert get.startswith("GET /healthz HTTP/1.1\r\n") and "Content-Length" not in get and empty == b""


def test_answers_split_across_packets_and_chunked_bodies_are_read_whole() -> None:
    async def awkward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        for piece in (b"HTTP/1.1 503 Service Unavailable\r\nRetry-", b"After: 1\r\nContent-Length: 4\r\n\r\nbu", b"sy"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        await _read_request(reader)
        chunked = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n6;x=y\r\npedia \r\n0\r\nT: 1\r\n\r\n"
        )
        for at in range(0, len(chunked), 7):
            writer.write(chunked[at : at + 7])
            await writer.drain()
            await asyncio.sleep(0.005)

    busy, chunked = _exchange(awkward, [request_bytes("GET", "h", "/a")] * 2)
    assert isinstance(busy, Answer) and (busy.status, busy.body, busy.headers["retry-after"]) == (503, b"busy", "1")
    assert isinstance(chunked, Answer) and (chunked.status, chunked.body) == (200, b"wikipedia ")


def test_a_connection_the_server_closes_is_opened_again_for_the_next_request() -> None:
    connections = 0

    async def one_answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n1")
        await writer.drain()
        writer.close()

    answers = _exchange(one_answer_each, [request_bytes("GET", "h", "/")] * 3)
    assert [a.status for a in answers if isinstance(a, Answer)] == [200, 200, 200] and connections == 3


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2xx OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\na body that only the end of the connection would delimit",
    ],
)
def test_a_malformed_answer_is_an_error(reply: bytes) -> None:
    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(reply)
        await writer.drain()

    (answer,) = _exchange(malformed, [request_bytes("GET", "h", "/")])
    assert isinstance(answer, HttpError)


def test_a_connection_closed_before_the_answer_ends_is_an_error_not_a_hang() -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    (answer,) = _exchange(cut_short, [request_bytes("GET", "h", "/")])
    assert isinstance(answer, HttpError) and "closed" in str(answer)


def test_a_late_answer_is_not_read_as_the_next_requests() -> None:
    count = 0

    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            count += 1
            if count == 1:
                await asyncio.sleep(0.3)
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{count}".encode())
            await writer.drain()

    late, next_one = _exchange(slow_first, [request_bytes("GET", "h", "/")] * 2, timeout_s=0.1)
    assert isinstance(late, TimeoutError)
    assert isinstance(next_one, Answer) and next_one.body == b"2"  # on a new connection, not the first's late "1"
