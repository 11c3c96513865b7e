"""task=snapshots, second half: the training dynamics (embdist.dynamics) of the history or of
the checkpoint series, written as files in the run folder and reported on the MLflow run.

Files: ``dynamics.safetensors`` (``groups`` (T, V) int32 canonical group ids, ``steps``,
``displacement`` (T, V) float64 lattice units, ``first_leave`` / ``freeze`` (V,) step numbers,
-1 = never, ``changed_steps``, and per threshold ``components_<k>`` / ``largest_<k>``),
``dynamics.csv`` (per step), ``events.csv``, ``token_dynamics.csv``, ``group_changes.csv``,
and the plots of ``embdist.plots_dynamics``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from embdist import checkpoints, dynamics, plots_dynamics, store, tables, tokens
from embdist.tracking import RunLog

log = logging.getLogger(__name__)

OUTPUT = "dynamics.safetensors"


def compute(cfg, history=None, entries=None, steps=None, matrices=None) -> dynamics.Dynamics:
    """From a (T, V, D) history (``matrices``: its float32 matrices of ``dynamics.metric``, reused
    for the components), or from checkpoints read one at a time."""
    dc = cfg.dynamics
    if history is not None:
        return dynamics.history_dynamics(history, dc.thresholds, dc.metric, steps=steps, matrices=matrices,
                                         device=cfg.task.device)
    tr = dynamics.Tracker(dc.thresholds, dc.metric, cfg.task.device)
    for step, m in checkpoints.read_series(entries, cfg.model.tensor):
        log.info("checkpoint step %d: %s (%s)", step, m.path, m.name)
        tr.add(step, m.tensor)
        del m
    return tr.result()


def token_strings(cfg, v: int, entries, fallback) -> list[str] | None:
    """Token strings from model.tokenizer or the first checkpoint's folder, else ``fallback``."""
    source = cfg.model.tokenizer or (entries[0][1] if entries else None)
    tok = tokens.load_tokenizer(source) if source else None
    if tok is None:
        return fallback
    return [t.string for t in tokens.describe_tokens(tok, range(v))]


def _ids(members, ids) -> str:
    return "|".join(" ".join(str(int(ids[i])) for i in m) for m in members)


def _sizes(members) -> str:
    return "|".join(str(len(m)) for m in members)


def _blank(steps: np.ndarray) -> list:
    return ["" if s < 0 else int(s) for s in steps]


def thr_key(metric: str, thr: float) -> str:
    return f"{metric}_{thr:g}"


