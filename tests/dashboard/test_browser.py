"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

One fleet for the module (mosquitto, a controller process, three agent processes and a
thousand devices registered over MQTT) and one browser. Every test saves a screenshot under
``var/screenshots/`` and checks it was written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dashboard.fleet import DashboardFleet
from tests.integration.fleet import wait_for

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path("var/screenshots")
MODELS = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))
BULK = 1000
AGENTS = 3

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium missing: apt-get install chromium"
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardFleet]:
    from models.build import BuildOptions, build_all

    build_all(BuildOptions(out=MODELS, eval_sentences=200, variants=("fp32-onnx",)))
    fleet = DashboardFleet(tmp_path_factory.mktemp("dashboard-fleet"), models=MODELS.resolve())
    try:
        fleet.start(agents=AGENTS)
        fleet.register_many(BULK)
        wait_for(lambda: fleet.total() == BULK + AGENTS, 60, what="the fleet registered")
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.exists() and path.stat().st_size > 1000, f"screenshot {path} not written"
    return path


def sign_in(page: Page, fleet: DashboardFleet, token: str) -> None:
    page.goto(f"{fleet.url}/")
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    expect(page.locator("#nav")).to_be_visible()


def test_wrong_token_is_refused(page: Page, fleet: DashboardFleet) -> None:
    page.goto(f"{fleet.url}/dashboard/")
    page.fill("#token", "not-a-token-at-all")
    page.click("#login button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not accepted")
    expect(page.locator("#nav")).to_be_hidden()
    screenshot(page, "login-refused")


def test_admin_sees_the_live_fleet(page: Page, fleet: DashboardFleet) -> None:
    sign_in(page, fleet, fleet.admin_token)
    expect(page.locator("#who")).to_contain_text("admin")
    total = page.locator("[data-card=total] .value")
    expect(total).to_have_text(str(BULK + AGENTS))
    expect(page.locator("#device-table tbody tr")).to_have_count(25)
    expect(page.locator("#page-info")).to_contain_text(f"of {(BULK + AGENTS + 24) // 25}")
    # Counts are drawn as bars, and the live charts are drawn (with lines once telemetry came).
    expect(page.locator("#fleet-counts svg.bar-chart")).to_have_count(4)
    expect(page.locator("#fleet-counts rect.bar").first).to_be_visible()
    expect(page.locator("#fleet-charts svg.line-chart")).to_have_count(4)
    expect(page.locator("#fleet-charts path.line.s4").first).to_be_visible(timeout=15_000)
    screenshot(page, "fleet-overview")


def test_search_and_paging_with_a_thousand_devices(page: Page, fleet: DashboardFleet) -> None:
    sign_in(page, fleet, fleet.admin_token)
    expect(page.locator("#page-info")).to_contain_text("page 1 of 41")
    first = page.locator("#device-table tbody tr").first
    expect(first).to_have_attribute("data-device", "bulk-0000")
    page.click("#next-page")
    expect(page.locator("#page-info")).to_contain_text("page 2 of 41")
    expect(first).to_have_attribute("data-device", "bulk-0025")
    page.fill("#device-search", "live-edge")
    expect(page.locator("#device-table tbody tr")).to_have_count(AGENTS)
    expect(page.locator("#page-info")).to_contain_text(f"page 1 of 1 · {AGENTS} devices")
    page.fill("#device-search", "bulk-09")
    expect(page.locator("#page-info")).to_contain_text("100 devices")
    screenshot(page, "fleet-search")


