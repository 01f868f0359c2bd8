"""The apps `bench/web.py` measures: one trivial FastAPI app, served by Flare's ingress
(`api`) and, for the baseline, by uvicorn directly on the host (`make_app()`)."""

import asyncio
import os
from typing import Any

import flare
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse, StreamingResponse

app = flare.App(os.environ.get("FLARE_WEB_BENCH_APP", "webbench"))


def make_app() -> Any:
    # No `from __future__ import annotations` here: FastAPI reads the routes' annotations
    # (WebSocket) at run time.
    web = FastAPI()

    @web.get("/")
    async def root() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @web.get("/stream")
    async def stream() -> StreamingResponse:
        async def gen() -> Any:
            yield "first\n"
            await asyncio.sleep(0.05)
            yield "second\n"

        return StreamingResponse(gen(), media_type="text/plain")

    @web.websocket("/ws")
    async def ws(sock: WebSocket) -> None:
        await sock.accept()
        while True:
            msg = await sock.receive()
            if msg["type"] == "websocket.disconnect":
                return
            await sock.send_text(msg.get("text") or "")

    return web


@app.function(scaledown_window=300, min_containers=1)
@flare.concurrent(max_inputs=1000)
@flare.asgi_app()
def api() -> Any:
    return make_app()


@app.function(scaledown_window=0)
@flare.fastapi_endpoint()
def cold() -> str:
    return "ok"


@app.function(scaledown_window=0)
def cold_remote() -> str:
    return "ok"
