#!/usr/bin/env python
"""Benchmark of the training dynamics (embdist.dynamics, issue 14), one run, both rows.

    python benchmarks/bench_dynamics.py [--history FILE] [--rows 1,2] [--checkpoints 40] [--quick]

Rows:
  1. 5,001 x 128 x 64 (the seed's size: the bundled toy run trained for 5,000 steps, cached in
     <embdist home>/data/toy-qweninit-5000/, or --history FILE): the dynamics with two Chebyshev
     thresholds (2 * 2^-7 and 4 * 2^-7: groups, events, per-token first move / freeze /
     displacement, components) against the matrices themselves (the engine's
     pairwise_snapshots_multi for both metrics into fresh outputs, as task=snapshots makes
     them). Best of 3 each, same process. Target: dynamics <= matrices. Also shown: the dynamics
     given the task's Chebyshev matrices (with the native passes the components come from the
     rows either way, so the two are the same work; without them the matrices are used).
  2. --checkpoints (40) synthetic checkpoints of 50,304 x 512 bf16 (training-like: rows converge
     and freeze at random steps, a dead-token group of 2,000 identical rows that splits twice,
     100 pairs that merge, 500 triples within the threshold), written once to a temporary
     folder as Hugging Face checkpoint folders: groups, events, per-token dynamics and one
     Chebyshev threshold (2 * 2^-7), read one checkpoint at a time, in a fresh subprocess.
     Time, the share of it spent reading (every page of the tensor touched inside the read
     timer: a memory-mapped read is counted there), and peak RSS (VmHWM of that process, Python
     and torch included) against 2 x one checkpoint in float32 + 1 GB. The planted structure is
     checked so a fast wrong answer cannot pass.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import embdist  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from embdist import dynamics, paths
from embdist.pairwise import pairwise_snapshots_multi

THRESHOLDS = (2 * 2.0 ** -7, 4 * 2.0 ** -7)


def best(fn, repeat: int = 3):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if repeat > 1 and out is not None and not isinstance(out, dynamics.Dynamics):
            del out
            out = None
    return min(times), out


def toy_history(path: str | None, steps: int) -> Path:
    if path:
        return Path(path)
    p = paths.home() / "data" / f"toy-qweninit-{steps}" / "embedding_evolution.safetensors"
    if not p.is_file():
        from embdist.toytrain import train_snapshots
        print(f"training the toy run for {steps} steps into {p} (once) ...", flush=True)
        p.parent.mkdir(parents=True, exist_ok=True)
        train_snapshots(p, steps=steps, seed=0, progress=False)
    return p


def row1(history_file: str | None, quick: bool) -> None:
    h = load_file(str(toy_history(history_file, 500 if quick else 5000)))["embedding_history"]
    t, v, d = h.shape
    import scipy.sparse.csgraph  # noqa: F401  (imported once, as in a task run)
    dynamics.history_dynamics(h[:20], THRESHOLDS, "chebyshev", device="cpu")           # warm-up
    mat_s, mats = best(lambda: pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu"), 3)
    mats = pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu")
    dyn_s, dy = best(lambda: dynamics.history_dynamics(h, THRESHOLDS, "chebyshev", device="cpu"))
    reuse_s, dy2 = best(lambda: dynamics.history_dynamics(h, THRESHOLDS, "chebyshev", device="cpu",
                                                          matrices=mats["chebyshev"]))
    assert np.array_equal(dy.groups, dy2.groups)
    for x in THRESHOLDS:
        assert np.array_equal(dy.components[x]["count"], dy2.components[x]["count"])
    # the distinct-vector counts agree with the engine's zero distances
    zero = (mats["euclidean"] == 0).sum(dim=(1, 2)).numpy()
    sizes = [np.bincount(g)[np.bincount(g) > 0] for g in dy.groups]
    assert all(z == (s * s).sum() for z, s in zip(zero, sizes))
    print(f"\nrow 1: {t:,} x {v} x {d}, thresholds {THRESHOLDS} (Chebyshev)")
    print(f"  matrices (both metrics, fresh outputs)  {mat_s:.3f} s")
    print(f"  dynamics (no matrices given)            {dyn_s:.3f} s   ratio {dyn_s / mat_s:.2f}  (target <= 1.0)")
    print(f"  dynamics given the task's matrices      {reuse_s:.3f} s   ratio {reuse_s / mat_s:.2f}")
    print(f"  distinct vectors {dy.distinct[0]} -> {dy.distinct[-1]}, {int(dy.fissions.sum())} fissions, "
          f"{int(dy.merges.sum())} merges, components at the end {[int(c['count'][-1]) for c in dy.components.values()]}")


def write_series(root: Path, n_ckpt: int, v: int, d: int) -> dict:
    """Training-like synthetic checkpoints (see the module doc); returns what was planted."""
    g = torch.Generator().manual_seed(0)
    final = (torch.randn(v, d, generator=g) * 0.02)
    dead = torch.arange(v - 2000, v)                   # never-trained rows, one shared vector
    dead_vec = torch.randn(d, generator=g) * 0.02
    freeze = torch.randint(5, n_ckpt + 10, (v,), generator=g)   # >= n_ckpt: still moving at the end
    planted = torch.randperm(v - 2000, generator=g)[:1700]
    pairs, triples = planted[:200].view(100, 2), planted[200:].view(500, 3)
    structured = torch.cat([dead, pairs.reshape(-1), triples.reshape(-1)])
    freeze[structured] = n_ckpt + 1                   # planted structure: never frozen by the rule below
    prev = None
    for s in range(n_ckpt):
        w = final + torch.randn(v, d, generator=g) * (0.02 * float(np.exp(-s / 8)))
        w[triples[:, 1]] = w[triples[:, 0]] + 0.004    # within 2 * 2^-7 of their first (Chebyshev)
        w[triples[:, 2]] = w[triples[:, 0]] - 0.004
        if s >= 20:
            w[pairs[:, 1]] = w[pairs[:, 0]]            # 100 merges at step index 20
        w[dead] = dead_vec * (1 + 0.01 * min(s, 15))
        if s >= 5:
            w[dead[:700]] += 0.001                     # the dead group splits at 5 ...
        if s >= 12:
            w[dead[700:1000]] -= 0.002                 # ... and at 12
        w = w.bfloat16()
        if prev is not None:                           # frozen rows keep their last values
            keep = freeze <= s
            w[keep] = prev[keep]
        prev = w
        folder = root / f"step{s * 1000}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"model.embed_tokens.weight": w}, str(folder / "model.safetensors"))
    return {"dead": dead.tolist()[:1], "n": n_ckpt}


CHILD = r"""
import json, resource, sys, time
import torch
from embdist import checkpoints, dynamics
def peak_mb():
    # VmHWM: this process's own peak (ru_maxrss of a child spawned after row 1 can report the
    # parent's resident size at the fork: Linux carries it across exec)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
