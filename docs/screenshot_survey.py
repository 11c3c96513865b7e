# Screenshot of the interactive sky map for README (docs only):
#   python docs/screenshot_survey.py RUN_DIR/sky_map.html RUN_DIR/tokens.csv TOKEN_ID out.png
# Opens the page in Debian's headless chromium (playwright, no browser download; tests/browser.py)
# and hovers the token TOKEN_ID.
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import Page  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

page, table, token, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
row = next(r for r in csv.DictReader(open(table, encoding="utf-8")) if int(r["id"]) == token)
with sync_playwright() as pw:
    p = Page(pw, Path(page))
    p.page.set_viewport_size({"width": 1400, "height": 900})
    print(p.hover(float(row["lat"]), float(row["lon"])))
    p.page.screenshot(path=out)
    p.close()
