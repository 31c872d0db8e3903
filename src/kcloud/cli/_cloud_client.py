"""The REST client the cloud sub-commands share: `--url`/`--key` or KCLOUD_URL/KCLOUD_KEY."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kcloud.errors import KCloudError

DEFAULT_URL = "http://127.0.0.1:8080"

UrlOpt = Annotated[str, typer.Option("--url", envvar="KCLOUD_URL",
                                     help="Control plane URL (KCLOUD_URL)")]
KeyOpt = Annotated[str | None, typer.Option("--key", envvar="KCLOUD_KEY",
                                            help="API key (KCLOUD_KEY)", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def call(method: str, url: str, key: str | None, path: str,
         body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One REST call; a refusal or an unreachable server is one `KCloudError` line."""
    import httpx  # here: every other command starts without it

    if not key:
        raise KCloudError("no API key", "give --key or set KCLOUD_KEY (the admin key is in "
                          "DATA_DIR/admin.key)")
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, timeout=600,
                          headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        raise KCloudError(f"cannot reach the control plane at {url}: {exc}",
                          "start it with `kcloud cloud up` or give --url") from None
    try:
        data = r.json()
    except ValueError:
        data = {"error": r.text[:200]}
    if r.status_code >= 400:
        err = data.get("error", data) if isinstance(data, dict) else data
        hint = data.get("nearest") if isinstance(data, dict) else None
        raise KCloudError(f"{r.status_code}: {err}", f"nearest: {hint}" if hint else None)
    return data
