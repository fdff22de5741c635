"""The per-connection cost of sserelay's HTTP protocol (http/server.py).

uvicorn's httptools protocol keeps 28 attributes in each instance dict; CPython shares one
dict layout among a class's instances only up to 30 keys, so state that sserelay adds per
connection lives in slots: an idle SSE client then costs 1.5 KiB less (bench: fanout).
"""

from __future__ import annotations

import asyncio

from starlette.types import Receive, Scope, Send

from sserelay.http import server
from tests.conftest import run_bounded as run


def test_the_protocol_keeps_its_own_state_out_of_the_instance_dict() -> None:
    seen: list[set[str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        protocol = scope["extensions"]["sserelay.abort"]["abort"].__self__
        seen.append(set(vars(protocol)))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> None:
        sock = server.listen("127.0.0.1", 0)
        finished = asyncio.Event()
        serving = asyncio.create_task(
            server.serve_app(app, sock, finished=finished, on_signal=None)
        )
        try:
            port = sock.getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert b"\r\nok\r\n" in await reader.read()
            writer.close()
            await writer.wait_closed()
        finally:
            finished.set()
            await serving
            sock.close()

    run(scenario())
    ours = set(server._HttpProtocol.__slots__)
    assert seen and seen[0].isdisjoint(ours), seen[0] & ours
    assert len(seen[0]) <= 30  # CPython's bound on a shared dict layout
