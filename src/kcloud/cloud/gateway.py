"""The gateway: `/v1/*` with a tenant key, routed to that tenant's deployment of that name.

The OpenAI-compatible calls (`POST /v1/completions`, `/v1/chat/completions`, `/v1/infer`) name
their deployment in the body's `model` field; the gateway looks it up among the caller's own
deployments only (another tenant's deployment of the same name does not exist for it), checks
the key's token bucket (429 with `Retry-After` when empty), and forwards the request to the
engine's unix socket, passing a streamed (SSE) response through chunk by chunk. Each finished
request is metered: one request, its tokens (the response's `usage`, or one per streamed
chunk carrying text), and its modeled energy (the plan's modeled joules per item).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kcloud.cloud.control import Control, Principal, modeled_energy

FORWARD = ("completions", "chat/completions", "infer")


@dataclass
class Bucket:
    """A token bucket: `rate` tokens a second, at most `burst` stored."""

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, t: float) -> float:
        """0 when a request may pass (and takes a token), else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (t - self.at) * self.rate)
        self.at = t
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    # the OpenAI error shape, so that its clients show the message
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status,
                        headers=headers)


def _count_sse(line: bytes) -> tuple[int, int | None]:
    """(text chunks, usage total if the chunk carries one) of one SSE `data:` line."""
    if not line.startswith(b"data:"):
        return 0, None
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return 0, None
    try:
        obj = json.loads(data)
    except ValueError:
        return 0, None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    n = 0
    for ch in (obj.get("choices") or []) if isinstance(obj, dict) else []:
        delta = ch.get("delta") or {}
        if ch.get("text") or delta.get("content"):
            n += 1
    total = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return n, total


def mount(app: FastAPI, control: Control, principal: Callable[..., Principal]) -> None:
    buckets: dict[str, Bucket] = {}
    clients: dict[str, httpx.AsyncClient] = {}
    app.state.gateway_clients = clients

    def client_for(dep_id: str) -> httpx.AsyncClient:
        c = clients.get(dep_id)
        if c is None:
            uds = control.socket_address(dep_id)
            c = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=uds),
                                  base_url="http://engine", timeout=httpx.Timeout(None))
            clients[dep_id] = c
        return c

    def limited(who: Principal) -> float:
        rpm = control.tenant_quota(who.tenant_id).get("requests_per_minute")
        if not rpm:
            return 0.0
        b = buckets.get(who.key_id)
        t = time.monotonic()
        if b is None or b.rate != rpm / 60:
            burst = max(1.0, math.ceil(rpm / 6))  # ten seconds' worth
            b = buckets[who.key_id] = Bucket(rpm / 60, burst, burst, t)
        return b.take(t)

    @app.get("/v1/models")
    def models(who: Principal = Depends(principal)) -> dict[str, Any]:
        if who.tenant_id is None:
            return {"object": "list", "data": []}
        deps = control.list(who)
        return {"object": "list", "data": [
            {"id": d.name, "object": "model", "created": int(d.created_at),
             "owned_by": who.tenant_id, "state": d.state} for d in deps
            if d.desired == "running"]}

    async def forward(path: str, request: Request, who: Principal) -> Response:
        if who.tenant_id is None:
            return _error(403, "the gateway serves tenants: use a tenant key",
                          "permission_error")
        body = await request.body()
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return _error(422, "field body: not valid JSON", "invalid_request_error")
        name = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not name:
            return _error(422, "field model: the name of one of your deployments is required",
                          "invalid_request_error")
        d = await anyio.to_thread.run_sync(control.by_name, who.tenant_id, name)
        if d is None:
            return _error(404, f"model {name!r} not found: no deployment of that name",
                          "not_found_error")
        if d.state != "running":
            return _error(503, f"deployment {name!r} is {d.state}", "unavailable",
                          {"Retry-After": "5"})
        wait = limited(who)
        if wait > 0:
            return _error(429, "rate limit: requests_per_minute exceeded", "rate_limit_error",
                          {"Retry-After": str(max(1, math.ceil(wait)))})
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        resp = None
        for _ in range(2):  # a restarted engine has a new socket: one retry on a new client
            client = client_for(d.id)
            req = client.build_request(request.method, f"/v1/{path}", content=body,
                                       headers=headers)
            try:
                resp = await client.send(req, stream=True)
                break
            except httpx.HTTPError:
                await clients.pop(d.id).aclose()
        if resp is None:
            return _error(502, f"deployment {name!r} did not answer", "unavailable",
                          {"Retry-After": "5"})
        plan = d.plan
        ctype = resp.headers.get("content-type", "application/json")
        if ctype.startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                chunks, usage, buf = 0, None, b""
                try:
                    async for part in resp.aiter_raw():
                        yield part
                        buf += part
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            n, u = _count_sse(line)
                            chunks += n
                            usage = u if u is not None else usage
                finally:
                    await resp.aclose()
                    tokens = usage if usage is not None else chunks
                    control.meter(d.id, 1, tokens, modeled_energy(plan, tokens))
            return StreamingResponse(relay(), status_code=resp.status_code, media_type=ctype)
        content = await resp.aread()
        await resp.aclose()
        tokens, items = 0, 1
        try:
            obj = json.loads(content)
            usage = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(usage, dict):
                tokens = int(usage.get("completion_tokens") or usage.get("total_tokens") or 0)
                items = tokens or int(usage.get("items") or 1)
        except ValueError:
            pass
        if resp.status_code < 400:
            control.meter(d.id, 1, tokens, modeled_energy(plan, items))
        return Response(content, status_code=resp.status_code, media_type=ctype)

    for path in FORWARD:
        async def handler(request: Request, who: Principal = Depends(principal),
                          _p: str = path) -> Response:
            return await forward(_p, request, who)
        app.add_api_route(f"/v1/{path}", handler, methods=["POST"], name=f"gateway:{path}")


async def close_clients(app: FastAPI) -> None:
    for c in list(getattr(app.state, "gateway_clients", {}).values()):
        await c.aclose()
