#!/usr/bin/env python
"""Benchmark of the whole-vocabulary streaming path (task=vocab's engine calls), one process.

    python benchmarks/bench_vocab.py [--n 40000] [--d 2560] [--repeat 3] [--full] [--matrix FILE]
                                     [--tiers all|avx512,avx2,portable] [--native-blas] [--peer-n 2000]

--tiers: the benchmark once per kernel tier, each in its own process (EMBDIST_KERNELS=<tier>),
with the matmul rate measured the way a machine of that tier runs it: MKL limited to the tier's
ISA (MKL_ENABLE_INSTRUCTIONS before torch is imported: avx512 MKL's native choice, avx2 AVX2,
portable SSE4_2; on an AVX-512 Xeon the native MKL is ~2x its AVX2 code, on the AMD EPYC of
REFERENCE.md all three run MKL's AVX2 code: see bench_pairwise.py).  A summary then gives each tier's time against its tier-matched rate (the
target) and against the native MKL rate (measured in a process of its own, for information).
--native-blas: no MKL limit in the children.

Rows (targets from issue 4):
  1. N = 40,000 x 2,560 synthetic bf16 rows with the Qwen3-4B dead-token structure planted
     (13 exact-duplicate groups of sizes 814 ... 2, 121 further unique dead rows, all within one
     bf16 step of a centroid per coordinate, so every dead pair is within 2 steps): the engine
     path of the task (row groups, one Euclidean pass with k=10 neighbours, 3 radii, a
     65,536-bin histogram and near-duplicate candidates for n=2, then the exact final step)
     against the time this machine needs for N^2 d multiply-adds at its own fp32 matmul rate,
     measured in this process with torch.mm (X @ X.T, 8,192 x 2,560, after a warm-up the best of
     3, before and after the engine runs; the better of the two is the rate used).  Target: ratio <= 1.2.  Peak resident memory of the process
     during the engine path (VmHWM, reset just before; the input matrix and the Python/torch
     baseline included) against 2 x (N d 4 bytes) + 0.5 GB.  Medians of --repeat runs.
  2. --full: N = 151,936 x 2,560 (Qwen3-4B's shape; synthetic, or --matrix a real
     .safetensors file / checkpoint folder): the measured time of one run, and its ratio.

  3. Peer row, for information: faiss-cpu's exact IndexFlat with METRIC_Linf, k=10 neighbours of
     every row (a search of all rows against all), against task=vocab's Chebyshev pass (stream +
     finalize, k=10) on the same --peer-n rows (skipped with a note when faiss is not installed:
     pip install 'embdist[bench]').

The planted groups are checked (sizes and the 651,034 zero pairs) so a fast wrong answer
cannot pass.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import embdist  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

import numpy as np
import torch

from embdist.pairwise import stream as _stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiers  # noqa: E402  (benchmarks/_tiers.py: tier children and the targets per tier)

DEAD_GROUPS = [814, 704, 306, 228, 11, 10, 6, 5, 4, 4, 3, 3, 2]   # Qwen3-4B (REFERENCE.md)
DEAD_UNIQUE = 121
QWEN_ROWS = 151_936


def pairwise_kernels() -> str:
    from embdist.pairwise import active_kernels
    return active_kernels()


def planted(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """bf16 rows: a cone of random tokens plus the dead-token structure (when n > 4,400)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, d, generator=g) * 0.01
    x = torch.empty(n, d, dtype=torch.bfloat16)
    for s in range(0, n, 4096):                      # no float32 copy of the whole matrix
        e = min(n, s + 4096)
        x[s:e] = (torch.randn(e - s, d, generator=g) * 0.02 + base + 0.0).bfloat16()
    if n > 2 * (sum(DEAD_GROUPS) + DEAD_UNIQUE):
        c = torch.randn(d, generator=g)
        c = (c / c.norm() * 0.37).bfloat16()
        bits = c.view(torch.int16)
        ids = torch.randperm(n, generator=g)[:sum(DEAD_GROUPS) + DEAD_UNIQUE]
        k = 0
        for s in DEAD_GROUPS + [1] * DEAD_UNIQUE:
            jitter = torch.randint(-1, 2, (d,), generator=g) * (torch.rand(d, generator=g) < 0.01)
            row = (bits + jitter.to(torch.int16)).view(torch.bfloat16)  # within 1 step per coordinate
            x[ids[k:k + s]] = row
            k += s
    return x


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def matmul_fma_rate(x: torch.Tensor, rows: int = 8192, repeat: int = 3) -> float:
    """Multiply-adds per second of a float32 X @ X.T (8,192 x d): one warm-up call, then the best
    of ``repeat`` (noise on a shared machine only slows a run down; the best is the machine's rate,
    which makes the ratio below the strict one)."""
    a = x[:rows].float()
    _ = a[:1024] @ a[:1024].T
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        y = a @ a.T
        dt = time.perf_counter() - t
        rates.append(rows * rows * a.shape[1] / dt)
        del y
    return max(rates)


