"""The browser of the web tests: Debian's chromium driven by Playwright (browser downloads do
not work offline), WebGL on SwiftShader as there is no GPU, on the built bundle (web/dist)
served by a live twin. Screenshots go to tests/artifacts/.

Importing this module skips the importing test module when Playwright is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
DIST_INDEX = ROOT / "web" / "dist" / "index.html"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# WebGL without a GPU: ANGLE on SwiftShader.
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--ignore-gpu-blocklist", "--no-sandbox"]


def need_built_web() -> None:
    """Fails (never skips) when the map's bundle is not built."""
    if not DIST_INDEX.exists():
        pytest.fail("web/dist is not built: run `make web` (or npm ci && npm run build in web/)")


@contextmanager
def chromium() -> Iterator[playwright_api.Browser]:
    """Debian's chromium, launched by Playwright; closed on the way out."""
    assert CHROMIUM.exists(), "Debian's chromium is missing: `make browser-deps` installs it"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def artifact(name: str) -> Path:
    """Where a screenshot called ``name`` goes."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


class BrowserPage:
    """One browser page on the 2D map (``window.__twinMap``), its console errors recorded."""

    def __init__(self, page, base_url: str, timeout_ms: float):
        self.page = page
        self.base_url = base_url
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.set_default_timeout(timeout_ms)

    def idle(self) -> None:
        self.page.wait_for_function("window.__twinMap.loaded() && !window.__twinMap.isMoving()")

    def jump(self, lon: float, lat: float, zoom: float) -> None:
        self.page.evaluate("([lon, lat, zoom]) => window.__twinMap.jumpTo("
                           "{center: [lon, lat], zoom, pitch: 0, bearing: 0})", [lon, lat, zoom])
        self.idle()

    def screen(self, lon: float, lat: float) -> tuple[float, float]:
        """Page x, y where the map draws lon/lat (map.project gives canvas pixels)."""
        x, y = self.page.evaluate(
            "([lon, lat]) => { const p = window.__twinMap.project([lon, lat]);"
            " const r = window.__twinMap.getCanvas().getBoundingClientRect();"
            " return [r.left + p.x, r.top + p.y]; }", [lon, lat])
        return x, y

    def click_lonlat(self, lon: float, lat: float) -> None:
        self.page.mouse.click(*self.screen(lon, lat))

    def screenshot(self, name: str) -> None:
        self.page.screenshot(path=str(artifact(name)))
