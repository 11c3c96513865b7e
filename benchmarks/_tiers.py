"""--tiers for the benchmarks: run the benchmark once per kernel tier, each in its own process
(EMBDIST_KERNELS=<tier>), so every row is measured per tier in the same invocation."""
from __future__ import annotations

import os
import subprocess
import sys

# MKL picks its own ISA (AVX-512 on an AVX-512 CPU): with --blas-like-tier the torch baselines of
# a tier run MKL limited to that tier's ISA, i.e. what the tier's machines would measure.
MKL_ISA = {"avx512": "AVX512", "avx2": "AVX2", "portable": "SSE4_2"}


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


def run_children(script: str, argv: list[str], tiers: list[str], extra, blas_like_tier: bool):
    """Yield (tier, CompletedProcess) for ``script argv extra(tier)`` run once per tier."""
    for t in tiers:
        env = dict(os.environ, EMBDIST_KERNELS=t)
        if blas_like_tier and t in MKL_ISA:
            env["MKL_ENABLE_INSTRUCTIONS"] = MKL_ISA[t]
        print(f"=== tier {t}" + (f" (MKL limited to {MKL_ISA[t]})" if blas_like_tier and t in MKL_ISA else ""),
              flush=True)
        p = subprocess.run([sys.executable, script, *argv, *extra(t)], env=env, text=True, capture_output=True)
        sys.stdout.write(p.stdout)
        if p.returncode != 0:
            sys.stdout.write(p.stderr[-3000:])
        yield t, p
