"""--tiers for the benchmarks: run the benchmark once per kernel tier, each in its own process
(EMBDIST_KERNELS=<tier>), so every row is measured per tier in the same invocation.

Tier-matched baselines (the default): MKL picks its own ISA at import (AVX-512 on an AVX-512
CPU), so on this machine torch's X @ X.T is about 2x what an AVX2 machine measures.  Each tier's
child therefore runs with MKL_ENABLE_INSTRUCTIONS set to that tier's ISA (avx512: MKL's native
choice; avx2: AVX2; portable, built for x86-64-v2: SSE4_2), i.e. the X @ X.T a machine of that
tier would run; the variable must be set before torch is imported, hence one process per setting.
``native_matmul_s`` times X @ X.T with MKL unrestricted in a process of its own, for the ratios
against the native MKL printed beside the targets (for information).  ``--native-blas`` turns
the restriction off (every child then measures the native MKL)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

# MKL's ISA per tier (None: MKL's own choice, the native one)
MKL_ISA = {"avx512": None, "avx2": "AVX2", "portable": "SSE4_2"}

# The targets of both benchmarks per tier, in one place.  euclidean: ours / X @ X.T at most;
# chebyshev, snapshots: speed-up at least; vocab: time / (N^2 d at the matmul rate) at most.
# A tier not named here (avx512, neon, CUDA) has the engine brief's (issue 4); issue 11 sets
# avx2's and portable's, and gives portable only the Euclidean one (None: information).
BRIEF_TARGETS = {"euclidean": 1.0, "chebyshev": 20, "snapshots": 30, "vocab": 1.2}
TIER_TARGETS = {
    "avx2": {"euclidean": 0.7, "chebyshev": 15, "snapshots": 30, "vocab": 1.2},
    "portable": {"euclidean": 3.0, "chebyshev": None, "snapshots": None, "vocab": None},
}


def target(tier: str | None, row: str) -> float | None:
    """The target of ``row`` for ``tier`` (None: the row is information for that tier)."""
    return TIER_TARGETS.get(tier, BRIEF_TARGETS)[row]


def mkl_label(isa: str | None) -> str:
    return isa or "native"


def resolve(spec: str) -> list[str]:
    """'all' (every tier this CPU runs) or a comma list, validated."""
    from embdist.pairwise import _native
    if spec == "all":
        return _native.available_tiers()
    tiers = [t.strip() for t in spec.split(",") if t.strip()]
    for t in tiers:
        _native.check_choice(t)
    return tiers


def strip_arg(argv: list[str], name: str) -> list[str]:
    """argv without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def mkl_env(isa: str | None) -> dict:
    """This process's environment with MKL limited to ``isa`` (None: MKL's native choice)."""
    env = dict(os.environ)
    env.pop("MKL_ENABLE_INSTRUCTIONS", None)
    if isa:
        env["MKL_ENABLE_INSTRUCTIONS"] = isa
    return env


def child_env(tier: str, matched: bool) -> tuple[dict, str | None]:
    """The environment of a tier's child and the MKL ISA it is limited to (None: native)."""
    isa = MKL_ISA.get(tier) if matched else None
    return dict(mkl_env(isa), EMBDIST_KERNELS=tier), isa


def run_children(script: str, argv: list[str], tiers: list[str], extra, matched: bool = True):
    """Yield (tier, CompletedProcess) for ``script argv extra(tier)`` run once per tier, MKL limited
    to the tier's ISA when ``matched``."""
    for t in tiers:
        env, isa = child_env(t, matched)
        print(f"=== tier {t} (baselines: MKL {mkl_label(isa)})", flush=True)
        p = subprocess.run([sys.executable, script, *argv, *extra(t)], env=env, text=True, capture_output=True)
        sys.stdout.write(p.stdout)
        if p.returncode != 0:
            sys.stdout.write(p.stderr[-3000:])
        yield t, p


_MM_CHILD = """
import json, sys, time, torch
n, d, rep = {n}, {d}, {rep}
x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.02
x @ x[:256].T
best = 1e9
for _ in range(rep):
    t0 = time.perf_counter(); x @ x.T; best = min(best, time.perf_counter() - t0)
print(json.dumps({{"s": best}}))
"""


def native_matmul_s(n: int, d: int, isa: str | None = None, repeat: int = 2) -> float | None:
    """Best wall seconds of one float32 X @ X.T (n x d) in a fresh process with MKL limited to
    ``isa`` (None: native), or None if that process failed."""
    p = subprocess.run([sys.executable, "-c", _MM_CHILD.format(n=n, d=d, rep=repeat)], env=mkl_env(isa), text=True,
                       capture_output=True)
    if p.returncode != 0:
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])["s"]