def report(cfg, rl: RunLog, out_dir: Path, dy: dynamics.Dynamics, strings=None, title: str = "",
           token_ids=None) -> dict:
    """Tables, plots, series and totals. ``token_ids``: the original id of each analysed row (when
    tokens holding NaN/Inf were left out); tables and the saved groups then speak in those ids."""
    t, v = dy.groups.shape
    ids = np.arange(v) if token_ids is None else np.asarray(token_ids, dtype=np.int64)
    steps = dy.steps
    strings = strings or [str(i) for i in ids]
    first_leave, freeze = dy.step_of(dy.first_leave), dy.step_of(dy.freeze)
    final = dy.groups[-1]
    final_sizes = np.bincount(final, minlength=v)
    total = dy.total_displacement
    comp_cols = {}
    for thr, c in dy.components.items():
        comp_cols[f"components_{thr_key(dy.metric, thr)}"] = c["count"]
        comp_cols[f"largest_{thr_key(dy.metric, thr)}"] = c["largest"]

    with rl.stage("dynamics_save"):
        tensors = {"groups": torch.from_numpy(np.ascontiguousarray(dy.groups if token_ids is None
                                                                  else ids[dy.groups].astype(np.int32))),
                   "token_ids": torch.from_numpy(ids),
                   "steps": torch.from_numpy(steps.astype(np.int64)),
                   "displacement": torch.from_numpy(np.ascontiguousarray(dy.displacement)),
                   "first_leave": torch.from_numpy(first_leave.astype(np.int64)),
                   "freeze": torch.from_numpy(freeze.astype(np.int64)),
                   "changed_steps": torch.from_numpy(dy.n_changes.astype(np.int64))}
        for k, vals in comp_cols.items():
            tensors[k] = torch.from_numpy(np.asarray(vals, dtype=np.int64))
        meta = {"metric": dy.metric, "thresholds": ",".join(f"{x!r}" for x in dy.thresholds),
                "lattice_units": "|dW| / 2^(E-134), E the bf16 exponent field of the earlier value (min 1)"}
        out = store.save_atomic(tensors, out_dir / OUTPUT, metadata=meta)
    rl.output("dynamics", out)

    with rl.stage("dynamics_report"):
        per_step = {"step": steps.tolist(), "distinct_vectors": dy.distinct.tolist(),
                    "fissions": dy.fissions.tolist(), "merges": dy.merges.tolist()}
        per_step.update({k: np.asarray(c).tolist() for k, c in comp_cols.items()})
        per_step["displacement_lattice"] = dy.displacement.sum(axis=1).tolist()
        rl.table(tables.write_csv(out_dir / "dynamics.csv", per_step))
        ev = dy.events
        rl.table(tables.write_csv(out_dir / "events.csv", {
            "step": [e.step for e in ev], "kind": [e.kind for e in ev],
            "parent_sizes": [_sizes(e.parents) for e in ev], "parent_members": [_ids(e.parents, ids) for e in ev],
            "child_sizes": [_sizes(e.children) for e in ev], "child_members": [_ids(e.children, ids) for e in ev]}))
        rl.table(tables.write_csv(out_dir / "token_dynamics.csv", {
            "token": ids.tolist(), "string": strings,
            "first_leave_step": _blank(first_leave), "freeze_step": _blank(freeze),
            "never_changed": (dy.n_changes == 0).tolist(), "changed_steps": dy.n_changes.tolist(),
            "displacement_lattice": [float(x) for x in total],
            "final_group": ids[final].tolist(), "final_group_size": final_sizes[final].tolist()}))
        ts, tok = np.nonzero(dy.groups[1:] != dy.groups[:-1])
        rl.table(tables.write_csv(out_dir / "group_changes.csv", {
            "step": steps[ts + 1].tolist(), "token": ids[tok].tolist(), "string": [strings[i] for i in tok],
            "group_before": ids[dy.groups[ts, tok]].tolist(), "group_after": ids[dy.groups[ts + 1, tok]].tolist()}))

        ls = cfg.dynamics.log_step
        rl.plot(plots_dynamics.dynamics_curves(dy, out_dir / "dynamics_curves.png", log_step=ls,
                                               title=f"{title}: distinct vectors and components" if title else None))
        rl.plot(plots_dynamics.lineage(dy, out_dir / "lineage.png", labels=strings, log_step=ls))
        rl.plot(plots_dynamics.freeze_histogram(dy, out_dir / "freeze_histogram.png", log_step=ls))
        rl.plot(plots_dynamics.displacement_heatmap(dy, out_dir / "displacement_heatmap.png", labels=strings,
                                                    log_step=ls))

    rl.series("distinct_vectors", dy.distinct.tolist(), steps.tolist())
    rl.series("dynamics/fissions", dy.fissions.tolist(), steps.tolist())
    rl.series("dynamics/merges", dy.merges.tolist(), steps.tolist())
    for thr, c in dy.components.items():
        rl.series(f"components/{thr_key(dy.metric, thr)}", c["count"].tolist(), steps.tolist())
        rl.series(f"components_largest/{thr_key(dy.metric, thr)}", c["largest"].tolist(), steps.tolist())
    totals = {"dynamics/fission_events": int(dy.fissions.sum()), "dynamics/merge_events": int(dy.merges.sum()),
              "dynamics/tokens_left_start": int((dy.first_leave >= 0).sum()),
              "dynamics/tokens_never_changed": int((dy.n_changes == 0).sum()),
              "dynamics/final_distinct_vectors": int(dy.distinct[-1]),
              "dynamics/final_groups": int((final_sizes > 1).sum()),
              "dynamics/displacement_lattice_total": float(total.sum())}
    rl.metrics(totals)
    log.info("Dynamics: distinct vectors %d -> %d, %d fission and %d merge events, %d tokens never changed",
             dy.distinct[0], dy.distinct[-1], totals["dynamics/fission_events"], totals["dynamics/merge_events"],
             totals["dynamics/tokens_never_changed"])
    return totals
