#!/usr/bin/env python
"""Benchmark of task=survey on a Qwen3-4B-sized matrix, one process.

    python benchmarks/bench_survey.py [--n 151936] [--d 2560] [--no-browser] [--no-mlflow]

Row (issue 12): 151,936 x 2,560 synthetic bf16 rows (benchmarks/bench_vocab.planted: random
rows plus the Qwen3-4B dead-token structure, 2,221 rows within one bf16 step of a point), the
last 267 rows treated as beyond the tokenizer (magikarp's reference rows, as Qwen3-4B's padding).
  * the survey's work (PCA, sky, regions, duplicate hashing, magikarp indicator; no N^2 work)
    against the PCA step alone, measured in this run.  Target: <= 3x.
  * the interactive page: its size (target < 40 MB) and the time headless Chromium needs to
    open and draw it (target < 10 s), the number of points drawn checked against the rows.
The first region must hold >= 95 % of the planted dead rows and the duplicate groups must be
the planted ones, so a fast wrong answer cannot pass.  Tokenizer reachability needs a
tokenizer (none for a synthetic matrix); it is timed on MiniLM's 30,522 ids instead.
Results are printed and logged to MLflow (experiment "embdist-benchmarks").
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
try:
    import embdist  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
import torch

from bench_vocab import DEAD_GROUPS, DEAD_UNIQUE, planted, vm_hwm_mb
from embdist import flags, geometry, selection, sources, tokens
from embdist.config import BasisConfig, SurveyConfig
from embdist.tasks import survey


def survey_work(x: torch.Tensor, cfg, beyond: int):
    """What task=survey computes, stage by stage: {stage: seconds}, and the results."""
    t, out = {}, {}
    t0 = time.perf_counter()
    pcs, sky = selection.sky_of(cfg, x)
    t["pca+sky"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["regions"] = survey.detect(cfg, sky)
    t["regions"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["labels"] = survey.group_labels(x)
    t["duplicates"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["magikarp"] = flags.magikarp_indicator(x, np.arange(len(x) - beyond, len(x)), geometry.pc_vector(pcs, 1))
    t["magikarp"] = time.perf_counter() - t0
    return t, out, sky


def open_in_browser(page: Path, rows: int) -> float:
    sys.path.insert(0, str(REPO / "tests"))
    from browser import CHROMIUM, Page
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError("no chromium")
    with sync_playwright() as pw:
        p = Page(pw, page, timeout_ms=120_000)
        try:
            drawn = p.points()
            if drawn != rows or p.errors:
                raise AssertionError(f"page drew {drawn} of {rows} points; console errors {p.errors}")
            return p.open_s
        finally:
            p.close()


def matrix(n: int, d: int, cache: str) -> torch.Tensor:
    """benchmarks/bench_vocab.planted(n, d), built once and kept under ``cache`` (bf16, n x d x 2 bytes)."""
    path = Path(cache) / f"planted_{n}x{d}_seed0.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    x = planted(n, d)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(x, tmp)
    os.replace(tmp, path)
    return x


def token_strings(n: int, seed: int = 0) -> list[str]:
    """Stand-ins for a byte-level BPE vocabulary's strings (1-12 characters, mean ~6.5, Latin with
    the leading-space mark, Thai, CJK, quotes and backslashes), so the page's size is realistic."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("etaoinshrdlucmfwypvbgkqjxz") * 3 + list("ĠĠĠĊ") + ["ภ", "า", "的", "是", "\\", '"', "é"])
    lengths = rng.integers(1, 13, n)
    chars = alphabet[rng.integers(0, len(alphabet), int(lengths.sum()))]
    cut = np.concatenate([[0], np.cumsum(lengths)])
    return ["".join(chars[cut[i]:cut[i + 1]]) for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=151_936)
    ap.add_argument("--d", type=int, default=2560)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "embdist-bench"),
                    help="folder where the synthetic matrix is kept between runs")
    a = ap.parse_args()
    beyond = 267
    cfg = SimpleNamespace(basis=BasisConfig(), survey=SurveyConfig())
    x = matrix(a.n, a.d, a.cache)
    centre = x[int(np.flatnonzero(survey.group_labels(x) >= 0)[0])].float()
    dead = np.concatenate([np.flatnonzero((x[i:i + 8192].float() - centre).abs().amax(1).numpy() <= 0.01)
                           + i for i in range(0, len(x), 8192)])  # the planted rows, found chunk by chunk
    t0 = time.perf_counter()
    geometry.pca(x)
    t_pca = time.perf_counter() - t0
    t0 = time.perf_counter()
    stages, out, sky = survey_work(x, cfg, beyond)
    t_survey = time.perf_counter() - t0

    found = out["regions"]
    held = np.isin(dead, found[0].members).mean() if found else 0.0
    sizes = sorted(np.bincount(out["labels"][out["labels"] >= 0]).tolist())
    sizes = sorted(s for s in sizes if s)
    # Reference for the duplicate groups, independent of embdist.rows: numpy's sort-based unique of
    # the raw bits.  At the full width they are the planted groups; at small widths (d ~ 256)
    # some jittered "unique" dead rows get no jitter at all and join a planted group.
    truth = sorted(int(k) for k in np.unique(x.view(torch.int16).numpy().view(np.dtype((np.void, 2 * a.d))).ravel(),
                                             return_counts=True)[1] if k > 1)
    ok = held >= 0.95 and sizes == truth and len(dead) == sum(DEAD_GROUPS) + DEAD_UNIQUE

    # reachability on a real tokenizer (MiniLM): the rate, scaled to the synthetic matrix's rows
    tok = tokens.load_tokenizer(sources.packaged_minilm_path())
    t0 = time.perf_counter()
    flags.reachable(tok, np.arange(tok.get_vocab_size()))
    t_reach = (time.perf_counter() - t0) * a.n / tok.get_vocab_size()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ids = np.arange(a.n)
        cats = ["normal"] * (a.n - beyond) + ["beyond_vocab"] * beyond
        page = survey.write_html(Path(tmp) / "sky_map.html", ids, sky, token_strings(a.n), cats,
                                 out["labels"], [survey.region_dict(g) for g in found], None, "bench")
        t_html = time.perf_counter() - t0
        size_mb = page.stat().st_size / 1e6
        t_open = None
        if not a.no_browser:
            try:
                t_open = open_in_browser(page, a.n)
            except (ImportError, FileNotFoundError) as e:
                print(f"(browser row skipped: {e})")

    total = t_survey + t_reach
    peak_mb = vm_hwm_mb()  # this process (the browser is another)
    lines = [
        f"matrix {a.n:,} x {a.d:,} bf16 (synthetic; {len(dead):,} dead rows planted, {beyond} beyond the tokenizer)",
        f"PCA step alone                         {t_pca:8.2f} s",
        "survey stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()),
        f"reachability (MiniLM rate, scaled)     {t_reach:8.2f} s",
        f"survey work (PCA ... flags)            {total:8.2f} s   ratio {total / t_pca:5.2f}x   target <= 3x",
        f"  with the page written too            {total + t_html:8.2f} s   ratio {(total + t_html) / t_pca:5.2f}x",
        f"HTML page                              {size_mb:8.1f} MB  (written in {t_html:.1f} s)   target < 40 MB",
        f"page open in headless Chromium         " + (f"{t_open:8.2f} s   target < 10 s" if t_open is not None else "skipped"),
        f"peak memory of this process (VmHWM)    {peak_mb / 1024:8.2f} GB",
        f"regions {len(found)}; region 1 holds {held:.1%} of the dead rows; duplicate groups {'as planted' if sizes == sorted(DEAD_GROUPS) else sizes}"
        + f" ({'equal to' if sizes == truth else 'NOT equal to'} numpy's unique of the bits)",
        "checks: " + ("PASS" if ok else "FAIL"),
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_mlflow:
        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(REPO / 'mlflow.db').resolve()}")
        mlflow.set_experiment("embdist-benchmarks")
        with mlflow.start_run(run_name=f"bench_survey {time.strftime('%Y-%m-%d %H:%M')}"):
            mlflow.log_params({"n": a.n, "d": a.d})
            mlflow.log_metrics({"pca_s": t_pca, "survey_s": total, "ratio": total / t_pca, "html_mb": size_mb,
                                "region1_dead_share": held, **({"open_s": t_open} if t_open is not None else {}),
                                "peak_rss_mb": peak_mb, **{f"{k.replace('+', '_')}_s": v for k, v in stages.items()}})
            mlflow.log_text(text, "bench_survey.txt")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
