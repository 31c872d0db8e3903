"""The web console in a real browser: Debian's chromium driven by Playwright (the system
browser, never a download). Log in, see the fleet, create a deployment, see it running;
another tenant cannot see it; the admin sees who holds what.

Set KCLOUD_SCREENSHOTS=DIR to keep the pages as PNGs (the README's come from here)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from kcloud.cloud.api import create_app
from tests.cloud_support import LiveServer, admin_headers, bwrap_ok, make_control

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_console_login_fleet_deploy_and_tenant_walls(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)")
    if bwrap_ok() is not None:
        pytest.skip(f"no bubblewrap sandbox here: {bwrap_ok()}")
    shots = Path(os.environ.get("KCLOUD_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    control = make_control(tmp_path / "data")
    with LiveServer(create_app(control)) as srv:
        admin = admin_headers(control)
        keys = {}
        for name in ("acme", "rival"):
            t = httpx.post(f"{srv.url}/api/v1/tenants", headers=admin, json={
                "name": name, "quota": {"devices": {"furiosa-rngd": 4}}})
            keys[name] = httpx.post(f"{srv.url}/api/v1/tenants/{t.json()['id']}/keys",
                                    headers=admin).json()["key"]
        # a second deployment of acme's, made over the API, to fill the pictures
        httpx.post(f"{srv.url}/api/v1/deployments", timeout=300, json={
            "name": "resnet", "model": "tiny-resnet", "objective": "throughput"},
            headers={"Authorization": f"Bearer {keys['acme']}"})
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def login(key: str) -> None:
                page.goto(srv.url + "/")
                page.fill("#key", key)
                with page.expect_navigation():
                    page.click("#login")
                page.wait_for_selector("#who")

            def logout() -> None:
                with page.expect_navigation():
                    page.click("#logout")
                page.wait_for_selector("#key")

            login(keys["acme"])
            assert "tenant acme" in page.inner_text("#who")
            page.fill("#dep-name", "web")
            page.fill("#dep-model", "mlp")
            page.select_option("#dep-objective", "cost")
            page.click("#deploy")
            page.wait_for_selector("#deployments tr[data-id] >> text=web", timeout=120_000)
            row = page.locator("#deployments tr", has_text="web")
            sync_api.expect(row.locator("td.state")).to_have_text("running", timeout=120_000)
            assert page.locator("#fleet-grid .slice.held").count() >= 2  # its own devices
            page.screenshot(path=str(shots / "console-tenant.png"), full_page=True)
            row.locator("a").click()
            page.wait_for_selector("#plan-table")
            assert page.locator("#pipeline rect.stage").count() >= 1
            assert "mlp" in page.inner_text("main")
            dep_url = page.url
            page.screenshot(path=str(shots / "console-deployment.png"), full_page=True)
            # a bad deployment is refused in the page with the reason
            page.goto(srv.url + "/")
            page.fill("#dep-name", "bad")
            page.fill("#dep-model", "/etc/passwd")
            page.click("#deploy")
            sync_api.expect(page.locator("#deploy-error")).to_contain_text("model")
            logout()

            login(keys["rival"])
            assert page.locator("#deployments tr[data-id]").count() == 0
            assert page.locator("#fleet-grid .slice.held").count() == 0
            page.goto(dep_url)
            assert "Not found" in page.inner_text("main")
            logout()

            login(control.admin_key_path.read_text().strip())
            assert page.inner_text("#who") == "admin"
            assert page.locator("#deployments tr[data-id]").count() == 2
            assert page.locator("#fleet-grid .device").count() == len(control.fleet.devices)
            assert page.locator("#fleet-grid .slice.held").count() >= 2
            assert "acme" in page.inner_text("#tenants")
            page.screenshot(path=str(shots / "console-fleet.png"), full_page=True)
            page.goto(srv.url + "/usage")
            page.wait_for_selector("figure.chart")
            assert page.locator("figure.chart").count() == 5
            page.screenshot(path=str(shots / "console-usage.png"), full_page=True)
            # a wrong key is refused on the login page
            logout()
            page.fill("#key", "kc_nope")
            page.click("#login")
            sync_api.expect(page.locator("#login-error")).to_contain_text("invalid")
            browser.close()
    if "KCLOUD_SCREENSHOTS" not in os.environ:
        shutil.rmtree(shots, ignore_errors=True)
