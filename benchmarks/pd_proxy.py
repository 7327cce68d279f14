"""Minimal 1P1D proxy for vLLM's own NixlConnector, our peer in the benchmarks.

vLLM's NIXL deployment needs a router in front: it sends each completion to
the prefill server with ``max_tokens=1`` and ``do_remote_decode``, then sends
the original request plus the prefill's ``kv_transfer_params`` to the decode
server and streams that answer back. pdserve does this inside the consumer
and needs no proxy; this one exists only to measure the peer.

    python benchmarks/pd_proxy.py --port 8000 \
        --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import json

import aiohttp
from aiohttp import web

PREFILL_ONLY = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
TIMEOUT = aiohttp.ClientTimeout(total=600)


def prefill_request(path: str, body: dict) -> dict:
    request = {k: v for k, v in body.items() if k != "stream_options"}
    request.update(max_tokens=1, stream=False, kv_transfer_params=PREFILL_ONLY)
    if path.endswith("chat/completions"):
        request["max_completion_tokens"] = 1
    return request


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    session: aiohttp.ClientSession = request.app["session"]
    prefill_url, decode_url = request.app["prefill"], request.app["decode"]
    async with session.post(
        prefill_url + request.path, json=prefill_request(request.path, body)
    ) as prefill:
        if prefill.status != 200:
            return web.Response(status=prefill.status, body=await prefill.read())
        params = (await prefill.json()).get("kv_transfer_params")
    async with session.post(
        decode_url + request.path, json=dict(body, kv_transfer_params=params)
    ) as decode:
        response = web.StreamResponse(
            status=decode.status,
            headers={"content-type": decode.headers.get("content-type", "")},
        )
        await response.prepare(request)
        async for chunk in decode.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps({"ok": True}))


def make_app(prefill: str, decode: str) -> web.Application:
    app = web.Application()
    app["prefill"], app["decode"] = prefill.rstrip("/"), decode.rstrip("/")

    async def open_session(app: web.Application):
        app["session"] = aiohttp.ClientSession(
            timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0)
        )
        yield
        await app["session"].close()

    app.cleanup_ctx.append(open_session)
    app.router.add_post("/v1/completions", forward)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", required=True)
    parser.add_argument("--decode", required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(args.prefill, args.decode), host=args.host, port=args.port, print=None
    )


if __name__ == "__main__":
    main()
