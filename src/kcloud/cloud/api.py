"""The REST API (`/api/v1/*`), the gateway (`/v1/*`) and the console (`/`) on one FastAPI app.

Every call names its caller with `Authorization: Bearer KEY` (the console: a session cookie that
stands for a key). Request bodies are validated by pydantic at this edge: a malformed body is a
422 naming the field, an oversized one a 413, an unknown or revoked key a 401, another tenant's
deployment a 404, an admin call with a tenant key a 403. No traceback reaches a client: an
unexpected error is a 500 with one line. Every mutating call is written to the audit log.
"""


import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kcloud.cloud.control import NAME_RE, Control, Principal, Refusal, devices_of

log = logging.getLogger("kcloud.cloud")

API_BODY_LIMIT = 256 * 1024  # bytes: control-plane calls are small
GATEWAY_BODY_LIMIT = 8 * 2**20  # bytes: inference inputs may be larger
SESSION_COOKIE = "kcloud_session"


# ---------------------------------------------------------------------------------------------
# bodies


class QuotaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: dict[str, Annotated[float, Field(ge=0)]] | None = None
    device_hours_per_day: float | None = Field(default=None, gt=0)
    requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    max_deployments: int | None = Field(default=None, ge=0, le=10_000)


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    quota: QuotaIn = QuotaIn()

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable() or v != v.strip():
            raise ValueError("must be printable, without leading or trailing spaces")
        return v


class DeploymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=63, pattern=NAME_RE.pattern)
    model: str = Field(min_length=1, max_length=512)
    objective: Literal["latency", "throughput", "energy", "cost"] = "throughput"
    slo_ms: float | None = Field(default=None, gt=0)
    min_domestic_share: float | None = Field(default=None, ge=0, le=1)
    mode: Literal["real", "emulated"] = "emulated"
    priority: int = Field(default=0, ge=0, le=100)
    max_devices: int = Field(default=1, ge=1, le=256)


class CordonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cordoned: bool


# ---------------------------------------------------------------------------------------------
# middleware