entries = checkpoints.resolve(sys.argv[1] + "/step*")
tr = dynamics.Tracker([float(sys.argv[2])], "chebyshev", device="cpu")
it = checkpoints.read_series(entries)
read = 0.0
t0 = time.perf_counter()
while True:
    r0 = time.perf_counter()
    try:
        step, m = next(it)
    except StopIteration:
        break
    int(m.tensor.reshape(-1).view(torch.int16)[::2048].sum())   # touch every page: a memory-mapped read is done here
    read += time.perf_counter() - r0
    tr.add(step, m.tensor)
    del m
    print(f"  step {step}: {time.perf_counter() - t0:.1f} s so far, reading {read:.1f} s, peak RSS "
          f"{peak_mb():.0f} MB", file=sys.stderr, flush=True)
dy = tr.result()
total = time.perf_counter() - t0
thr = float(sys.argv[2])
print(json.dumps({"total": total, "read": read, "rss_mb": peak_mb(),
                  "distinct": dy.distinct.tolist(), "fissions": int(dy.fissions.sum()), "merges": int(dy.merges.sum()),
                  "merge_steps": sorted({e.step for e in dy.events if e.kind == "merge"}),
                  "components": dy.components[thr]["count"].tolist(), "largest": dy.components[thr]["largest"].tolist(),
                  "never_changed": int((dy.n_changes == 0).sum()), "still_moving": int((dy.freeze == len(dy.steps) - 1).sum()),
                  "dead_group": int((dy.groups[-1] == dy.groups[-1][-1]).sum())}))
"""


def row2(n_ckpt: int, v: int, d: int) -> None:
    with tempfile.TemporaryDirectory(prefix="embdist-bench-ckpt-") as tmp:
        t0 = time.perf_counter()
        write_series(Path(tmp), n_ckpt, v, d)
        print(f"\n(wrote {n_ckpt} checkpoints of {v:,} x {d} bf16 in {time.perf_counter() - t0:.0f} s)", flush=True)
        env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([sys.executable, "-c", CHILD, tmp, repr(THRESHOLDS[0])], stdout=subprocess.PIPE, text=True,
                           env=env)                     # its progress lines go to our stderr
        if p.returncode:
            raise SystemExit("the measured process failed (its messages are above)")
        r = json.loads(p.stdout.strip().splitlines()[-1])
    budget_mb = 2 * v * d * 4 / 2**20 + 1024
    # planted: the dead group (2,000 rows) splits at index 5 and 12, 100 pairs merge at index 20
    assert r["merge_steps"] == ([20_000] if n_ckpt > 20 else []), r["merge_steps"]
    comps = np.array(r["components"])
    distinct = np.array(r["distinct"])
    assert (comps <= distinct).all() and (comps[20:] <= distinct[20:] - 1000).all()   # the triples joined
    print(f"row 2: {n_ckpt} checkpoints of {v:,} x {d} bf16, Chebyshev <= {THRESHOLDS[0]}")
    print(f"  total {r['total']:.1f} s ({r['total'] / n_ckpt:.2f} s per checkpoint), reading {r['read']:.1f} s "
          f"= {100 * r['read'] / r['total']:.0f} %")
    print(f"  peak RSS {r['rss_mb']:.0f} MB vs 2 x float32 checkpoint + 1 GB = {budget_mb:.0f} MB: "
          f"{r['rss_mb'] / budget_mb:.2f} (target <= 1.0)")
    print(f"  distinct vectors {distinct[0]:,} -> {distinct[-1]:,}; components {comps[0]:,} -> {comps[-1]:,} "
          f"(largest {r['largest'][-1]}); {r['fissions']} fissions, {r['merges']} merges; "
          f"{r['never_changed']} tokens never changed, {r['still_moving']} still moving")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", help="a (5001, 128, 64) history file for row 1 (default: the toy run, trained once)")
    ap.add_argument("--rows", default="1,2")
    ap.add_argument("--checkpoints", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="small sizes (500 steps; 6 checkpoints of 8,192 x 512)")
    a = ap.parse_args()
    rows = {int(x) for x in a.rows.split(",")}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if 1 in rows:
        row1(a.history, a.quick)
    if 2 in rows:
        row2(6 if a.quick else a.checkpoints, 8192 if a.quick else 50_304, 512)
    return 0


if __name__ == "__main__":
    sys.exit(main())
