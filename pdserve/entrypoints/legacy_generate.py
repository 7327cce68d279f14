"""The ``POST /generate`` API of vLLM's retired ``vllm.entrypoints.api_server``.

``{"prompt": str, "stream": bool, **sampling_params}`` answers
``{"text": [prompt + completion, ...]}``; streaming sends one such JSON object
per line, each holding the text so far. It is served by translating to and
from ``/v1/completions``, so it takes the same path as every other request.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict], Awaitable[None]]


def to_completion_request(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ValueError("the request must be a JSON object")
    request = dict(payload)
    if not isinstance(request.get("prompt"), str):
        raise ValueError("'prompt' must be a string")
    request["stream"] = bool(request.get("stream", False))
    return request


def texts_from_choices(prompt: str, texts: dict[int, str]) -> dict[str, list[str]]:
    return {"text": [prompt + texts[i] for i in sorted(texts)]}


async def send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class BufferedReply:
    """Captures a non-streaming completion answer, then rewrites it."""

    def __init__(self, prompt: str, send: Send) -> None:
        self.prompt = prompt
        self.send = send
        self.status = 500
        self.chunks: list[bytes] = []

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self.finish()

    async def finish(self) -> None:
        body = b"".join(self.chunks)
        try:
            answer = json.loads(body or b"{}")
        except ValueError:
            answer = {"error": body.decode(errors="replace")}
        if self.status != 200:
            await send_json(self.send, self.status, answer)
            return
        texts = {c["index"]: c["text"] for c in answer.get("choices", [])}
        await send_json(self.send, 200, texts_from_choices(self.prompt, texts))


class StreamingReply:
    """Turns completion SSE events into newline-delimited ``{"text": [...]}``."""

    def __init__(self, prompt: str, send: Send) -> None:
        self.prompt = prompt
        self.send = send
        self.texts: dict[int, str] = {}
        self.pending = b""
        self.error: BufferedReply | None = None

    async def __call__(self, message: dict) -> None:
        if self.error is not None:
            await self.error(message)
        elif message["type"] == "http.response.start":
            if message["status"] != 200:
                self.error = BufferedReply(self.prompt, self.send)
                await self.error(message)
                return
            await self.send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")],
                }
            )
        elif message["type"] == "http.response.body":
            await self._events(message.get("body", b""))
            if not message.get("more_body", False):
                await self.send({"type": "http.response.body", "body": b""})

    async def _events(self, data: bytes) -> None:
        self.pending += data
        *events, self.pending = self.pending.split(b"\n\n")
        lines = []
        for event in events:
            payload = event.strip().removeprefix(b"data:").strip()
            if not payload or payload == b"[DONE]":
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                lines.append(json.dumps({"error": chunk["error"]}))
                continue
            for choice in chunk.get("choices", []):
                index = choice["index"]
                self.texts[index] = self.texts.get(index, "") + choice.get("text", "")
            lines.append(json.dumps(texts_from_choices(self.prompt, self.texts)))
        if lines:
            body = ("\n".join(lines) + "\n").encode()
            await self.send(
                {"type": "http.response.body", "body": body, "more_body": True}
            )
