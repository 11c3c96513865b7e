"""task.out_of_core=true: matrices larger than the memory a run may use are written straight
into the output file through a memory map (`python -m embdist ...` as real subprocesses),
with the same bits as an in-memory run and against float64 references."""
from math import comb
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.spatial.distance import cdist

from conftest import bf16_round, run_embdist, runs_of

CUSTOM = ("model=custom", "task.progress=false", "bbox=all", "metric=both")


def distances_file(run) -> Path:
    return Path(run.data.tags["output.distances"])


def test_matrices_over_the_memory_limit_are_written_out_of_core(home, tmp_path):
    # 6,000 tokens, both metrics: 2 x 144 MB of matrices against a 0.2 GiB limit (the rows and
    # the engine's working copies need well under that).
    rng = np.random.default_rng(5)
    w = bf16_round(rng.normal(0, 0.1, (6000, 8)))
    groups = [[7, 4000, 5999], [100, 101]]
    for g in groups:
        w[g] = w[g[0]]
    path = tmp_path / "m.safetensors"
    save_file({"model.embed_tokens.weight": torch.from_numpy(w).to(torch.bfloat16)}, str(path))
    args = (*CUSTOM, f"model.path={path}", "task.memory_limit_gb=0.2")

    p = run_embdist(*args, home=home, check=False)       # in memory: refused, with the way out
    assert p.returncode == 2 and "task.out_of_core=true" in p.stderr and "Traceback" not in p.stderr
    run_embdist(*args, "task.out_of_core=true", home=home)
    run_embdist(*CUSTOM, f"model.path={path}", home=home)   # no limit: in memory, for comparison
    refused, ooc, mem = runs_of(home)
    assert refused.info.status == "FAILED"
    assert ooc.info.status == "FINISHED" and ooc.data.params["task.out_of_core"] == "True"

    run_dir = distances_file(ooc).parent
    assert sorted(f.name for f in run_dir.iterdir() if "safetensors" in f.name) == ["distances.safetensors"]
    with safe_open(str(distances_file(ooc)), "pt") as f:
        assert sorted(f.keys()) == ["chebyshev_distances", "distances", "spike_token_ids"]
        assert "metrics" in f.metadata()["embdist"]
    a, b = load_file(str(distances_file(ooc))), load_file(str(distances_file(mem)))
    assert all(torch.equal(a[k], b[k]) for k in b) and set(a) == set(b)
    assert torch.equal(a["spike_token_ids"], torch.arange(6000))

    d, c = a["distances"].numpy(), a["chebyshev_distances"].numpy()
    rows = np.r_[7, 100, 101, 4000, 5999, rng.choice(6000, 300, replace=False)]
    ref = cdist(w[rows].astype(np.float64), w.astype(np.float64))
    assert np.array_equal(d[rows] == 0, ref == 0)
    np.testing.assert_allclose(d[rows], ref, rtol=2e-6)
    assert np.array_equal(c[rows], np.abs(w[rows][:, None, :] - w[None]).max(-1))
    assert np.array_equal(d, d.T)
    m = ooc.data.metrics
    assert m["euclidean/zero_pairs"] == m["chebyshev/zero_pairs"] == sum(comb(len(g), 2) for g in groups)
    assert all(m[k] == mem.data.metrics[k] for k in mem.data.metrics if k.startswith(("euclidean/", "chebyshev/")))


def test_snapshots_out_of_core_in_float16(home, tmp_path):
    rng = np.random.default_rng(9)
    h = bf16_round(rng.normal(0, 0.1, (7, 24, 8)))
    h[0] = h[0, 0]                              # step 0: all tokens at one point
    h[1:, 3] = h[1:, 17]                        # a pair that never separates
    path = tmp_path / "h.safetensors"
    save_file({"embedding_history": torch.from_numpy(h).to(torch.bfloat16)}, str(path))
    args = ("task=snapshots", f"history.path={path}", "history.expected_steps=7", "history.vocab_size=24",
            "history.hidden_dim=8", "task.progress=false", "task.dtype=float16")
    run_embdist(*args, "task.out_of_core=true", home=home)
    run_embdist(*args, home=home)
    ooc, mem = runs_of(home)
    a = load_file(ooc.data.tags["output.pairwise_distances"])
    b = load_file(mem.data.tags["output.pairwise_distances"])
    assert set(a) == set(b) == {"euclidean_distances", "chebyshev_distances"}
    for k in b:
        assert a[k].dtype == torch.float16 and torch.equal(a[k], b[k])
    for step in range(7):
        x = h[step].astype(np.float64)
        e_ref = cdist(x, x)
        e = a["euclidean_distances"][step].double().numpy()
        assert np.array_equal(e == 0, e_ref == 0)
        np.testing.assert_allclose(e, e_ref, rtol=2 ** -11)           # one float16 rounding
        c_ref = np.abs(h[step][:, None] - h[step][None]).max(-1)
        assert np.array_equal(a["chebyshev_distances"][step].numpy(), c_ref.astype(np.float16))
    assert ooc.data.metrics["euclidean/zero_pairs"] == 1
