"""Round-robin HTTP proxy in front of plain vLLM replicas: the aggregated
baseline of the benchmarks (the same GPUs serving prefill and decode together).

    python benchmarks/rr_proxy.py --port 8000 \
        --backend http://127.0.0.1:8100 --backend http://127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import itertools

import aiohttp
from aiohttp import web

TIMEOUT = aiohttp.ClientTimeout(total=600)
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


def make_app(backends: list[str]) -> web.Application:
    turn = itertools.cycle(backends)
    app = web.Application()

    async def start(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        app["session"] = aiohttp.ClientSession(timeout=TIMEOUT, connector=connector)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        url = next(turn) + request.path_qs
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS
        }
        body = await request.read()
        async with app["session"].request(
            request.method, url, data=body, headers=headers
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_HEADERS:
                    response.headers[name] = value
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", action="append", required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.backend), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
