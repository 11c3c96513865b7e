"""task=snapshots' dynamics end to end: `python -m embdist` in subprocesses, a real MLflow SQLite
store, real safetensors checkpoints; every number checked against an independent reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import assert_png, client_for, run_embdist, runs_of
from embdist.tables import read_csv
from test_dynamics import brute_components, brute_events, brute_labels, brute_units

TABLES = {"events.csv", "token_dynamics.csv", "dynamics.csv", "group_changes.csv"}
PLOTS = ("dynamics_curves", "lineage", "freeze_histogram", "displacement_heatmap")


def series(home, run, key):
    hist = sorted(client_for(home).get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    return [m.step for m in hist], [m.value for m in hist]


def events_of(csv: Path, step_map=lambda s: s) -> list:
    def groups(ids):
        return [[int(i) for i in g.split()] for g in ids.split("|")]

    rows = read_csv(csv)
    for r in rows:
        assert [int(s) for s in r["parent_sizes"].split("|")] == [len(g) for g in groups(r["parent_members"])]
        assert [int(s) for s in r["child_sizes"].split("|")] == [len(g) for g in groups(r["child_members"])]
    return sorted((step_map(int(r["step"])), r["kind"], groups(r["parent_members"]), groups(r["child_members"]))
                  for r in rows)


def test_toy_run_writes_the_dynamics(home, toy_history):
    run_embdist("task=snapshots", f"history.path={toy_history}", "task.progress=false", "dynamics.log_step=true",
                "metric=chebyshev",
                "dynamics.thresholds=[0.015625,0.03125]", home=home)
    (run,) = runs_of(home)
    assert run.info.status == "FINISHED"
    run_dir = Path(run.data.tags["embdist.run_dir"])
    h = load_file(str(toy_history))["embedding_history"]
    labels = brute_labels(h)
    out = load_file(str(run.data.tags["output.dynamics"]))
    assert torch.equal(out["groups"], torch.from_numpy(labels.astype(np.int32)))
    assert torch.equal(out["steps"], torch.arange(1001))
    np.testing.assert_array_equal(out["displacement"].numpy(), brute_units(h))
    assert events_of(run_dir / "events.csv") == brute_events(labels, np.arange(1001))

    tok = read_csv(run_dir / "token_dynamics.csv")
    assert [int(r["token"]) for r in tok] == list(range(128))
    assert tok[65]["string"] == "A" and tok[10]["string"] == "\\x0a"       # byte labels of the toy run
    total = brute_units(h).sum(0)
    x = h.double().numpy()
    changed = (x[1:] != x[:-1]).any(-1)
    for i, r in enumerate(tok):
        assert float(r["displacement_lattice"]) == total[i]
        assert int(r["final_group"]) == labels[-1, i] and int(r["final_group_size"]) == (labels[-1] == labels[-1, i]).sum()
        assert int(r["changed_steps"]) == changed[:, i].sum() and r["never_changed"] == str(not changed[:, i].any())
        assert int(r["freeze_step"]) == 1000 - changed[::-1, i].argmax()
    gc = read_csv(run_dir / "group_changes.csv")
    assert len(gc) == int((labels[1:] != labels[:-1]).sum())
    assert all(labels[int(r["step"]), int(r["token"])] == int(r["group_after"]) != int(r["group_before"]) for r in gc)

    distinct = [len(np.unique(g)) for g in labels]
    assert series(home, run, "distinct_vectors") == (list(range(1001)), distinct)
    per_step = read_csv(run_dir / "dynamics.csv")
    assert [int(r["distinct_vectors"]) for r in per_step] == distinct
    steps, fis = series(home, run, "dynamics/fissions")
    ev = brute_events(labels, np.arange(1001))
    assert steps == list(range(1001)) and fis == [sum(e[0] == s and e[1] == "fission" for e in ev) for s in steps]
    m = run.data.metrics
    assert m["dynamics/fission_events"] == len(ev) and m["dynamics/merge_events"] == 0
    assert m["dynamics/final_distinct_vectors"] == 74 and m["dynamics/final_groups"] == 1
    assert m["dynamics/displacement_lattice_total"] == total.sum()
    sample = [0, 1, 5, 10, 50, 200, 1000]
    for thr in (0.015625, 0.03125):
        c, lg = brute_components(h, "chebyshev", thr, sample)
        _, got = series(home, run, f"components/chebyshev_{thr:g}")
        _, big = series(home, run, f"components_largest/chebyshev_{thr:g}")
        assert [got[s] for s in sample] == c.tolist() and [big[s] for s in sample] == lg.tolist()
        assert [int(per_step[s][f"components_chebyshev_{thr:g}"]) for s in sample] == c.tolist()
    arts = client_for(home)
    assert {a.path for a in arts.list_artifacts(run.info.run_id, "tables")} >= {f"tables/{t}" for t in TABLES}
    assert {a.path for a in arts.list_artifacts(run.info.run_id, "plots")} >= {f"plots/{p}.png" for p in PLOTS}
    for p in PLOTS:
        assert_png(run_dir / f"{p}.png")
    assert (run_dir / "pairwise_distances.safetensors").is_file()       # the seed's outputs as before