def engine_path(x: torch.Tensor, near_steps: int = 2):
    """What task=vocab runs for metric=euclidean (its defaults), timed."""
    t = time.perf_counter()
    part = _stream.stream_pass(x, "euclidean", k=10, radii=(0.001, 0.01, 0.1), bins=65536, near_steps=near_steps)
    t_stream = time.perf_counter() - t
    res = _stream.finalize(x, part)
    return time.perf_counter() - t, t_stream, res


def check(res, planted_groups: bool) -> str:
    sizes = [len(g) for g in res.duplicate_groups]
    if not planted_groups:
        return f"{len(sizes)} groups"
    zero = res.stats["zero_pairs"]
    ok = sizes == DEAD_GROUPS and zero == 651_034
    near = [len(g) for g in (res.near_groups or [])]
    ok = ok and near[:1] == [sum(DEAD_GROUPS) + DEAD_UNIQUE]
    if not ok:
        raise SystemExit(f"planted structure NOT recovered: groups {sizes}, zero pairs {zero:,}, near {near[:5]}")
    return f"13 groups ok, {zero:,} zero pairs, near group of {near[0]:,}"


def ratio_target(tier: str) -> float | None:
    """The ratio target of the tier (issue 4's for the native tier, issue 11's for avx2; none for
    portable: information): _tiers.target."""
    return _tiers.target(tier, "vocab")


def row(label, n, d, times, rate, rss_mb):
    full = n * n * d / rate
    t = statistics.median(times)
    budget = (2 * n * d * 4) / 2**20 + 512
    goal = ratio_target(pairwise_kernels())
    target = f"target <= {goal:.2f}" if goal is not None else "info: no target for this tier"
    print(f"{label:<34} {n:>8,} x {d:,}  engine {t:8.1f} s (runs: {', '.join(f'{v:.1f}' for v in times)})  "
          f"N^2d at mm rate {full:7.1f} s  ratio {t / full:5.2f} ({target})  "
          f"peak RSS {rss_mb:,.0f} MB of {budget:,.0f} MB allowed")
    return t / full, rss_mb <= budget


