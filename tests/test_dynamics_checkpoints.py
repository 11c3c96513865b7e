"""A training run as a series of checkpoints (history.checkpoints): 8 checkpoint folders and files
in the layouts found in the wild, written here, give the same dynamics as the same data stacked
into one history file; `python -m embdist` subprocesses, a real MLflow SQLite store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import bf16_round, run_embdist, runs_of
from embdist import checkpoints
from embdist.tables import read_csv
from test_dynamics import brute_components, brute_events, brute_labels, brute_units
from test_dynamics_app import events_of, series


def make_series(root: Path, t: int = 8, v: int = 40, d: int = 16) -> np.ndarray:
    """A history whose groups split step by step (tokens 30.. never move, 0 and 1 merge at step 5),
    written as 8 checkpoints in the layouts found in the wild."""
    rng = np.random.default_rng(3)
    h = np.zeros((t, v, d), dtype=np.float32)
    cur = np.tile(bf16_round(rng.normal(0, 0.3, d)), (v, 1))
    for s in range(t):
        if s:
            keys = (np.arange(30) * 7 + s) % (s + 1)
            for k in np.unique(keys):
                cur[:30][keys == k] += rng.normal(0, 0.01, d).astype(np.float32)
            cur = bf16_round(cur)
        if s == 5:
            cur[1] = cur[0]
        h[s] = cur
    other = bf16_round(rng.normal(0, 1, (v, d)))
    names = ["step0", "checkpoint-1000", "revision=step2000", "step3000", "step4000.safetensors",
             "global_step5000", "iter_6000", "step7000"]
    for s, name in enumerate(names):
        w = torch.from_numpy(h[s]).to(torch.bfloat16)
        norm = torch.ones(d, dtype=torch.bfloat16)
        p = root / name
        if name.endswith(".safetensors"):
            save_file({"model.embed_tokens.weight": w}, str(p))
            continue
        p.mkdir(parents=True)
        tied = s % 2 == 1
        tensors = {"model.embed_tokens.weight": w} if tied else \
            {"lm_head.weight": w, "model.embed_tokens.weight": torch.from_numpy(other).to(torch.bfloat16)}
        if s in (2, 3, 6):   # sharded: the embedding in the second shard, an index naming them
            shard1 = {"model.norm.weight": norm}
            save_file(shard1, str(p / "model-00001-of-00002.safetensors"))
            save_file(tensors, str(p / "model-00002-of-00002.safetensors"))
            wm = {k: "model-00001-of-00002.safetensors" for k in shard1}
            wm.update({k: "model-00002-of-00002.safetensors" for k in tensors})
            (p / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        else:
            save_file({**tensors, "model.norm.weight": norm}, str(p / "model.safetensors"))
    return h


def test_checkpoint_series_equals_the_stacked_history(home, tmp_path):
    h = make_series(tmp_path / "ckpts")
    hist_file = tmp_path / "stacked.safetensors"
    save_file({"embedding_history": torch.from_numpy(h).to(torch.bfloat16)}, str(hist_file))
    entries = checkpoints.resolve(str(tmp_path / "ckpts" / "*"))
    assert [s for s, _ in entries] == [0, 1000, 2000, 3000, 4000, 5000, 6000, 7000]
    assert checkpoints.resolve([[5, str(entries[1][1])], [1, str(entries[0][1])]]) == [(1, entries[0][1]), (5, entries[1][1])]

    common = ("task.progress=false", "dynamics.thresholds=[0.02,0.05]", "metric=chebyshev")
    # the series with matrices left to the default and too little memory for them: dynamics only
    run_embdist("experiment=checkpoints", f"history.checkpoints={tmp_path / 'ckpts' / '*'}",
                "task.memory_limit_gb=0.000001", *common, home=home)
    run_embdist("task=snapshots", f"history.path={hist_file}", "history.expected_steps=null", "history.vocab_size=null",
                "history.hidden_dim=null", *common, home=home)
    series_run, file_run = runs_of(home)
    assert series_run.info.status == file_run.info.status == "FINISHED"
    assert series_run.data.tags["embdist.matrices"] == "False" and file_run.data.tags["embdist.matrices"] == "True"
    s_dir, f_dir = (Path(r.data.tags["embdist.run_dir"]) for r in (series_run, file_run))
    assert not (s_dir / "pairwise_distances.safetensors").exists() and (f_dir / "pairwise_distances.safetensors").is_file()
    a, b = load_file(str(s_dir / "dynamics.safetensors")), load_file(str(f_dir / "dynamics.safetensors"))
    assert a["steps"].tolist() == [1000 * s for s in b["steps"].tolist()]
    for k in ("groups", "displacement", "changed_steps", "components_chebyshev_0.02", "largest_chebyshev_0.05"):
        assert torch.equal(a[k], b[k]), k
    for k in ("first_leave", "freeze"):
        assert a[k].tolist() == [x if x < 0 else 1000 * x for x in b[k].tolist()], k
    labels = brute_labels(torch.from_numpy(h))
    assert torch.equal(b["groups"], torch.from_numpy(labels.astype(np.int32)))
    assert events_of(s_dir / "events.csv") == events_of(f_dir / "events.csv", lambda s: 1000 * s) \
        == brute_events(labels, np.arange(8) * 1000)
    assert any(e[1] == "merge" and e[0] == 5000 for e in events_of(s_dir / "events.csv"))
    c, _ = brute_components(torch.from_numpy(h), "chebyshev", 0.02, range(8))
    assert a["components_chebyshev_0.02"].tolist() == c.tolist()
    steps, vals = series(home, series_run, "distinct_vectors")
    assert steps == list(range(0, 8000, 1000)) and vals == [len(np.unique(g)) for g in labels]
    assert series_run.data.metrics["n_steps"] == 8 and series_run.data.metrics["n_tokens"] == 40
    ta, tb = read_csv(s_dir / "token_dynamics.csv"), read_csv(f_dir / "token_dynamics.csv")
    assert [r["displacement_lattice"] for r in ta] == [r["displacement_lattice"] for r in tb]
    assert float(ta[35]["displacement_lattice"]) == 0 and ta[35]["never_changed"] == "True"
    np.testing.assert_array_equal(a["displacement"].numpy(), brute_units(torch.from_numpy(h).to(torch.bfloat16)))


def test_checkpoint_of_another_shape_is_one_line(home, tmp_path):
    root = tmp_path / "run"
    for s, v in ((100, 12), (200, 12), (300, 13)):
        (root / f"step{s}").mkdir(parents=True)
        save_file({"model.embed_tokens.weight": torch.zeros(v, 4, dtype=torch.bfloat16)},
                  str(root / f"step{s}" / "model.safetensors"))
    p = run_embdist("experiment=checkpoints", f"history.checkpoints={root}/step*", "task.progress=false",
                    "task.matrices=false", home=home, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(line) == 1 and str(root / "step300") in line[0] and "(13, 4)" in line[0] and "(12, 4)" in line[0]
    (run,) = runs_of(home)
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("spec, message", [("/nonexistent/step*", "matches nothing"),
                                           ("/tmp", "cannot tell the training step")])
def test_checkpoint_spec_errors(spec, message):
    with pytest.raises(checkpoints.InputError, match=message):
        checkpoints.resolve(spec)


def test_checkpoint_series_not_given_is_one_line(home):
    p = run_embdist("experiment=checkpoints", "task.progress=false", home=home, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "needs the series: set history.checkpoints=" in p.stderr
    assert not (home / "data").exists()                                 # nothing trained instead
