"""The web console at `/`: server-rendered HTML (Jinja2, autoescaped) and a little JavaScript.

Log in with a key: the server keeps the key in memory under a random session id and gives the
browser only that id (an HttpOnly, SameSite=Strict cookie); every page re-checks the key, so a
revoked key logs its sessions out. A cookie-authenticated call that changes state must also
carry the `X-KCloud-Console` header, which a cross-site form cannot set. The admin sees the
whole fleet, every tenant and deployment; a tenant sees only its own deployments, the devices
they hold and its own usage.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from kcloud.cloud.control import Control, Principal, Refusal

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "kcloud_session"
SESSION_S = 8 * 3600
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")

_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))


def color(key: str) -> str:
    return PALETTE[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(PALETTE)]


_env.globals["color"] = color


def session_principal(request: Request) -> Principal | None:
    sid = request.cookies.get(SESSION_COOKIE)
    if not sid:
        return None
    sessions: dict[str, tuple[str, float]] = request.app.state.sessions
    entry = sessions.get(sid)
    if entry is None or entry[1] < time.time():
        sessions.pop(sid, None)
        return None
    if request.method not in ("GET", "HEAD") and request.headers.get("x-kcloud-console") != "1":
        return None
    return request.app.state.control.authenticate(entry[0])


def _pipeline_svg(plan: dict[str, Any]) -> dict[str, Any]:
    """Boxes (one per stage, width by modeled time) for each replica, for the template."""
    rows = []
    for ri, r in enumerate(plan.get("replicas", [])):
        total = sum(max(st["time_s"], 1e-12) for st in r["stages"]) or 1.0
        x = 0.0
        boxes = []
        for si, st in enumerate(r["stages"]):
            w = max(st["time_s"], 1e-12) / total
            boxes.append({"x": x, "w": w, "stage": si, "layers": f"{st['start']}-{st['end'] - 1}",
                          "type": st["device_type"], "tp": len(st["devices"]),
                          "ms": st["time_s"] * 1e3, "comm_ms": st["comm_s"] * 1e3})
            x += w
        rows.append({"replica": ri, "boxes": boxes})
    return {"rows": rows}


def _usage_chart(rows: list[dict[str, Any]], metric: str, by: str) -> dict[str, Any]:
    """Stacked bars per day of `metric`, one colour per `by` (tenant or deployment)."""
    days = sorted({r["day"] for r in rows})
    series = sorted({str(r[by]) for r in rows})
    vals: dict[tuple[str, str], float] = defaultdict(float)
    for r in rows:
        vals[(r["day"], str(r[by]))] += float(r[metric])
    top = max([sum(vals[(d, s)] for s in series) for d in days] or [0.0]) or 1.0
    bars = []
    for i, d in enumerate(days):
        y = 0.0
        parts = []
        for s in series:
            v = vals[(d, s)]
            if v:
                parts.append({"series": s, "value": v, "y": y / top, "h": v / top})
                y += v
        bars.append({"day": d, "i": i, "parts": parts, "total": y})
    return {"metric": metric, "days": days, "series": series, "bars": bars, "top": top}


def mount(app: FastAPI, control: Control) -> None:
    def page(name: str, request: Request, who: Principal | None, **ctx: Any) -> HTMLResponse:
        tname = None
        if who and who.tenant_id:
            try:
                tname = control.tenant(who.tenant_id).name
            except Refusal:
                tname = who.tenant_id
        html = _env.get_template(name).render(who=who, tenant_name=tname, path=request.url.path,
                                              **ctx)
        return HTMLResponse(html)

    def current(request: Request) -> Principal | None:
        return session_principal(request)

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        who = current(request)
        if who is None:
            return page("login.html", request, None)
        deps = [control.deployment_doc(d) for d in control.list(who)]
        fleet = control.fleet_doc()
        mine = {d["id"] for d in deps}
        if not who.admin:  # a tenant sees only the devices its deployments hold
            fleet = {**fleet, "devices": [
                {**dv, "held": [h for h in dv["held"] if h["holder"] in mine]}
                for dv in fleet["devices"] if any(h["holder"] in mine for h in dv["held"])]}
        nodes: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for dv in fleet["devices"]:
            nodes[dv["node"]].append(dv)
        tenants = control.tenants() if who.admin else []
        tnames = {t["id"]: t["name"] for t in tenants}
        return page("index.html", request, who, deployments=deps, fleet=fleet,
                    nodes=dict(nodes), tenants=tenants, tnames=tnames)

    @app.get("/deployments/{dep_id}", response_class=HTMLResponse)
    def deployment(dep_id: str, request: Request) -> Response:
        who = current(request)
        if who is None:
            return RedirectResponse("/", status_code=303)
        try:
            d = control.deployment_doc(control.get(who, dep_id))
        except Refusal:
            return page("missing.html", request, who, what=dep_id)
        return page("deployment.html", request, who, d=d, pipe=_pipeline_svg(d["plan"]))

    @app.get("/usage", response_class=HTMLResponse)
    def usage(request: Request) -> Response:
        who = current(request)
        if who is None:
            return RedirectResponse("/", status_code=303)
        rows = control.usage(who)
        by = "tenant" if who.admin else "deployment"
        charts = [_usage_chart(rows, m, by) for m in
                  ("device_seconds", "requests", "tokens", "energy_j", "cost_usd")]
        return page("usage.html", request, who, rows=rows, charts=charts, by=by)

    @app.post("/console/login")
    async def login(request: Request) -> Response:
        try:
            body = await request.json()
            key = str(body.get("key", "")).strip()
        except (ValueError, AttributeError):
            return JSONResponse({"error": "field key: required", "field": "key"}, 422)
        who = control.authenticate(key)
        request.state.principal = who
        if who is None:
            return JSONResponse({"error": "invalid or revoked key"}, 401)
        sid = secrets.token_urlsafe(32)
        app.state.sessions[sid] = (key, time.time() + SESSION_S)
        resp = JSONResponse({"role": who.role, "tenant_id": who.tenant_id})
        resp.set_cookie(SESSION_COOKIE, sid, max_age=SESSION_S, httponly=True,
                        samesite="strict", path="/")
        return resp

    @app.post("/console/logout")
    def logout(request: Request) -> Response:
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            app.state.sessions.pop(sid, None)
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/static/console.js")
    def script() -> Response:
        return Response((STATIC / "console.js").read_text(), media_type="text/javascript")

    @app.get("/static/console.css")
    def style() -> Response:
        return Response((STATIC / "console.css").read_text(), media_type="text/css")
