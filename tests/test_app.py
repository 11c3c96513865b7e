"""End to end: `python -m embdist ...` as subprocesses, outputs and MLflow runs checked
against independent float64 references."""
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.spatial.distance import cdist

from conftest import assert_png, bf16_round, client_for, numpy_sky, run_embdist, runs_of, upper_stats
from embdist import sources
from embdist.tables import read_csv
from embdist.tracking import sha256


def output_of(run, name: str) -> Path:
    p = Path(run.data.tags[f"output.{name}"])
    assert p.is_file()
    assert run.data.tags[f"sha256.{name}"] == sha256(p)
    return p


def test_overdensity_planted_groups_both_metrics(home, planted_matrix):
    path, w, groups = planted_matrix
    p = run_embdist("model=custom", f"model.path={path}", "bbox=all", "metric=both", "task.progress=false", home=home)
    assert "Exact zeros (off-diagonal): 22" in p.stdout + p.stderr
    (run,) = runs_of(home)
    assert run.info.status == "FINISHED"
    out = load_file(str(output_of(run, "distances")))
    assert set(out) == {"distances", "chebyshev_distances", "spike_token_ids"}
    assert torch.equal(out["spike_token_ids"], torch.arange(300))
    ref = cdist(w.astype(np.float64), w.astype(np.float64))
    d = out["distances"].numpy()
    assert d.dtype == np.float32
    identical = ref == 0
    assert np.array_equal(d == 0, identical)  # 0 exactly iff identical rows
    np.testing.assert_allclose(d[~identical], ref[~identical], rtol=2e-6)
    assert d[20, 21] > 0  # one bf16 step apart is not a duplicate
    cheb = np.abs(w[:, None, :] - w[None, :, :]).max(-1)  # the seed's formula, float32
    assert np.array_equal(out["chebyshev_distances"].numpy(), cheb)

    m = run.data.metrics
    assert m["n_tokens"] == 300 and m["n_pairs"] == comb(300, 2)
    assert m["euclidean/zero_pairs"] == sum(comb(len(g), 2) for g in groups) == 22
    for metric, mat in (("euclidean", ref), ("chebyshev", cheb)):
        st = upper_stats(mat)
        for k in ("min", "median", "mean", "max"):
            assert m[f"{metric}/{k}"] == pytest.approx(st[k], rel=2e-6, abs=1e-12), (metric, k)
        assert m[f"{metric}/zero_pairs"] == st["zero_pairs"]
    assert {"time/pca_s", "time/pairwise_euclidean_s", "peak_rss_mb"} <= set(m)
    assert run.data.params["bbox.lat_min"] == "-90.0" and run.data.params["model.path"] == str(path)
    assert run.data.tags["embdist.tensor"] == "model.embed_tokens.weight"
    arts = {a.path for a in client_for(home).list_artifacts(run.info.run_id)}
    assert {".hydra", "embdist.log"} <= arts
    hydra_arts = {a.path for a in client_for(home).list_artifacts(run.info.run_id, ".hydra")}
    assert ".hydra/config.yaml" in hydra_arts and ".hydra/overrides.yaml" in hydra_arts

    # Tables agree with the run's numbers and with the references.
    run_dir = Path(run.data.tags["embdist.run_dir"])
    rows = read_csv(run_dir / "tokens.csv")
    assert len(rows) == m["n_tokens"] == 300
    assert [int(r["id"]) for r in rows] == list(range(300))
    assert all(r["category"] == "unknown" and r["string"] == r["id"] for r in rows)  # no tokenizer here
    masked = ref + np.diag(np.full(300, np.inf))
    for r in rows:
        i = int(r["id"])
        assert int(r["nearest_id"]) == int(np.argmin(masked[i]))  # ties: smaller id
        assert float(r["nearest_euclidean"]) == pytest.approx(masked[i].min(), rel=2e-6, abs=0)
        assert float(r["norm"]) == pytest.approx(np.linalg.norm(w[i].astype(np.float64)), rel=1e-12)
    assert min(float(r["nearest_euclidean"]) for r in rows) == m["euclidean/min"]
    grp = read_csv(run_dir / "duplicate_groups.csv")
    assert sorted(int(g["size"]) for g in grp) == sorted(len(g) for g in groups)
    assert sum(int(g["pairs"]) for g in grp) == m["euclidean/zero_pairs"]
    members = {tuple(int(v) for v in g["member_ids"].split()) for g in grp}
    assert members == {tuple(g) for g in groups}
    assert m["duplicate_groups"] == 3 and m["distinct_vectors"] == 300 - 9
    for png in ("sky_map", "euclidean_histogram", "chebyshev_histogram", "euclidean_heatmap", "group_sizes"):
        assert_png(run_dir / f"{png}.png")
    plots = {a.path for a in client_for(home).list_artifacts(run.info.run_id, "plots")}
    tables = {a.path for a in client_for(home).list_artifacts(run.info.run_id, "tables")}
    assert "plots/sky_map.png" in plots and "plots/euclidean_histogram.png" in plots
    assert tables == {"tables/tokens.csv", "tables/duplicate_groups.csv"}


