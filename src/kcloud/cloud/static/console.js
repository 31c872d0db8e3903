// K-Cloud console: log in/out, create and delete deployments, follow their state.
"use strict";
const H = {"Content-Type": "application/json", "X-KCloud-Console": "1"};

async function call(method, url, body) {
  const r = await fetch(url, {method, headers: H, credentials: "same-origin",
                              body: body === undefined ? undefined : JSON.stringify(body)});
  let data = {};
  try { data = await r.json(); } catch (e) { /* empty body */ }
  return {ok: r.ok, status: r.status, data};
}

function on(id, ev, fn) { const el = document.getElementById(id); if (el) el.addEventListener(ev, fn); }

on("login-form", "submit", async (e) => {
  e.preventDefault();
  const r = await call("POST", "/console/login", {key: document.getElementById("key").value});
  if (r.ok) location.href = "/"; else document.getElementById("login-error").textContent = r.data.error || "refused";
});

on("logout", "click", async () => { await call("POST", "/console/logout"); location.href = "/"; });

on("deploy-form", "submit", async (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  const body = {name: f.get("name"), model: f.get("model"), objective: f.get("objective"),
                mode: f.get("mode"), max_devices: Number(f.get("max_devices") || 1)};
  if (f.get("slo_ms")) body.slo_ms = Number(f.get("slo_ms"));
  const r = await call("POST", "/api/v1/deployments", body);
  if (r.ok) location.reload();
  else document.getElementById("deploy-error").textContent =
    (r.data.error || "refused") + (r.data.nearest ? " (nearest: " + r.data.nearest + ")" : "");
});

document.addEventListener("click", async (e) => {
  const b = e.target.closest("button.delete");
  if (!b) return;
  const r = await call("DELETE", "/api/v1/deployments/" + b.dataset.id);
  if (r.ok) location.reload();
});

// follow the states of the deployments on the page
async function poll() {
  const rows = document.querySelectorAll("#deployments tr[data-id]");
  const one = document.getElementById("dep-state");
  if (!rows.length && !one) return;
  const r = await call("GET", "/api/v1/deployments");
  if (!r.ok) return;
  for (const d of r.data.deployments) {
    const row = document.querySelector(`#deployments tr[data-id="${d.id}"] td.state`);
    if (row && row.textContent !== d.state) { row.textContent = d.state; row.className = "state state-" + d.state; }
    if (one && location.pathname.endsWith(d.id) && one.textContent !== d.state) {
      one.textContent = d.state; one.className = "state state-" + d.state;
    }
  }
}
setInterval(poll, 2000);