def test_device_detail_shows_state_and_telemetry(page: Page, fleet: DashboardFleet) -> None:
    generation = fleet.http.put(
        "/api/v1/devices/live-edge-01/desired", json={"policy": {"telemetry_interval_s": 1}}
    ).json()["generation"]
    sign_in(page, fleet, fleet.admin_token)
    page.fill("#device-search", "live-edge-01")
    page.click("a[href='#/device/live-edge-01']")
    expect(page.locator("#view h1")).to_have_text("Device live-edge-01")
    expect(page.locator("#desired")).to_contain_text(f"generation {generation}")
    expect(page.locator("#sync")).to_contain_text("In sync", timeout=15_000)
    expect(page.locator("#reported")).to_contain_text(f"observed generation {generation}")
    expect(page.locator("#device-charts svg.line-chart")).to_have_count(5)
    expect(page.locator("#device-charts path.line.s1").first).to_be_visible()
    expect(page.locator("[data-mutating]").first).to_be_attached()  # admin may edit
    screenshot(page, "device-detail")


def test_viewer_sees_no_mutating_controls(page: Page, fleet: DashboardFleet) -> None:
    viewer = fleet.token("browser-viewer", "viewer")
    sign_in(page, fleet, viewer)
    expect(page.locator("#who")).to_contain_text("viewer")
    expect(page.locator("#device-table tbody tr")).to_have_count(25)
    for path in ("#/device/live-edge-01", "#/rollouts", "#/policies"):
        page.goto(f"{fleet.url}/dashboard/{path}")
        expect(page.locator("#view h1")).to_be_visible()
        page.wait_for_load_state("networkidle")
        assert page.locator("[data-mutating]").count() == 0, f"mutating control on {path}"
        assert page.locator("textarea").count() == 0
        screenshot(page, f"viewer-{re.sub(r'[^a-z]+', '-', path).strip('-')}")
    # The server refuses anyway: the page hides nothing the API would allow.
    refused = fleet.http.put(
        "/api/v1/devices/live-edge-01/desired",
        json={"policy": {}},
        headers={"Authorization": f"Bearer {viewer}"},
    )
    assert refused.status_code == 403


def test_operator_starts_a_rollout_and_watches_it_progress(
    page: Page, fleet: DashboardFleet
) -> None:
    fleet.register_model("dash-model", "1.0")
    operator = fleet.token("browser-operator", "operator")
    sign_in(page, fleet, operator)
    page.click("nav a[data-page=rollouts]")
    expect(page.locator("#start-rollout")).to_be_visible()
    page.select_option("#rollout-model", "dash-model")
    expect(page.locator("#rollout-version")).to_have_value("1.0")
    page.fill("#rollout-labels", "site=lab")
    page.fill("#rollout-canary", "0.34")
    page.fill("#rollout-wave-size", "1")
    page.fill("#rollout-interval", "0")
    page.click("#start-rollout-button")
    expect(page.locator("#view .error").first).to_have_text("")
    heading = page.locator("#view h1")
    expect(heading).to_have_text(re.compile(r"^Rollout #\d+$"))
    rollout_id = int(heading.inner_text().removeprefix("Rollout #"))
    expect(page.locator("#rollout-waves [data-wave='0']")).to_contain_text("Canary")
    assert page.locator("#rollout-waves [data-wave]").count() >= 2  # canary, then the rest
    expect(page.locator("#rollout-head")).to_contain_text("dash-model@1.0")
    screenshot(page, "rollout-started")
    # The canary wave leaves "pending" as the engine assigns the version to its device and
    # the real agent answers (the synthetic artifact cannot load there, so it may fail and
    # roll back: either way the page follows the rollout on its own).
    canary = page.locator("[data-wave='0'] h3 .badge")
    expect(canary).not_to_have_text("pending", timeout=30_000)
    screenshot(page, "rollout-progress")
    by_state = {
        sample.labels["state"]: sample.value
        for family in text_string_to_metric_families(fleet.http.get("/metrics").text)
        for sample in family.samples
        if sample.name == "spillway_rollouts"
    }
    assert sum(by_state.values()) == 1  # the one rollout, in exactly one state
    state = fleet.http.get(f"/api/v1/rollouts/{rollout_id}").json()["state"]
    assert state in by_state