def test_default_run_is_minilm_and_selects_the_reference_box(home):
    p = run_embdist("task.progress=false", "bbox.lat_min=-20", home=home)  # the command
    (run,) = runs_of(home)
    assert run.info.status == "FINISHED"
    out = load_file(str(output_of(run, "distances")))
    m = sources.load_matrix(sources.packaged_minilm_path())
    w = m.tensor.numpy()
    lat, lon, r = numpy_sky(w, 2, 1, 3)
    box = dict(lat_min=-20, lat_max=65, lon_min=5, lon_max=32, r_min=0.2, r_max=0.5)
    inside = (lat >= box["lat_min"]) & (lat <= box["lat_max"]) & (lon >= box["lon_min"]) & (lon <= box["lon_max"]) \
        & (r >= box["r_min"]) & (r <= box["r_max"])
    ids = out["spike_token_ids"].numpy()
    # Rows within 1e-7 of a face may fall either way between two float64 PCAs.
    edge = np.zeros(len(w), bool)
    for v, lo, hi in ((lat, "lat_min", "lat_max"), (lon, "lon_min", "lon_max"), (r, "r_min", "r_max")):
        edge |= (np.abs(v - box[lo]) < 1e-7) | (np.abs(v - box[hi]) < 1e-7)
    assert set(ids) ^ set(np.where(inside)[0]) <= set(np.where(edge)[0])
    assert 1000 < len(ids) < 10000
    x = w[ids].astype(np.float64)
    sub = np.random.default_rng(0).choice(len(ids), 400, replace=False)
    ref = cdist(x[sub], x)
    np.testing.assert_allclose(out["distances"].numpy()[sub], ref, rtol=2e-6, atol=0)
    assert run.data.metrics["n_tokens"] == len(ids)
    assert run.data.params["bbox.lat_min"] == "-20.0"
    # Token strings from the model's own vocabulary, read here independently.
    vocab = (sources.packaged_minilm_path() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    rows = read_csv(Path(run.data.tags["embdist.run_dir"]) / "tokens.csv")
    assert [int(r["id"]) for r in rows] == ids.tolist()
    assert all(r["string"] == vocab[int(r["id"])] for r in rows)
    unused = sum(vocab[i].startswith("[unused") for i in ids)
    assert unused > 900  # the box is the never-trained [unused*] overdensity
    assert sum(r["category"] == "unused" for r in rows) == unused == run.data.metrics["tokens/unused"]
    for png in ("sky_map", "euclidean_histogram"):
        assert_png(Path(run.data.tags["embdist.run_dir"]) / f"{png}.png")


def make_history(path: Path, t=6, v=16, d=8):
    rng = np.random.default_rng(3)
    h = bf16_round(rng.normal(0, 0.1, (t, v, d)))
    h[0] = h[0, 0]  # step 0: all tokens at one point, as in the qweninit run
    h[1:, 5] = h[1:, 9]  # a pair that never separates
    save_file({"embedding_history": torch.from_numpy(h).to(torch.bfloat16)}, str(path))
    return h


def test_snapshots_on_a_given_history(home, tmp_path):
    h = make_history(tmp_path / "embedding_evolution.safetensors")
    run_embdist("task=snapshots", f"history.path={tmp_path / 'embedding_evolution.safetensors'}",
                "history.expected_steps=6", "history.vocab_size=16", "history.hidden_dim=8", "task.progress=false",
                home=home)
    (run,) = runs_of(home)
    assert run.info.status == "FINISHED"
    out = load_file(str(output_of(run, "pairwise_distances")))
    assert set(out) == {"euclidean_distances", "chebyshev_distances"}
    c = client_for(home)
    off = ~np.eye(16, dtype=bool)
    for step in range(6):
        x = h[step].astype(np.float64)
        e_ref, c_ref = cdist(x, x), np.abs(h[step][:, None] - h[step][None]).max(-1)
        e = out["euclidean_distances"][step].numpy()
        assert np.array_equal(e == 0, e_ref == 0)
        np.testing.assert_allclose(e, e_ref, rtol=2e-6)
        assert np.array_equal(out["chebyshev_distances"][step].numpy(), c_ref)
    for metric, key in (("euclidean", "euclidean_distances"), ("chebyshev", "chebyshev_distances")):
        hist = {k: sorted(c.get_metric_history(run.info.run_id, f"{metric}/{k}"), key=lambda m: m.step)
                for k in ("min", "mean", "max")}
        assert [m.step for m in hist["max"]] == list(range(6))
        for step in range(6):
            x = h[step].astype(np.float64)
            ref = cdist(x, x) if metric == "euclidean" else np.abs(x[:, None] - x[None]).max(-1)
            assert hist["max"][step].value == pytest.approx(ref[off].max(), rel=2e-6)
            assert hist["min"][step].value == pytest.approx(ref[off].min(), rel=2e-6, abs=1e-12)
            assert hist["mean"][step].value == pytest.approx(ref[off].mean(), rel=2e-6)
    assert run.data.metrics["euclidean/zero_pairs"] == 1  # the pair that never separated, final step
    assert run.data.metrics["n_steps"] == 6 and run.data.metrics["n_tokens"] == 16

    run_dir = Path(run.data.tags["embdist.run_dir"])
    rows = read_csv(run_dir / "snapshots.csv")
    assert len(rows) == 6
    for step, r in enumerate(rows):
        assert int(r["distinct_vectors"]) == len(torch.unique(torch.from_numpy(h[step]), dim=0))
        x = h[step].astype(np.float64)
        assert float(r["euclidean_max"]) == pytest.approx(cdist(x, x).max(), rel=2e-6)
        assert float(r["chebyshev_mean"]) == pytest.approx(np.abs(x[:, None] - x[None]).max(-1)[off].mean(), rel=2e-6)
    distinct = sorted(c.get_metric_history(run.info.run_id, "distinct_vectors"), key=lambda m: m.step)
    assert [int(m.value) for m in distinct] == [int(r["distinct_vectors"]) for r in rows] and distinct[0].value == 1
    for png in ("snapshot_curves", "euclidean_final_heatmap", "euclidean_final_histogram", "chebyshev_final_heatmap"):
        assert_png(run_dir / f"{png}.png")


def test_snapshots_float16_storage_and_step_warning(home, tmp_path):
    make_history(tmp_path / "h.safetensors")
    p = run_embdist("task=snapshots", f"history.path={tmp_path / 'h.safetensors'}", "history.expected_steps=5001",
                    "history.vocab_size=16", "history.hidden_dim=8", "task.dtype=float16", "metric=euclidean",
                    "task.progress=false", home=home)
    assert "Snapshot count mismatch! Expected 5,001, got 6" in p.stdout + p.stderr
    (run,) = runs_of(home)
    with safe_open(str(output_of(run, "pairwise_distances")), "pt") as f:
        assert list(f.keys()) == ["euclidean_distances"]
        assert f.get_tensor("euclidean_distances").dtype == torch.float16


def test_snapshots_dimension_mismatch_is_an_error(home, tmp_path):
    make_history(tmp_path / "h.safetensors")
    p = run_embdist("task=snapshots", f"history.path={tmp_path / 'h.safetensors'}", "history.vocab_size=128",
                    home=home, check=False)
    assert p.returncode == 2
    assert "(vocab, dim) = (16, 8)" in p.stderr and "Traceback" not in p.stderr
    (run,) = runs_of(home)
    assert run.info.status == "FAILED" and "(16, 8)" in run.data.tags["error"]


def test_default_snapshots_trains_the_toy_run_once(home):
    args = ("task=snapshots", "history.toy_steps=20", "history.expected_steps=21", "task.progress=false")
    run_embdist(*args, home=home)
    toy = home / "data" / "toy-qweninit" / "embedding_evolution.safetensors"
    with safe_open(str(toy), "pt") as f:
        hist = f.get_tensor("embedding_history")
    assert tuple(hist.shape) == (21, 128, 64) and hist.dtype == torch.bfloat16
    mtime = toy.stat().st_mtime_ns
    run_embdist(*args, home=home)
    assert toy.stat().st_mtime_ns == mtime  # reused, not retrained
    runs = runs_of(home)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert runs[0].data.metrics["euclidean/initial_max"] == 0.0  # every token starts at one vector


def test_multirun_sweep_groups_jobs_under_a_parent(home, planted_matrix):
    path, _, _ = planted_matrix
    run_embdist("-m", "model=custom", f"model.path={path}", "bbox=all", "bbox.lat_min=-90,-10",
                "task.progress=false", home=home)
    runs = runs_of(home)
    parents = [r for r in runs if r.data.tags.get("embdist.sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["bbox.lat_min"] for c in children) == ["-10.0", "-90.0"]
    ns = {c.data.params["bbox.lat_min"]: c.data.metrics["n_tokens"] for c in children}
    assert ns["-90.0"] == 300 and ns["-10.0"] < 300
    assert parents[0].data.metrics["jobs"] == 2


def test_missing_model_fails_cleanly_and_marks_the_run(home, tmp_path):
    p = run_embdist("model=custom", f"model.path={tmp_path / 'missing.safetensors'}", home=home, check=False)
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr
    (run,) = runs_of(home)
    assert run.info.status == "FAILED" and "does not exist" in run.data.tags["error"]
    assert not list(Path(run.data.tags["embdist.run_dir"]).glob("*.safetensors"))


def test_tracking_uri_precedence(home, planted_matrix, tmp_path):
    path, _, _ = planted_matrix
    args = ("model=custom", f"model.path={path}", "bbox=all", "task.progress=false")
    env_db, cfg_db = tmp_path / "env.db", tmp_path / "cfg.db"
    run_embdist(*args, home=home, env={"MLFLOW_TRACKING_URI": f"sqlite:///{env_db}"})
    run_embdist(*args, f"tracking.uri=sqlite:///{cfg_db}", "tracking.experiment=other", home=home,
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{env_db}"})
    assert not (home / "mlflow.db").exists()
    from mlflow.tracking import MlflowClient
    for db, exp in ((env_db, "embdist"), (cfg_db, "other")):
        c = MlflowClient(f"sqlite:///{db}")
        runs = c.search_runs([c.get_experiment_by_name(exp).experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_console_script_is_the_same_entry_point(home):
    import subprocess
    import sys

    script = Path(sys.executable).with_name("embdist")
    p = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=home, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "embdist: the geometry of language-model token embeddings" in p.stdout
    groups: dict = {}
    for line in p.stdout.split("== Config ==")[0].splitlines():      # the groups section
        if ":" in line:
            groups.setdefault(line.split(":")[0].strip(), line.split(":", 1)[1])
    assert {"overdensity", "snapshots", "vocab", "survey"} <= {t.strip() for t in groups["task"].split(",")}
    assert "qwen3-4b-overdensity" in {e.strip() for e in groups["experiment"].split(",")}
    cfg = subprocess.run([str(script), "--cfg", "hydra", "--package", "hydra.job"], capture_output=True,
                         text=True, cwd=home, timeout=120)
    assert "name: embdist" in cfg.stdout  # the job name is not __main__
