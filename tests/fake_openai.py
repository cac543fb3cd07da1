"""A stand-in for a vLLM OpenAI server (router tests without vLLM): ``/health``,
``/v1/models``, ``/v1/completions`` (streamed or not). Each answer names this server, so a
test can tell where the router sent a request. Usage: fake_openai.py NAME READY_FILE.

Test hooks, by prompt: ``sleep:S`` answers after S seconds, ``die:NAME`` makes the stand-in
NAME exit at once without an answer (after reading the whole request), ``status:N`` answers HTTP N. A JSON answer carries
the ``Authorization`` header it got, if any; ``/count`` says how many completions arrived."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

name, ready = sys.argv[1], Path(sys.argv[2])
app = FastAPI()
received = 0


@app.get("/count")
async def count():
    return {"completions": received}


@app.get("/health")
async def health():
    return {}


@app.get("/v1/models")
async def models():
    return {"object": "list", "data": [{"id": "model", "owned_by": name}]}


@app.post("/v1/completions")
async def completions(request: Request):
    global received
    received += 1
    body = await request.json()
    prompt = str(body.get("prompt", ""))
    if prompt.startswith("sleep:"):
        await asyncio.sleep(float(prompt[6:]))
    elif prompt == f"die:{name}":
        os._exit(1)
    elif prompt.startswith("status:"):
        return JSONResponse({"error": name}, status_code=int(prompt[7:]))
    if body.get("stream"):
        async def events():
            for i in range(3):
                chunk = {"choices": [{"index": 0, "text": f"{name}-{i} "}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(0.01)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"choices": [{"index": 0, "text": name}],
                         "max_tokens": body.get("max_tokens"),
                         **({"authorization": request.headers["authorization"]}
                            if "authorization" in request.headers else {})})


sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(64)
server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))


async def main():
    async def announce():
        while not server.started:
            await asyncio.sleep(0.02)
        ready.write_text(f"http://127.0.0.1:{sock.getsockname()[1]}")
    task = asyncio.create_task(announce())
    await server.serve(sockets=[sock])
    task.cancel()

asyncio.run(main())
