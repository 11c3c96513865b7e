"""The kernels on ARM64 (NEON) and across tiers at the C level: tests/kernels_harness.c (planted
duplicate groups, rows one bf16 step apart, subnormal rows, random shapes, checked against a
float64 reference computed in the harness) cross-compiled with aarch64-linux-gnu-gcc and run
under qemu-aarch64, and built natively for every x86 tier this CPU runs.  The tiers must agree
bit for bit where the design says so: Chebyshev, Manhattan and snapshots on every tier,
Euclidean among the tiers whose gram has the same summation shape (chain length, chains per
float64 flush, fused multiply-add or not: avx512 and neon 2 x 16 FMA chains, avx2 4 x 16, portable
multiply and add rounded apart); every tier's Euclidean is checked against float64 in the harness.

CI installs the tools (.ci/run: gcc-aarch64-linux-gnu, qemu-user, clang); elsewhere these tests
skip with the reason."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from embdist.pairwise import _native

HARNESS = Path(__file__).with_name("kernels_harness.c")
KDIR = Path(_native.__file__).parent
FLAGS = ["-O2", "-std=c11", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-Wall", "-Wno-unused-function", f"-I{KDIR}"]
AARCH64_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"


def _build(cc: str, extra: list[str], out: Path) -> Path:
    p = subprocess.run([cc, *FLAGS, *extra, str(HARNESS), "-o", str(out), "-lm"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"{cc} {' '.join(extra)} failed:\n{p.stderr[-3000:]}"
    return out


def _run(cmd: list[str], timeout: int = 240) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0 and p.stdout.rstrip().endswith("OK"), f"{' '.join(cmd)}:\n{p.stdout[-3000:]}{p.stderr[-2000:]}"
    res = {}
    for line in p.stdout.splitlines():
        w = line.split()
        if w[:1] == ["tier"]:
            res["tier"] = w[1]
        elif w[:1] == ["gram"]:
            res["gram"] = tuple(int(v) for v in w[1:])
        elif w[:1] == ["hash"]:
            res[w[1]] = w[2]
    return res


def _x86_tier_flags(tier: str) -> list[str]:
    return [f for f in _native.tier_flags(tier) if f not in ("-shared", "-fPIC")]


@pytest.fixture(scope="module")
def x86_results(tmp_path_factory):
    """Harness results of every x86 tier this CPU runs (gcc, else cc / clang)."""
    if _native.machine() != "x86_64":
        pytest.skip("x86 tiers need an x86-64 CPU")
    cc = _native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("harness")
    out = {}
    for tier in _native.available_tiers():
        exe = _build(cc, _x86_tier_flags(tier), d / f"h-{tier}")
        out[tier] = _run([str(exe), "quick"])
        assert out[tier]["tier"] == tier
    return out


def test_x86_tiers_pass_the_harness_and_agree(x86_results):
    tiers = list(x86_results)
    assert "portable" in tiers
    ref = x86_results[tiers[0]]
    for t in tiers:
        for fam in ("chebyshev", "manhattan", "snapshots"):
            assert x86_results[t][fam] == ref[fam], (t, fam)
    for t in tiers:
        same = [u for u in tiers if x86_results[u]["gram"] == x86_results[t]["gram"]]
        assert len({x86_results[u]["euclidean"] for u in same}) == 1, {u: x86_results[u] for u in same}


@pytest.mark.skipif(shutil.which(AARCH64_CC) is None or shutil.which(QEMU) is None,
                    reason=f"needs {AARCH64_CC} and {QEMU} (Debian packages gcc-aarch64-linux-gnu, qemu-user)")
@pytest.mark.parametrize("tier", ["neon", "portable"])
def test_arm64_harness_under_qemu(tier, tmp_path, x86_results):
    """The NEON tier (and the portable tier built for ARM64) pass the C contract harness under
    qemu-aarch64 and give the x86 tiers' bits."""
    exe = _build(AARCH64_CC, [f"-DEMB_TIER={_native.TIER_CODES[tier]}"], tmp_path / f"h-arm64-{tier}")
    res = _run([QEMU, "-L", SYSROOT, str(exe), "quick"], timeout=600)
    assert res["tier"] == tier
    x86 = x86_results["portable"]
    for fam in ("chebyshev", "manhattan", "snapshots"):
        assert res[fam] == x86[fam], (tier, fam, res, x86)
    # Euclidean bits: against an x86 tier of the same gram shape where this CPU runs one (neon's
    # is avx512's); the harness has checked every tier against float64 either way
    same = [t for t in x86_results if x86_results[t]["gram"] == res["gram"]]
    for t in same:
        assert res["euclidean"] == x86_results[t]["euclidean"], (tier, res, x86_results[t])


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed (Debian package clang)")
def test_harness_with_clang_for_arm64_compiles():
    """clang (the compiler on macOS) compiles the NEON tier for arm64 with the same flags."""
    p = subprocess.run(["clang", "--target=aarch64-linux-gnu", *FLAGS, "-DEMB_TIER=3", "-c",
                        str(KDIR / "kernels.c"), "-o", "/dev/null"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