class BodyLimit:
    """413 for a body over the limit (by Content-Length, or counted as it streams in)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = GATEWAY_BODY_LIMIT if scope["path"].startswith("/v1/") else API_BODY_LIMIT
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(send, limit)
            return
        seen = 0
        state = {"started": False, "refused": False}

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit and not state["refused"]:
                    state["refused"] = True
                    if not state["started"]:
                        await _too_large(send, limit)
                    return {"type": "http.disconnect"}  # the app stops reading here
            return msg

        async def watch(msg: Message) -> None:
            if state["refused"]:
                return  # the 413 has been sent; drop what the app says after it
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        await self.app(scope, counted, watch)


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"error": "request body over the limit of {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class AuditLog:
    """Writes every mutating call (who, what, when, result) to the audit table."""

    def __init__(self, app: ASGIApp, control: Control) -> None:
        self.app = app
        self.control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH", "DELETE") \
                or not scope["path"].startswith(("/api/", "/console/")):
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            who = scope.get("state", {}).get("principal")
            detail = scope.get("state", {}).get("audit_detail", "")
            await anyio.to_thread.run_sync(self.control.audit, who, scope["method"],
                                           scope["path"], status, detail)


# ---------------------------------------------------------------------------------------------
# the app


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h[:7].lower() == "bearer ":
        return h[7:].strip()
    return None


def create_app(control: Control, *, reconcile: bool = True) -> FastAPI:
    from kcloud.cloud import console, gateway

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        if reconcile:
            control.start()
        yield
        await gateway.close_clients(app)
        if reconcile:
            await anyio.to_thread.run_sync(control.shutdown)

    app = FastAPI(title="K-Cloud control plane", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.control = control
    app.state.sessions = {}

    def principal(request: Request) -> Principal:
        key = _bearer(request)
        who = control.authenticate(key) if key else None
        if who is None and key is None:
            who = console.session_principal(request)
        if who is None:
            raise HTTPException(401, "missing or invalid API key",
                                headers={"WWW-Authenticate": "Bearer"})
        request.state.principal = who
        return who

    def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if not who.admin:
            raise HTTPException(403, "this call needs the admin key")
        return who

    Who = Annotated[Principal, Depends(principal)]
    Admin = Annotated[Principal, Depends(admin)]
    app.state.principal_dep = principal

    # -- errors -------------------------------------------------------------------------------
    @app.exception_handler(Refusal)
    async def _refusal(_r: Request, exc: Refusal) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http(_r: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [e for e in exc.errors() if e.get("type") == "json_invalid"] or exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) if loc else "body"
        if first.get("type") == "json_invalid":
            field = "body"
        msg = first.get("msg", "invalid")
        detail = [{"field": "body" if e.get("type") == "json_invalid" else
                   ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
                   "msg": e.get("msg")} for e in errs]
        return JSONResponse({"error": f"field {field}: {msg}", "field": field,
                             "detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_r: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s", exc, exc_info=exc)
        return JSONResponse({"error": "internal error"}, status_code=500)

    # -- tenants and keys ---------------------------------------------------------------------
    @app.post("/api/v1/tenants", status_code=201)
    def create_tenant(body: TenantIn, request: Request, _a: Admin) -> dict[str, Any]:
        doc = control.create_tenant(body.name, body.quota.model_dump())
        request.state.audit_detail = f"tenant {doc['id']}"
        return doc

    @app.get("/api/v1/tenants")
    def list_tenants(_a: Admin) -> dict[str, Any]:
        return {"tenants": control.tenants()}

    @app.post("/api/v1/tenants/{tenant_id}/keys", status_code=201)
    def create_key(tenant_id: str, request: Request, _a: Admin) -> dict[str, Any]:
        kid, key = control.create_key(tenant_id)
        request.state.audit_detail = f"key {kid}"
        return {"id": kid, "key": key, "tenant_id": tenant_id}

    @app.delete("/api/v1/keys/{key_id}")
    def revoke_key(key_id: str, who: Who) -> dict[str, Any]:
        control.revoke_key(who, key_id)
        return {"id": key_id, "revoked": True}

    # -- deployments --------------------------------------------------------------------------
    @app.post("/api/v1/deployments", status_code=201)
    def create_deployment(body: DeploymentIn, request: Request, who: Who) -> dict[str, Any]:
        doc = control.submit(who, body.model_dump())
        request.state.audit_detail = f"deployment {doc['id']} on {devices_of(doc['plan'])} " \
                                     f"device(s)"
        control.wake()
        return doc

    # reads answer with JSONResponse: their documents are plain JSON already, so FastAPI's
    # per-field encoding pass (a large share of a read's time) is skipped
    @app.get("/api/v1/deployments")
    def list_deployments(who: Who) -> JSONResponse:
        return JSONResponse({"deployments": [control.deployment_doc(d)
                                             for d in control.list(who)]})

    @app.get("/api/v1/deployments/{dep_id}")
    def get_deployment(dep_id: str, who: Who) -> JSONResponse:
        return JSONResponse(control.deployment_doc(control.get(who, dep_id)))

    @app.delete("/api/v1/deployments/{dep_id}")
    def delete_deployment(dep_id: str, who: Who) -> dict[str, Any]:
        return control.deployment_doc(control.delete(who, dep_id))

    # -- fleet, usage, audit ------------------------------------------------------------------
    @app.get("/api/v1/fleet")
    def fleet(_a: Admin) -> JSONResponse:
        return JSONResponse(control.fleet_doc())

    @app.post("/api/v1/fleet/devices/{device:path}")
    def cordon(device: str, body: CordonIn, _a: Admin) -> dict[str, Any]:
        control.cordon(device, body.cordoned)
        return {"device": device, "cordoned": body.cordoned}

    @app.get("/api/v1/usage")
    def usage(who: Who) -> JSONResponse:
        return JSONResponse({"usage": control.usage(who), "figures": {
            "device_seconds": "measured (wall time held)", "requests": "measured",
            "tokens": "measured", "energy_j": "modeled", "cost_usd": "estimated"}})

    @app.get("/api/v1/audit")
    def audit(_a: Admin, limit: int = 200) -> dict[str, Any]:
        return {"audit": control.audit_log(max(1, min(limit, 10_000)))}

    @app.get("/api/v1/whoami")
    def whoami(who: Who) -> dict[str, Any]:
        return {"key_id": who.key_id, "role": who.role, "tenant_id": who.tenant_id}

    gateway.mount(app, control, principal)
    console.mount(app, control)
    app.add_middleware(AuditLog, control=control)
    app.add_middleware(BodyLimit)
    return app
