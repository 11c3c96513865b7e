"""bbox=auto: task=overdensity selects the survey's first region (MiniLM's never-trained
[unused*] tokens), and a sweep over bbox.region runs task=vocab on regions 1 and 2; through
`python -m embdist` with a temporary MLflow sqlite store and hydra.run.dir, the selections
checked against an independent sky (SVD) and the vocabulary read from vocab.txt."""

import numpy as np
from safetensors.torch import load_file

from conftest import numpy_sky, run_embdist, runs_of
from embdist import regions, sources
from embdist.tables import read_csv


def minilm():
    path = sources.packaged_minilm_path()
    w = sources.load_matrix(path).tensor.numpy().astype(np.float64)
    vocab = (path / "vocab.txt").read_text(encoding="utf-8").split("\n")[: len(w)]
    return w, vocab


def resolved(run) -> dict:
    return {k: float(run.data.params[f"bbox_resolved.{k}"]) for k in regions.BOX_KEYS}


def test_overdensity_bbox_auto_selects_the_unused_tokens(tmp_path, home):
    run_dir = tmp_path / "run"
    run_embdist("task=overdensity", "bbox=auto", "task.progress=false", f"hydra.run.dir={run_dir}", home=home)
    (run,) = runs_of(home)
    assert run.info.status == "FINISHED" and run.data.params["bbox.region"] == "1"
    box = resolved(run)
    w, vocab = minilm()
    lat, lon, r = numpy_sky(w, 2, 1, 3)
    unused = np.array([v.startswith("[unused") for v in vocab])
    ids = load_file(str(run_dir / "distances.safetensors"))["spike_token_ids"].numpy()
    assert np.isin(np.flatnonzero(unused), ids).sum() >= 0.95 * 994
    ref = np.flatnonzero(regions.in_box(lat, lon, r, box))
    assert len(set(ids) ^ set(ref)) <= 2  # two PCAs may differ at a face
    assert run.data.metrics["n_tokens"] == len(ids) == run.data.metrics["bbox_resolved/tokens"]
    assert run.data.tags["bbox_resolved.override"] == regions.override_line(box)
    rows = read_csv(run_dir / "tokens.csv")
    assert sum(t["category"] == "unused" for t in rows) >= 0.95 * 994
    assert (run_dir / "sky_map.html").stat().st_size > 4_000_000  # plotly.js inline + every token
    html = (run_dir / "sky_map.html").read_text(encoding="utf-8")
    assert regions.override_line(box) in html  # the page draws (and states) this run's box


def test_sweep_over_regions_with_task_vocab(tmp_path, home):
    sweep_dir = tmp_path / "sweep"
    run_embdist("-m", "task=vocab", "vocab.use_bbox=true", "bbox=auto", "bbox.region=1,2", "vocab.k=3",
                "task.progress=false", f"hydra.sweep.dir={sweep_dir}", home=home)
    runs = runs_of(home)
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.data.params["bbox.region"])
    assert [r.data.params["bbox.region"] for r in children] == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    w, vocab = minilm()
    lat, lon, r = numpy_sky(w, 2, 1, 3)
    boxes = [resolved(c) for c in children]
    assert boxes[0] != boxes[1]
    for c, box in zip(children, boxes):
        n_ref = int(regions.in_box(lat, lon, r, box).sum())
        assert abs(c.data.metrics["n_tokens"] - n_ref) <= 2
    unused = np.array([v.startswith("[unused") for v in vocab])
    assert (regions.in_box(lat, lon, r, boxes[0]) & unused).sum() >= 0.95 * 994
