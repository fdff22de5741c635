"""Reference: aiohttp's web server with aiohttp-sse's `sse_response`, as its README shows
it (`await resp.send(data, id=...)` per event), on aiohttp's default asyncio loop.

    python bench/contenders/ref_aiohttp.py [--port P] [--keep] [SOURCE]
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp_sse import sse_response
from common import Hub, announce, listen, parse_args, read_lines

ARGS = parse_args("ref-aiohttp")
HUB = Hub() if ARGS.keep else None


async def stream(request: web.Request) -> web.StreamResponse:
    async with sse_response(request) as response:
        if HUB is None:
            event_id = 0
            async for line in read_lines(ARGS.source):
                event_id += 1
                await response.send(line, id=str(event_id))
        else:
            queue = HUB.subscribe()
            try:
                while (item := await queue.get()) is not None:
                    await response.send(item[1], id=str(item[0]))
            finally:
                HUB.unsubscribe(queue)
    return response


async def hub_reader(app: web.Application) -> AsyncIterator[None]:
    reader = asyncio.create_task(HUB.run(ARGS.source)) if HUB else None
    yield
    if reader is not None:
        reader.cancel()


def main() -> None:
    app = web.Application()
    app.router.add_get("/", stream)
    app.cleanup_ctx.append(hub_reader)
    sock = listen(ARGS.host, ARGS.port)
    announce("ref-aiohttp", sock)
    web.run_app(app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
