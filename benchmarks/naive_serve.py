"""The servers a user writes first, as baselines for `bench_serve.py` (benchmark code, not K-Cloud).

A FastAPI app over Hugging Face `transformers`' `generate` with an OpenAI-compatible
`POST /v1/completions` (streamed as server-sent events, `stream_options.include_usage`) and
`GET /v1/models`, in one of two modes:

- `sequential`: one request at a time; the others wait in line.
- `static`: static batching: wait for `--batch` requests or `--wait-ms` after the first, left-pad
  them into one batch, `generate` it to the longest request's length, then take the next batch.

Both stream each token as `generate` produces it (a streamer per batch) and honour `max_tokens`,
vLLM's `min_tokens` and `ignore_eos` so that output lengths are fixed for a benchmark.

    python benchmarks/naive_serve.py --model DIR --mode static --batch 8 --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


@dataclass
class Job:
    """One accepted completion: its prompt ids, lengths, and where its tokens go."""

    ids: list[int]
    max_tokens: int
    min_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)

    def push(self, tok: int | None) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, tok)


class _BatchStreamer(BaseStreamer):
    """Hands each generated token of row i to job i, until that job has its `max_tokens`."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.sent = [0] * len(jobs)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call hands over the prompt itself
            self.prompt_seen = True
            return
        for i, tok in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[i]
            if self.sent[i] < job.max_tokens:
                self.sent[i] += 1
                job.push(int(tok))
                if self.sent[i] == job.max_tokens:
                    job.push(None)

    def end(self) -> None:
        for i, job in enumerate(self.jobs):
            if self.sent[i] < job.max_tokens:  # stopped early at EOS
                self.sent[i] = job.max_tokens
                job.push(None)


class Generator:
    """One thread that owns the model and runs `generate` on jobs from a queue."""

    def __init__(self, model_dir: str, mode: str, batch: int, wait_s: float) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.context = int(self.model.config.max_position_embeddings)
        self.eos = self.model.config.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else (self.eos if isinstance(self.eos, int) else 0)
        self.mode, self.batch, self.wait_s = mode, batch if mode == "static" else 1, wait_s
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="generate").start()

    def _loop(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    jobs.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
            self._generate(jobs)

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        width = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):  # left padding, as decoder-only batched generation needs
            ids[i, width - len(j.ids):] = torch.tensor(j.ids)
            mask[i, width - len(j.ids):] = 1
        longest = max(j.max_tokens for j in jobs)
        try:
            self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                min_new_tokens=max(j.min_tokens for j in jobs), do_sample=False,
                pad_token_id=self.pad, streamer=_BatchStreamer(jobs))
        except Exception:  # a failed batch ends its streams instead of leaving them hanging
            for j in jobs:
                j.push(None)
            raise


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    # The OpenAI error body.
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": None}})


def make_app(model_dir: str, *, mode: str = "sequential", batch: int = 8,
             wait_s: float = 0.05, served_name: str | None = None) -> FastAPI:
    gen = Generator(model_dir, mode, batch, wait_s)
    name = served_name or model_dir
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "naive"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        if body.get("model") != name:
            return _error(404, f"model '{body.get('model')}' does not exist", "model")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = gen.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            return _error(400, "prompt must be a string or a list of token ids", "prompt")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_tokens must be an integer of at least 1", "max_tokens")
        if len(ids) + max_tokens > gen.context:
            return _error(400, f"prompt ({len(ids)}) plus max_tokens ({max_tokens}) exceed the "
                          f"context of {gen.context} tokens", "max_tokens")
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
        job = Job(list(ids), max_tokens, min(min_tokens, max_tokens), asyncio.get_running_loop())
        gen.jobs.put(job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": finish}]}

        usage = {"prompt_tokens": len(ids), "completion_tokens": 0}

        async def tokens() -> AsyncIterator[int]:
            while (tok := await job.out.get()) is not None:
                usage["completion_tokens"] += 1
                yield tok

        if not body.get("stream"):
            out = [t async for t in tokens()]
            resp = chunk(gen.tokenizer.decode(out), "length")
            resp["usage"] = {**usage, "total_tokens": len(ids) + len(out)}
            return resp

        async def events() -> AsyncIterator[str]:
            async for tok in tokens():
                yield f"data: {json.dumps(chunk(gen.tokenizer.decode([tok]), None))}\n\n"
            yield f"data: {json.dumps(chunk('', 'length'))}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                n = usage["completion_tokens"]
                yield "data: " + json.dumps({
                    "id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [], "usage": {**usage, "total_tokens": len(ids) + n}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--mode", choices=("sequential", "static"), default="sequential")
    ap.add_argument("--batch", type=int, default=8, help="static: requests per batch")
    ap.add_argument("--wait-ms", type=float, default=50.0, help="static: wait for a full batch")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own choice)")
    ap.add_argument("--served-name", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    a = ap.parse_args()
    import uvicorn

    if a.threads is not None:
        torch.set_num_threads(a.threads)

    uvicorn.run(make_app(a.model, mode=a.mode, batch=a.batch, wait_s=a.wait_ms / 1e3,
                         served_name=a.served_name), host=a.host, port=a.port,
                log_level="warning")


if __name__ == "__main__":
    main()
