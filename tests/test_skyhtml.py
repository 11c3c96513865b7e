"""The interactive sky map in a real browser (headless Chromium): renders without console
errors, draws one point per row, hovering a token shows its string, a box selection gives the
override line of a box that holds exactly the selected tokens."""
import math

import numpy as np

from browser import Page, hammer, need_browser
from embdist import regions, skyhtml


def parse(line: str) -> dict:
    return {kv.split("=")[0][len("bbox."):]: float(kv.split("=")[1]) for kv in line.split()}


def test_page_in_chromium(tmp_path):
    need_browser()
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(0)
    n = 20_000
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    r = rng.uniform(0.1, 1, n)
    # a lone token with a hostile string, far from every other point
    lat[7], lon[7] = 0.0, 0.0
    far = np.hypot(*(np.subtract(hammer(lat, lon), np.reshape(hammer(0.0, 0.0), (2, 1))))) < 0.08
    far[7] = False
    lat[far] = -60.0
    strings = [f"tok{i}" for i in range(n)]
    strings[7] = '</script><b>"Ωmega" \\ ü'
    cats = ["normal"] * n
    cats[11] = "unused"
    ids = np.arange(n) + 5
    groups = np.full(n, -1)
    reg = [{"rank": 1, "lat_min": 20.0, "lat_max": 40.0, "lon_min": 170.0, "lon_max": -170.0, "r_min": 0.0,
            "r_max": 1.0, "tokens": 10, "expected": 2.0, "significance": 6.0},
           {"rank": 2, "lat_min": 80.0, "lat_max": 90.0, "lon_min": -180.0, "lon_max": 180.0, "r_min": 0.0,
            "r_max": 1.0, "tokens": 10, "expected": 2.0, "significance": 6.0}]
    box = {"lat_min": -90.0, "lat_max": 90.0, "lon_min": -180.0, "lon_max": 180.0, "r_min": 0.0, "r_max": math.inf}
    page = skyhtml.write_sky_html(tmp_path / "sky.html", ids=ids, lat=lat, lon=lon, r=r, strings=strings,
                                  categories=cats, groups=groups, regions=reg, box=box, title="test sky")
    with sync_playwright() as pw:
        p = Page(pw, page)
        try:
            assert p.points() == n
            assert p.gl_traces() == 2  # normal and unused, WebGL
            text = p.hover(0.0, 0.0)
            assert "id 12" in text and "Ωmega" in text and "normal" in text
            assert p.page.locator("#regions tbody tr").count() == 2
            assert "bbox.lon_min=170 bbox.lon_max=-170" in p.page.inner_text("#regions")
            assert p.page.evaluate("window.skyData.box.r_max") is None  # bbox=all: r_max = inf
            nsel, line = p.select(10.0, -40.0, 40.0, -10.0)
            box = parse(line)
            # the tokens whose projected point lies in the dragged rectangle, found here from
            # the projection written again (tests/browser.hammer)
            x, y = hammer(lat, lon)
            (x0, y0), (x1, y1) = hammer(10.0, -40.0), hammer(40.0, -10.0)
            sel = (x >= min(x0, x1)) & (x <= max(x0, x1)) & (y >= min(y0, y1)) & (y <= max(y0, y1))
            edge = (np.abs(x - x0) < 2e-3) | (np.abs(x - x1) < 2e-3) | (np.abs(y - y0) < 2e-3) | (np.abs(y - y1) < 2e-3)
            assert abs(int(nsel.split()[0]) - sel.sum()) <= edge.sum() and sel.sum() > 50
            core = sel & ~edge
            # the override box holds every selected token and is their extent (+ rounding)
            assert regions.in_box(lat[core], lon[core], r[core], box).all()
            wide = sel | edge & (np.abs(lat - 25) < 20) & (np.abs(lon + 25) < 20)
            for k, v in (("lat", lat), ("lon", lon), ("r", r)):
                assert v[wide].min() - 2e-3 <= box[f"{k}_min"] <= v[core].min()
                assert v[core].max() <= box[f"{k}_max"] <= v[wide].max() + 2e-3
            assert p.errors == [], p.errors
        finally:
            p.close()
