"""The HTTP service of one plan: an OpenAI-compatible API over the engine (FastAPI + uvicorn).

`/v1/completions` and `/v1/chat/completions` (server-sent events when `stream`), `/v1/models`,
`/v1/infer` for non-LLM models, `/health` (alive), `/ready` (workers up), `/metrics`
(Prometheus). Errors have OpenAI's body and status codes. Every timing is measured; in
emulated mode the engine paces its steps to the cost model's times, and responses say so
(`x-kcloud-figures: modeled`, and the metrics' `figures` label).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError

from kcloud.errors import KCloudError
from kcloud.runtime.engine import Engine, Event, Overloaded, RequestError
from kcloud.serve.async_engine import AsyncEngine, NotReady, Stream
from kcloud.serve.openai_api import (
    ChatRequest,
    CompletionRequest,
    InferRequest,
    _Sampling,
    error_body,
)

MAX_BODY_BYTES = 4 << 20
REQUEST_TIMEOUT_S = 600.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)


@dataclass
class ServeConfig:
    served_name: str
    model: str  # what the plan runs (zoo name or directory)
    figures: str  # "measured" | "modeled"
    llm: bool
    max_len: int = 0
    vocab: int = 0
    input_shape: tuple[int, ...] = ()  # non-LLM: one sample's shape
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout_s: float = REQUEST_TIMEOUT_S


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self, figures: str) -> None:
        self.registry = CollectorRegistry()
        self.figures = figures
        r = self.registry
        lab = ["figures"]
        self.requests = Counter("kcloud_requests", "Requests by outcome", ["status", "figures"],
                                registry=r)
        self.ttft = Histogram("kcloud_time_to_first_token_seconds", "Time to first token",
                              lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kcloud_time_per_output_token_seconds",
                              "Time per output token after the first", lab,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kcloud_e2e_request_latency_seconds", "End-to-end request latency",
                             lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.step = Histogram("kcloud_engine_step_seconds", "Engine loop turns that ran a step",
                              lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "kcloud_server_overhead_seconds", "A completed request's time in the server beyond "
            "the engine steps it ran in (queueing, scheduling, hand-offs, detokenization)",
            lab, buckets=_OVERHEAD_BUCKETS, registry=r)
        self.queue = Gauge("kcloud_queue_length", "Requests waiting", registry=r)
        self.loop_cpu = Gauge("kcloud_event_loop_cpu_seconds", "CPU time the server's event "
                              "loop thread has used (HTTP, parsing, streaming), measured",
                              registry=r)
        self.running = Gauge("kcloud_running_batch_size", "Sequences (or samples) running",
                             registry=r)
        self.kv_used = Gauge("kcloud_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_free = Gauge("kcloud_kv_blocks_free", "KV blocks free", registry=r)
        self.preemptions = Counter("kcloud_preemptions", "Sequences preempted (recomputed)",
                                   registry=r)
        self.restarts = Counter("kcloud_replica_restarts", "Replicas restarted after a fault",
                                registry=r)
        self.tokens = Counter("kcloud_generation_tokens", "Tokens generated", lab, registry=r)
        self.prompt_tokens = Counter("kcloud_prompt_tokens", "Prompt tokens received", lab,
                                     registry=r)
        self._seen = {"preemptions": 0, "restarts": 0}
        for m in (self.ttft, self.tpot, self.e2e, self.step, self.overhead, self.tokens,
                  self.prompt_tokens):
            m.labels(figures)  # present (at zero) before the first request
        self.requests.labels("200", figures)

    def on_step(self, eng: Engine, events: list[Event], seconds: float) -> None:
        st = eng.stats()
        self.queue.set(st["waiting"])
        self.running.set(st["running"])
        self.kv_used.set(st["kv_blocks_used"])
        self.kv_free.set(st["kv_blocks_free"])
        for key, metric in (("preemptions", self.preemptions), ("restarts", self.restarts)):
            if st[key] > self._seen[key]:
                metric.inc(st[key] - self._seen[key])
                self._seen[key] = st[key]
        n = sum(len(e.tokens) for e in events)
        if n:
            self.tokens.labels(self.figures).inc(n)
        if events:
            self.step.labels(self.figures).observe(seconds)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = \
            status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code),
                            status_code=self.status, headers=self.headers)


class TextOut:
    """Generated token ids to text, incrementally, with stop strings: each push gives the new
    text; the text stops before the first stop string found."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode = decode
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, tokens: list[int], final: bool = False) -> str:
        self.ids += tokens
        text = self.decode(self.ids)
        for s in self.stops:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                text = text[:at]
                self.stopped = True
        if not (final or self.stopped):
            keep = len(text) - self.hold
            if text.endswith("\ufffd"):  # a character whose bytes have not all come
                keep = min(keep, len(text.rstrip("\ufffd")))
            text = text[:max(keep, self.sent)]
        delta = text[self.sent:]
        self.sent = len(text)
        return delta


