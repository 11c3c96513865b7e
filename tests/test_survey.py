"""task=survey on the shipped all-MiniLM-L6-v2, through `python -m embdist` (real MLflow sqlite
store, real run folder), its outputs checked against independent references: the sky from an
SVD, the vocabulary read from vocab.txt, reachability one id at a time, the magikarp indicator
in float64 numpy, and the page opened in headless Chromium."""

import numpy as np
import pytest

from browser import Page, hammer, need_browser
from conftest import assert_png, client_for, numpy_sky, run_embdist, runs_of
from embdist import regions, sources, tokens
from embdist.tables import read_csv


@pytest.fixture(scope="module")
def survey_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    run_dir = tmp_path_factory.mktemp("run")
    p = run_embdist("task=survey", "task.progress=false", f"hydra.run.dir={run_dir}", home=home,
                    env={"EMBDIST_HOME": str(home)})
    (run,) = runs_of(home)
    return home, run_dir, run, p.stdout + p.stderr


def minilm():
    path = sources.packaged_minilm_path()
    w = sources.load_matrix(path).tensor.numpy().astype(np.float64)
    vocab = (path / "vocab.txt").read_text(encoding="utf-8").split("\n")[: len(w)]
    return path, w, vocab


def test_first_region_holds_the_unused_tokens(survey_run):
    home, run_dir, run, out = survey_run
    assert run.info.status == "FINISHED"
    _, w, vocab = minilm()
    lat, lon, r = numpy_sky(w, 2, 1, 3)
    unused = np.array([v.startswith("[unused") and v.endswith("]") for v in vocab])
    assert unused.sum() == 994
    rows = read_csv(run_dir / "regions.csv")
    assert len(rows) == run.data.metrics["regions"] == 4  # README
    first = {k: float(rows[0][k]) for k in regions.BOX_KEYS}
    inside = regions.in_box(lat, lon, r, first)
    assert (inside & unused).sum() >= 0.95 * 994
    assert abs(inside.sum() - int(rows[0]["tokens"])) <= 2  # two PCAs may differ at a face
    assert int(rows[0]["n_unused"]) == (inside & unused).sum()
    assert (int(rows[0]["tokens"]), int(rows[0]["n_unused"]), int(rows[0]["n_normal"])) == (1901, 993, 908)  # README
    assert [int(g["rank"]) for g in rows] == list(range(1, len(rows) + 1))
    assert all(float(a["excess"]) >= float(b["excess"]) for a, b in zip(rows, rows[1:]))
    for g in rows:
        assert float(g["significance"]) >= 5 and float(g["tokens"]) - float(g["expected"]) >= 10
        box = {k: float(g[k]) for k in regions.BOX_KEYS}
        line = " ".join(f"bbox.{k}={g[k]}" for k in regions.BOX_KEYS)
        assert g["override"] == regions.override_line(box)
        assert run.data.tags[f"region.{g['rank']}.override"] == g["override"]
        assert f"paste: {g['override']}" in out  # in the log too
        n_cat = sum(int(g[f"n_{c}"]) for c in tokens.CATEGORIES)
        assert n_cat == int(g["tokens"])
        assert line.count("bbox.") == 6


