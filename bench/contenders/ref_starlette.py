"""Reference: sse-starlette's EventSourceResponse on Starlette + uvicorn, as its README
shows it (an async generator of dict events), uvicorn with its defaults (httptools, uvloop).

    python bench/contenders/ref_starlette.py [--port P] [--keep] [SOURCE]
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from common import Hub, announce, listen, parse_args, read_lines
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

ARGS = parse_args("ref-starlette")
HUB = Hub() if ARGS.keep else None


async def from_source() -> AsyncIterator[dict[str, str]]:
    event_id = 0
    async for line in read_lines(ARGS.source):
        event_id += 1
        yield {"id": str(event_id), "data": line}


async def from_hub(hub: Hub) -> AsyncIterator[dict[str, str]]:
    queue = hub.subscribe()
    try:
        while (item := await queue.get()) is not None:
            yield {"id": str(item[0]), "data": item[1]}
    finally:
        hub.unsubscribe(queue)


async def stream(request: Request) -> EventSourceResponse:
    return EventSourceResponse(from_hub(HUB) if HUB else from_source())


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    reader = asyncio.create_task(HUB.run(ARGS.source)) if HUB else None
    yield
    if reader is not None:
        reader.cancel()


def main() -> None:
    app = Starlette(routes=[Route("/", stream)], lifespan=lifespan)
    sock = listen(ARGS.host, ARGS.port)
    announce("ref-starlette", sock)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