def build_app(aengine: AsyncEngine, cfg: ServeConfig, tokenizer: Any = None) -> FastAPI:
    """The FastAPI app of one served model (the engine starts with the app)."""
    metrics = Metrics(cfg.figures)
    aengine.on_step = metrics.on_step
    headers = {"x-kcloud-figures": cfg.figures}

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        aengine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, aengine.stop)

    app = FastAPI(title="K-Cloud serve", version="1", lifespan=lifespan)  # type: ignore[arg-type]

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(str(exc.status), cfg.figures).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:  # never a traceback
        metrics.requests.labels("500", cfg.figures).inc()
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    async def body_of(request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            raise ApiError(413, f"the body of {int(size)} bytes is over the limit of "
                                f"{cfg.max_body_bytes}", code="body_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                raise ApiError(413, f"the body is over the limit of {cfg.max_body_bytes} "
                                    "bytes", code="body_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") \
                from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return data

    def parse(model: type[Any], data: dict[str, Any]) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"],
                           param=param, code="invalid_value") from None

    def check_model(name: str) -> None:
        if name != cfg.served_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves "
                                f"'{cfg.served_name}'", param="model", code="model_not_found")

    async def submit(prompt: list[int] | None, params: Any, value: Any = None,
                     size: int = 1, restartable: bool = False) -> Stream:
        try:
            return await aengine.submit(prompt, params, value, size, restartable)
        except Overloaded as exc:
            raise ApiError(429, exc.message, "rate_limit_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except NotReady as exc:
            raise ApiError(503, exc.message, "server_error", code="not_ready",
                           headers={"Retry-After": "5"}) from None
        except RequestError as exc:
            raise ApiError(400, exc.message, param="max_tokens") from None
        except KCloudError as exc:
            raise ApiError(400, exc.message) from None

    def limits(req: _Sampling, prompt: list[int], default_max: int | None) -> Any:
        if len(prompt) >= cfg.max_len:
            raise ApiError(400, f"prompt: {len(prompt)} tokens leave no room to generate in "
                                f"the model's context of {cfg.max_len}", param="prompt",
                           code="context_length_exceeded")
        room = cfg.max_len - len(prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else (default_max or room)
        if getattr(req, "max_completion_tokens", None):
            max_tokens = req.max_completion_tokens  # type: ignore[attr-defined]
        if max_tokens > room:
            raise ApiError(400, f"max_tokens: {max_tokens} plus the prompt's {len(prompt)} "
                                f"tokens exceed the model's context of {cfg.max_len}",
                           param="max_tokens", code="context_length_exceeded")
        try:
            return req.sampling(max_tokens, seed=uuid.uuid4().int % (2**31))
        except KCloudError as exc:
            raise ApiError(400, exc.message) from None

    # -- LLM endpoints -----------------------------------------------------------------------
    async def generate(request: Request, req: _Sampling, prompt: list[int], chat: bool,
                       default_max: int | None) -> Response:
        params = limits(req, prompt, default_max)
        metrics.prompt_tokens.labels(cfg.figures).inc(len(prompt))
        stream = await submit(prompt, params, restartable=not req.stream)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        out = TextOut(tokenizer.decode, req.stops)
        obj = "chat.completion" if chat else "text_completion"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(stream, out, rid, created, chat, include_usage, len(prompt), request),
                media_type="text/event-stream", headers=headers)
        timing = _Timing(stream.submitted)
        n = 0
        reason = None
        try:
            while True:
                ev = await _next(stream, cfg.request_timeout_s, request)
                if ev is None:  # the client went away
                    aengine.abort(stream.id)
                    metrics.requests.labels("499", cfg.figures).inc()
                    return Response(status_code=499)
                if ev.reason == "retry":
                    out = TextOut(tokenizer.decode, req.stops)
                    n = 0
                    continue
                if ev.error is not None:
                    raise ApiError(500, f"the request failed: {ev.error}", "server_error",
                                   code="engine_error")
                n += len(ev.tokens)
                timing.tokens(len(ev.tokens))
                out.push(ev.tokens)
                if out.stopped:
                    aengine.abort(stream.id)
                    reason = "stop"
                    break
                if ev.finished:
                    reason = ev.reason
                    timing.engine_s = ev.engine_s
                    break
        except TimeoutError:
            aengine.abort(stream.id)
            raise ApiError(504, f"the request did not finish within {cfg.request_timeout_s:.0f}"
                                " s", "server_error", code="timeout") from None
        timing.observe(metrics, cfg.figures)
        metrics.requests.labels("200", cfg.figures).inc()
        body_text = _stopped_text(out)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None,
                                  "token_ids": out.ids}
        if chat:
            choice["message"] = {"role": "assistant", "content": body_text}
        else:
            choice["text"] = body_text
        return JSONResponse({
            "id": rid, "object": obj, "created": created, "model": cfg.served_name,
            "choices": [choice],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                      "total_tokens": len(prompt) + n},
            "kcloud": {"figures": cfg.figures, "ttft_s": timing.ttft, "e2e_s": timing.e2e,
                       "engine_s": timing.engine_s},
        }, headers=headers)

    async def _sse(stream: Stream, out: TextOut, rid: str, created: int, chat: bool,
                   include_usage: bool, n_prompt: int, request: Request) -> AsyncIterator[str]:
        timing = _Timing(stream.submitted)
        n = 0
        done = False
        pending: list[int] = []  # tokens not yet sent (their text is held back)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, first: bool = False,
                  ids: list[int] | None = None) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason,
                                          "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason,
                          "logprobs": None}
            choice["token_ids"] = ids or []  # an extension: the tokens this chunk adds
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                          "model": cfg.served_name, "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                try:
                    ev = await _next(stream, cfg.request_timeout_s, None)
                except TimeoutError:
                    yield "data: " + json.dumps(error_body(
                        f"the request did not finish within {cfg.request_timeout_s:.0f} s",
                        "server_error", code="timeout")) + "\n\n"
                    metrics.requests.labels("504", cfg.figures).inc()
                    break
                assert ev is not None
                if ev.error is not None:
                    yield "data: " + json.dumps(error_body(f"the request failed: {ev.error}",
                                                           "server_error",
                                                           code="engine_error")) + "\n\n"
                    metrics.requests.labels("500", cfg.figures).inc()
                    break
                n += len(ev.tokens)
                timing.tokens(len(ev.tokens))
                delta = out.push(ev.tokens, final=ev.finished)
                reason = "stop" if out.stopped else (ev.reason if ev.finished else None)
                pending += ev.tokens
                if delta or reason:
                    if delta and reason:
                        yield chunk(delta, None, ids=pending)
                        yield chunk("" if not chat else None, reason)
                    else:
                        yield chunk(delta if delta else ("" if not chat else None), reason,
                                    ids=pending)
                    pending = []
                elif ev.tokens and not out.stops:
                    # new tokens whose text is not whole yet (a character's bytes split over
                    # tokens): streamed as they come, with no text, as vLLM streams them;
                    # with stop strings their text may yet be cut, so they wait
                    yield chunk("", None, ids=pending)
                    pending = []
                if reason is not None:
                    if out.stopped and not ev.finished:
                        aengine.abort(stream.id)
                    timing.engine_s = ev.engine_s
                    timing.observe(metrics, cfg.figures)
                    metrics.requests.labels("200", cfg.figures).inc()
                    break
            if include_usage:
                yield "data: " + json.dumps({
                    "id": rid, "object": obj, "created": created, "model": cfg.served_name,
                    "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                                             "total_tokens": n_prompt + n}}) + "\n\n"
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client disconnected (the response was cancelled)
                aengine.abort(stream.id)
                metrics.requests.labels("499", cfg.figures).inc()

    def need_llm() -> None:
        if not cfg.llm:
            raise ApiError(400, f"'{cfg.served_name}' is not a language model; send inputs "
                                "to /v1/infer", param="model", code="wrong_endpoint")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await body_of(request))
        check_model(req.model)
        need_llm()
        if isinstance(req.prompt, str):
            prompt = tokenizer.encode(req.prompt)
        else:
            prompt = list(req.prompt)
            bad = [t for t in prompt if t >= cfg.vocab]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                    f"of {cfg.vocab}", param="prompt", code="invalid_value")
        return await generate(request, req, prompt, False, 16)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await body_of(request))
        check_model(req.model)
        need_llm()
        try:
            prompt = tokenizer.chat([m.model_dump() for m in req.messages])
        except KCloudError as exc:
            raise ApiError(400, exc.message, param="messages") from None
        return await generate(request, req, prompt, True, None)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        entry: dict[str, Any] = {
            "id": cfg.served_name, "object": "model", "created": 0, "owned_by": "kcloud",
            "max_model_len": cfg.max_len or None, "root": cfg.model}
        eng = aengine.engine if aengine.ready.is_set() else None
        if eng is not None:  # an extension: the engine's limits (what a simulator mirrors)
            entry["kcloud"] = {"replicas": len(eng.replicas), "max_batch": eng.max_batch,
                               "token_budget": eng.token_budget, "block_size": eng.block_size,
                               "kv_blocks_per_replica": eng.kv_blocks if eng.llm else None}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.post("/v1/infer")
    async def infer(request: Request) -> Response:
        req = parse(InferRequest, await body_of(request))
        check_model(req.model)
        if cfg.llm:
            raise ApiError(400, f"'{cfg.served_name}' is a language model; use "
                                "/v1/completions", param="model", code="wrong_endpoint")
        x = _tensor(req, cfg.input_shape)
        t0 = time.perf_counter()
        stream = await submit(None, None, (x,), int(x.shape[0]))
        try:
            ev = await _next(stream, cfg.request_timeout_s, request)
        except TimeoutError:
            aengine.abort(stream.id)
            raise ApiError(504, "the request timed out", "server_error", code="timeout") \
                from None
        if ev is None:
            aengine.abort(stream.id)
            return Response(status_code=499)
        if ev.error is not None:
            raise ApiError(500, f"the request failed: {ev.error}", "server_error",
                           code="engine_error")
        y = ev.output[0]
        metrics.e2e.labels(cfg.figures).observe(time.perf_counter() - t0)
        metrics.requests.labels("200", cfg.figures).inc()
        return JSONResponse({"model": cfg.served_name, "shape": list(y.shape),
                             "outputs": y.tolist(), "figures": cfg.figures}, headers=headers)

    # -- operations ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if aengine.ready.is_set() and aengine.engine is not None:
            return JSONResponse({"status": "ready", "model": cfg.served_name,
                                 "figures": cfg.figures,
                                 "workers": aengine.engine.worker_pids()})
        return JSONResponse({"status": "failed" if aengine.error else "starting",
                             "error": aengine.error}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.loop_cpu.set(time.thread_time())  # this handler runs on the event loop's thread
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _stopped_text(out: TextOut) -> str:
    """A non-streamed response's text: all of it, up to the first stop string."""
    text = out.decode(out.ids)
    cut = [at for s in out.stops if (at := text.find(s)) >= 0]
    return text[:min(cut)] if cut else text


class _Timing:
    def __init__(self, submitted: float) -> None:
        self.t0 = submitted
        self.first: float | None = None
        self.last = submitted
        self.n = 0
        self.engine_s: float | None = None  # the engine's steps for this request (when done)

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        if n and self.first is None:
            self.first = now
        self.last = now
        self.n += n

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.t0

    @property
    def e2e(self) -> float:
        return self.last - self.t0

    def observe(self, m: Metrics, figures: str) -> None:
        if self.first is not None:
            m.ttft.labels(figures).observe(self.first - self.t0)
            if self.n > 1:
                m.tpot.labels(figures).observe((self.last - self.first) / (self.n - 1))
        e2e = time.perf_counter() - self.t0
        m.e2e.labels(figures).observe(e2e)
        if self.engine_s is not None:
            m.overhead.labels(figures).observe(max(0.0, e2e - self.engine_s))


async def _next(stream: Stream, timeout: float, request: Request | None) -> Event | None:
    """The request's next event; None when the client disconnected (non-streamed requests
    check every second)."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            return await asyncio.wait_for(stream.events.get(), min(left, 1.0))
        except TimeoutError:
            if request is not None and await request.is_disconnected():
                return None


def _tensor(req: InferRequest, sample: tuple[int, ...]) -> Any:
    import numpy as np
    import torch

    if (req.inputs is None) == (req.npy_b64 is None):
        raise ApiError(400, "give exactly one of inputs and npy_b64", param="inputs")
    try:
        if req.npy_b64 is not None:
            arr = np.load(io.BytesIO(base64.b64decode(req.npy_b64, validate=True)),
                          allow_pickle=False)
        else:
            arr = np.asarray(req.inputs, dtype=np.float32)
    except (ValueError, TypeError, OSError) as exc:
        param = "npy_b64" if req.npy_b64 is not None else "inputs"
        raise ApiError(400, f"{param} is not a numeric array: {' '.join(str(exc).split())[:120]}",
                       param=param) from None
    if arr.dtype.kind not in "fiub":
        raise ApiError(400, "the array is not numeric", param="inputs")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if tuple(x.shape) == sample:
        x = x.unsqueeze(0)
    if tuple(x.shape[1:]) != sample or x.shape[0] < 1:
        raise ApiError(400, f"inputs of shape {list(arr.shape)} do not fit the model's sample "
                            f"shape {list(sample)} (one sample, or a batch of them)",
                       param="inputs", code="invalid_shape")
    if not torch.isfinite(x).all():
        raise ApiError(400, "the inputs hold NaN or infinite values", param="inputs")
    return x