def peer_row(n: int, d: int) -> None:
    """faiss IndexFlat(METRIC_Linf) k=10 over all rows vs the vocab Chebyshev pass, same matrix."""
    try:
        import faiss
    except ImportError:
        print(f"{'peer: faiss IndexFlat L-inf k=10':<34} skipped: faiss-cpu is not installed (pip install 'embdist[bench]')")
        return
    x = planted(n, d)
    t = time.perf_counter()
    res = _stream.finalize(x, _stream.stream_pass(x, "chebyshev", k=10, bins=4096))
    t_ours = time.perf_counter() - t
    xf = np.ascontiguousarray(x.float().numpy())
    faiss.omp_set_num_threads(torch.get_num_threads())
    t = time.perf_counter()
    index = faiss.IndexFlat(d, faiss.METRIC_Linf)
    index.add(xf)
    dist, _ = index.search(xf, 11)          # itself (or a duplicate) first
    t_faiss = time.perf_counter() - t
    # the 10th neighbour's distance of each row outside its own duplicate group, both ways
    ours_k = res.knn_dist[:, 9]
    agree = float(np.mean(np.isclose(np.sort(dist, axis=1)[:, -1], ours_k, rtol=0, atol=0) |
                          (dist[:, 1:] == 0).any(axis=1)))
    print(f"{'peer: faiss IndexFlat L-inf k=10':<34} {n:>8,} x {d:,}  task=vocab chebyshev {t_ours:7.1f} s  "
          f"faiss {t_faiss:7.1f} s  faiss / ours {t_faiss / t_ours:5.2f}  (10th-neighbour distance equal or "
          f"faiss row has duplicates: {agree:.3f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--d", type=int, default=2560)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--full", action="store_true", help=f"also N = {QWEN_ROWS:,} (one run)")
    ap.add_argument("--only-full", action="store_true", help="skip the 40,000-row row")
    ap.add_argument("--matrix", help="--full on a real matrix: a .safetensors file or checkpoint folder")
    ap.add_argument("--tiers", help="all, or a comma list of kernel tiers: the benchmark once per tier")
    ap.add_argument("--blas-like-tier", action="store_true", help=argparse.SUPPRESS)   # the default now
    ap.add_argument("--native-blas", action="store_true",
                    help="with --tiers: MKL's native ISA in every child (default: limited to each tier's ISA)")
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    ap.add_argument("--peer-n", type=int, default=2_000,
                    help="rows of the faiss peer row (0: skip it; faiss L-inf takes ~140 s at 2,000 x 2,560 here)")
    a = ap.parse_args()
    if a.tiers:
        return main_tiers(a)
    torch.set_num_threads(torch.get_num_threads())
    print(f"# bench_vocab: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}; "
          f"kernels {pairwise_kernels()}, MKL ISA {os.environ.get('MKL_ENABLE_INSTRUCTIONS', 'auto')}")
    _stream._bindings._lib()   # build the kernels outside the timings
    ok = True
    if not a.only_full:
        x = planted(a.n, a.d)
        r0 = matmul_fma_rate(x)
        times, rss = [], []
        for i in range(a.repeat):
            reset_hwm()
            t, ts, res = engine_path(x)
            rss.append(vm_hwm_mb())
            times.append(t)
            print(f"  run {i + 1}: {t:.1f} s (stream {ts:.1f} s, final {t - ts:.1f} s); {check(res, True)}; "
                  f"diagnostics {res.diagnostics}", flush=True)
        r1 = matmul_fma_rate(x)
        rate = max(r0, r1)
        print(f"  fp32 matmul rate: {r0 / 1e9:.1f} / {r1 / 1e9:.1f} G FMA/s (best of 3, before / after the runs) "
              f"-> {2 * rate / 1e9:.0f} GFLOP/s")
        ratio, mem_ok = row("planted bf16, Euclidean, k=10", a.n, a.d, times, rate, max(rss))
        goal = ratio_target(pairwise_kernels())
        ok = ok and (goal is None or ratio <= goal) and mem_ok
        if a.json_out:
            import json
            with open(a.json_out, "w") as f:
                json.dump({"t": statistics.median(times), "rate": rate, "n": a.n, "d": a.d,
                           "mkl_isa": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "native")}, f)
        del x
    if a.peer_n > 0:
        peer_row(a.peer_n, a.d)
    if a.full or a.only_full:
        if a.matrix:
            from embdist import sources
            x = sources.load_matrix(a.matrix).tensor
            label, planted_groups = f"{Path(a.matrix).name}", False
        else:
            x = planted(QWEN_ROWS, a.d)
            label, planted_groups = "planted bf16 (Qwen3-4B shape)", True
        r0 = matmul_fma_rate(x)
        reset_hwm()
        t, ts, res = engine_path(x)
        rss = vm_hwm_mb()
        r1 = matmul_fma_rate(x)
        rate = max(r0, r1)
        print(f"  full run: {t:.1f} s = {t / 60:.1f} min (stream {ts:.1f} s, final {t - ts:.1f} s); "
              f"{check(res, planted_groups)}; diagnostics {res.diagnostics}")
        print(f"  fp32 matmul rate: {r0 / 1e9:.1f} / {r1 / 1e9:.1f} G FMA/s -> {2 * rate / 1e9:.0f} GFLOP/s")
        row(label, x.shape[0], x.shape[1], [t], rate, rss)
    return 0 if ok else 1


def main_tiers(a) -> int:
    """--tiers: one child per tier (tier-matched MKL), then the summary against both rates."""
    import json
    import tempfile
    argv = [x for x in _tiers.strip_arg(sys.argv[1:], "--tiers") if x not in ("--blas-like-tier", "--native-blas")]
    tiers = _tiers.resolve(a.tiers)
    res, codes = {}, []
    with tempfile.TemporaryDirectory() as d:
        for i, (t, p) in enumerate(_tiers.run_children(
                __file__, argv, tiers, lambda t: ["--json-out", f"{d}/{t}.json"]
                + (["--peer-n", "0"] if t != tiers[0] else []), not a.native_blas)):
            codes.append(p.returncode)
            if os.path.exists(f"{d}/{t}.json"):
                with open(f"{d}/{t}.json") as f:
                    res[t] = json.load(f)
    if res:
        s = _tiers.native_matmul_s(8192, a.d)
        native = 8192 * 8192 * a.d / s if s else None
        print(f"\nsummary: task=vocab engine path, N^2 d multiply-adds at the fp32 matmul rate (target <= 1.20 "
              f"at the tier-matched rate; none for portable); native MKL rate "
              + (f"{2 * native / 1e9:.0f} GFLOP/s (own process)" if native else "unavailable"))
        for t, r in res.items():
            full = r["n"] * r["n"] * r["d"] / r["rate"]
            line = (f"  {t:8s} {r['n']:,} x {r['d']:,}  engine {r['t']:7.1f} s  MKL {r['mkl_isa']:7s} "
                    f"{2 * r['rate'] / 1e9:5.0f} GFLOP/s  ratio {r['t'] / full:5.2f} "
                    + (f"({'met' if r['t'] / full <= ratio_target(t) else 'MISSED'})"
                       if ratio_target(t) is not None else "(info)  "))
            if native:
                line += f"  vs native MKL rate: ratio {r['t'] / (r['n'] * r['n'] * r['d'] / native):5.2f} (info)"
            print(line)
    print("(the faiss peer row runs in the first tier's child only: it does not depend on the tier)")
    return max(codes) if codes else 1


if __name__ == "__main__":
    sys.exit(main())