def test_tokens_csv_against_references(survey_run):
    home, run_dir, run, _ = survey_run
    path, w, vocab = minilm()
    rows = read_csv(run_dir / "tokens.csv")
    assert len(rows) == len(w) == 30522
    assert [int(t["id"]) for t in rows] == list(range(len(w)))
    assert all(t["string"] == vocab[i] for i, t in enumerate(rows))
    lat, lon, r = numpy_sky(w, 2, 1, 3)
    np.testing.assert_allclose([float(t["lat"]) for t in rows], lat, atol=1e-6)
    np.testing.assert_allclose([float(t["r"]) for t in rows], r, rtol=1e-9)
    # exact duplicates by brute force (np.unique over the rows)
    _, inv, counts = np.unique(w, axis=0, return_inverse=True, return_counts=True)
    dup = counts[inv.ravel()] > 1
    assert np.array_equal(np.array([int(t["duplicate_group"]) >= 0 for t in rows]), dup)
    assert run.data.metrics["duplicate_tokens"] == dup.sum()
    assert run.data.metrics["distinct_vectors"] == len(counts)
    # reachability one id at a time
    tok = tokens.load_tokenizer(path)
    tok.no_padding()  # MiniLM's tokenizer.json pads every encoding to 128 ids
    tok.no_truncation()
    reach = np.array([tok.encode(tok.decode([i], skip_special_tokens=False), add_special_tokens=False).ids == [i]
                      for i in range(len(w))])
    assert np.array_equal(np.array([t["reachable"] == "1" for t in rows]), reach)
    unused = np.array([t["category"] == "unused" for t in rows])
    assert not reach[unused].any() and reach.sum() > 15000
    assert run.data.metrics["unreachable"] == (~reach).sum() == 6823  # README
    assert sum(not reach[i] and vocab[i].startswith("##") for i in range(len(w))) == 5828  # README
    # magikarp: first PC (SVD of the centred matrix) removed, cosine distance to the unused mean
    _, _, vt = np.linalg.svd(w - w.mean(0), full_matrices=False)
    v = vt[0]
    red = w - np.outer(w @ v, v)
    m = red[unused].mean(0)
    ref = 1 - red @ m / (np.linalg.norm(red, axis=1) * np.linalg.norm(m))
    np.testing.assert_allclose([float(t["magikarp"]) for t in rows], ref, rtol=1e-9, atol=1e-12)
    assert ref[unused].mean() < ref[~unused].mean()
    region1 = np.array([t["region"] == "1" for t in rows])
    normal = np.array([t["category"] == "normal" for t in rows])
    assert (round(ref[unused].mean(), 2), round(ref[region1 & normal].mean(), 2), round(ref[normal].mean(), 2)) \
        == (0.11, 0.18, 0.93)  # README
    assert (region1 & ~reach).sum() == 1541  # README
    assert run.data.metrics["magikarp_reference_rows"] == unused.sum() == 994
    # region column: the first region whose box holds the row
    reg = read_csv(run_dir / "regions.csv")
    label = np.zeros(len(w), int)
    for g in reversed(reg):
        label[regions.in_box(lat, lon, r, {k: float(g[k]) for k in regions.BOX_KEYS})] = int(g["rank"])
    got = np.array([int(t["region"]) for t in rows])
    assert (got != label).sum() <= 2 and (got == 1).sum() == int(reg[0]["tokens"])


def test_artifacts_on_the_run(survey_run):
    home, run_dir, run, _ = survey_run
    c = client_for(home)
    arts = {a.path for d in ("tables", "plots", "html") for a in c.list_artifacts(run.info.run_id, d)}
    assert {"tables/regions.csv", "tables/tokens.csv", "plots/sky_map_regions.png", "html/sky_map.html"} <= arts
    assert_png(run_dir / "sky_map_regions.png")
    assert {"time/pca_s", "time/regions_s", "time/duplicates_s", "time/flags_s"} <= set(run.data.metrics)


def test_survey_page_in_chromium(survey_run):
    need_browser()
    from playwright.sync_api import sync_playwright

    home, run_dir, run, _ = survey_run
    rows = read_csv(run_dir / "tokens.csv")
    lat = np.array([float(t["lat"]) for t in rows])
    lon = np.array([float(t["lon"]) for t in rows])
    # the token whose projected point is farthest from any other: hovering it is unambiguous
    x, y = hammer(lat, lon)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
    i = int(np.argmax(d[:, 1]))
    with sync_playwright() as pw:
        p = Page(pw, run_dir / "sky_map.html")
        try:
            assert p.points() == len(rows) == 30522
            text = p.hover(lat[i], lon[i])
            assert f"id {rows[i]['id']} " in text and rows[i]["string"] in text
            n_reg = len(read_csv(run_dir / "regions.csv"))
            assert p.page.locator("#regions tbody tr").count() == n_reg
            assert p.errors == [], p.errors
            assert p.open_s < 10
        finally:
            p.close()


def test_untrained_ids_outside_the_matrix_are_refused_before_the_work(tmp_path):
    p = run_embdist("task=survey", "survey.untrained_ids=[5,30522,999999]", "task.progress=false",
                    f"hydra.run.dir={tmp_path / 'run'}", home=tmp_path, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert last == ("embdist: error: survey.untrained_ids [30522, 999999] are not a row of all-MiniLM-L6-v2 "
                    "(30,522 rows: ids 0..30521); give token ids of this matrix"), last
    (r,) = runs_of(tmp_path)
    assert r.info.status == "FAILED" and "time/pca_s" not in r.data.metrics  # refused before the PCA
