# Screenshot of the MLflow compare view for README (docs only, not part of embdist):
#   pip install playwright  (in any venv; uses Debian's /usr/bin/chromium, no browser download)
#   python docs/screenshot_mlflow_compare.py "http://127.0.0.1:5000/#/compare-runs?runs=[...]&experiments=[...]" out.png
import sys
from playwright.sync_api import sync_playwright
url, out = sys.argv[1], sys.argv[2]
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"])
    pg = b.new_page(viewport={"width": 1500, "height": 1250})
    pg.goto(url)
    pg.wait_for_timeout(6000)
    # close the assistant side panel if present
    try:
        pg.get_by_role("button", name="Close").last.click(timeout=2000)
    except Exception as e:
        print("no close", e)
    # metrics select: remove default metric, add ours
    try:
        pg.locator("text=time/load_s").first.locator("xpath=..").locator("[aria-label*='close'], [role='img'], svg").first.click(timeout=3000)
    except Exception as e:
        print("no remove", e)
    pg.wait_for_timeout(500)
    for name in ["n_tokens", "euclidean/mean", "euclidean/min"]:
        try:
            box = pg.locator("input").nth(1)
            box.click(timeout=3000); box.fill(name); pg.wait_for_timeout(500); pg.keyboard.press("Enter")
        except Exception as e:
            print("no add", name, e)
    pg.mouse.click(1000, 60)
    pg.wait_for_timeout(1500)
    pg.screenshot(path=out)
    b.close()
