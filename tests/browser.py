"""Headless Chromium (Debian's /usr/bin/chromium) driven by playwright, for the sky-map pages.
No browser is downloaded: the tests skip with the reason when either is missing."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def need_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the test extra has it)")
    if not Path(CHROMIUM).is_file():
        pytest.skip("no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")


def hammer(lat, lon):
    """The page's projection, written again here."""
    p, l = np.radians(lat), np.radians(lon)
    w = np.sqrt(1 + np.cos(p) * np.cos(l / 2))
    return 2 * math.sqrt(2) * np.cos(p) * np.sin(l / 2) / w, math.sqrt(2) * np.sin(p) / w


class Page:
    """An opened sky map: console errors, load time, point count, hover and box selection."""

    def __init__(self, pw, path: Path, timeout_ms: int = 60_000):
        import time

        self.browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        t0 = time.perf_counter()
        self.page.goto(Path(path).resolve().as_uri())
        self.page.wait_for_function("window.skyReady === true", timeout=timeout_ms)
        self.open_s = time.perf_counter() - t0

    def points(self) -> int:
        return self.page.evaluate(
            "document.getElementById('sky').data.filter(t => t.meta === 'points').reduce((s, t) => s + t.x.length, 0)")

    def gl_traces(self) -> int:
        return self.page.evaluate(
            "document.getElementById('sky')._fullData.filter(t => t.type === 'scattergl' && t.visible).length")

    def pixel(self, x: float, y: float) -> tuple[float, float]:
        return tuple(self.page.evaluate("""([x, y]) => { const gd = document.getElementById('sky');
            const L = gd._fullLayout, b = gd.getBoundingClientRect();
            return [b.left + L.xaxis._offset + L.xaxis.l2p(x), b.top + L.yaxis._offset + L.yaxis.l2p(y)]; }""", [x, y]))

    def hover(self, lat: float, lon: float) -> str:
        x, y = hammer(lat, lon)
        px, py = self.pixel(float(x), float(y))
        self.page.mouse.move(px + 3, py + 3)
        self.page.mouse.move(px, py)
        self.page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
        return self.page.evaluate("Array.from(document.querySelectorAll('.hoverlayer .hovertext text tspan, .hoverlayer .hovertext text')).map(e => e.textContent).join('\\n')")

    def select(self, lat0, lon0, lat1, lon1) -> tuple[str, str]:
        """Drag a box between two sky positions; (selection count text, override line)."""
        (ax, ay), (bx, by) = (self.pixel(*map(float, hammer(la, lo))) for la, lo in ((lat0, lon0), (lat1, lon1)))
        self.page.mouse.move(ax, ay)
        self.page.mouse.down()
        self.page.mouse.move((ax + bx) / 2, (ay + by) / 2, steps=5)
        self.page.mouse.move(bx, by, steps=5)
        self.page.mouse.up()
        self.page.wait_for_function("document.getElementById('override').textContent.length > 0", timeout=10_000)
        return self.page.inner_text("#nsel"), self.page.inner_text("#override")

    def close(self):
        self.browser.close()
