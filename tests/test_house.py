"""The house (issue 10): a light start, the installed app, determinism across thread counts."""
from __future__ import annotations

import hashlib
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, bf16_round, run_embdist

PROBE = """
import runpy, sys
sys.argv = ["embdist", *{args!r}]
try:
    runpy.run_module("embdist", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "mlflow", "safetensors", "matplotlib") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
print("CODE=" + str(code))
"""


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["task=nope"], 1), (["bbox.lat_min=oops"], 1)])
def test_help_and_config_errors_import_neither_torch_nor_mlflow(tmp_path, args, code):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["EMBDIST_HOME"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert "HEAVY=\n" in p.stdout, out
    assert f"CODE={code}" in p.stdout, out


def _site_packages() -> str:
    return next(p for p in site.getsitepackages() if p.endswith("site-packages"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed non-editable into a fresh virtual
    environment; its dependencies are borrowed from the test's environment (a .pth line), so
    the test needs no network beyond the wheel's build backend."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the checkout")
    d = tmp_path_factory.mktemp("installed")
    src = d / "src"
    # A clean copy of the tracked files (and the working tree's changes): what a user's clone builds.
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "mlflow.db", "mlartifacts",
                                                              "data", "__pycache__", "*.egg-info", "build", "dist"))
    wheels = d / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and ("No matching distribution" in p.stderr or "Could not find" in p.stderr):
        pytest.skip(f"cannot fetch the build backend (hatchling): {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr
    wheel = next(wheels.glob("embdist-*.whl"))
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    fresh_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    Path(fresh_site, "borrowed_deps.pth").write_text(_site_packages() + "\n")
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return py, Path(fresh_site)


def test_installed_wheel_runs_the_default_job_and_config_dir_overrides(installed, tmp_path):
    py, fresh_site = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR", "PYTHONPATH")}
    env["EMBDIST_HOME"] = str(tmp_path / "home")
    where = subprocess.run([str(py), "-c", "import embdist, embdist.paths as p; print(embdist.__file__); "
                            "print(p.config_dir())"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert where[0].startswith(str(fresh_site)), where          # the installed copy, not the checkout
    assert where[1] == str(fresh_site / "embdist" / "conf")      # configs shipped inside the package

    run = subprocess.run([str(py), "-m", "embdist", "task.progress=false"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Found 2,352 tokens in bounding box" in run.stdout + run.stderr
    outs = list((tmp_path / "home" / "outputs").rglob("distances.safetensors"))
    assert len(outs) == 1

    # --config-dir: a user's own config folder adds a model option beside the shipped ones.
    user = tmp_path / "userconf" / "model"
    user.mkdir(parents=True)
    m = tmp_path / "mine.safetensors"
    rng = np.random.default_rng(3)
    save_file({"embeddings.word_embeddings.weight": torch.from_numpy(bf16_round(rng.normal(0, 1, (60, 8))))}, str(m))
    (user / "mine.yaml").write_text(f"name: mine\npath: {m}\n")
    run = subprocess.run([str(py), "-m", "embdist", "--config-dir", str(tmp_path / "userconf"), "model=mine",
                          "bbox.lat_min=-90", "bbox.lat_max=90", "bbox.lon_min=-180", "bbox.lon_max=180",
                          "bbox.r_min=0", "bbox.r_max=1e9", "task.progress=false",
                          f"hydra.run.dir={tmp_path / 'run2'}"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Found 60 tokens in bounding box" in run.stdout + run.stderr
    assert (tmp_path / "run2" / "distances.safetensors").is_file()


def _digests(folder: Path) -> dict[str, str]:
    skip = {".hydra", "embdist.log"}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not (set(p.relative_to(folder).parts) & skip)}


def test_outputs_are_identical_with_1_2_and_7_threads(home, tmp_path):
    rng = np.random.default_rng(11)
    w = bf16_round(rng.normal(0, 0.05, (700, 40)))
    w[100:140] = w[5]                        # a duplicate group
    w[200:210] = w[6] + np.float32(2.0**-10)  # a near group
    m = tmp_path / "m.safetensors"
    save_file({"embeddings.word_embeddings.weight": torch.from_numpy(w).to(torch.bfloat16)}, str(m))
    box = ["bbox.lat_min=-90", "bbox.lat_max=90", "bbox.lon_min=-180", "bbox.lon_max=180", "bbox.r_min=0",
           "bbox.r_max=1e9"]
    digests = {}
    for threads in (1, 2, 7):
        for task in ("overdensity", "vocab"):
            run_dir = tmp_path / f"{task}-{threads}"
            extra = ["metric=both"] if task == "overdensity" else ["vocab.k=5", "vocab.bins=512", "metric=both"]
            run_embdist(f"task={task}", f"model.path={m}", "model.name=det", "task.progress=false", *box, *extra,
                        f"hydra.run.dir={run_dir}", home=home, env={"EMBDIST_PAIRWISE_THREADS": str(threads),
                                                                     "OMP_NUM_THREADS": str(threads)})
            digests[(task, threads)] = _digests(run_dir)
    for task in ("overdensity", "vocab"):
        one = digests[(task, 1)]
        assert len(one) >= 4 and any(k.endswith(".safetensors") for k in one), one
        assert digests[(task, 2)] == one, task
        assert digests[(task, 7)] == one, task
    # and the engine itself, in process
    from embdist import pairwise
    x = torch.from_numpy(w[:500])
    ref = {}
    for threads in (1, 2, 7):
        os.environ["EMBDIST_PAIRWISE_THREADS"] = str(threads)
        try:
            got = {mt: pairwise(x, mt).numpy().tobytes() for mt in ("euclidean", "chebyshev", "cosine")}
        finally:
            del os.environ["EMBDIST_PAIRWISE_THREADS"]
        ref.setdefault("first", got)
        assert got == ref["first"], threads


def test_every_run_records_its_kernel_tier(home, tmp_path):
    """task.kernels picks the tier; the tier actually used is the run's param and tag."""
    from embdist.pairwise import _native

    from conftest import runs_of
    rng = np.random.default_rng(5)
    m = tmp_path / "m.safetensors"
    save_file({"embeddings.word_embeddings.weight": torch.from_numpy(bf16_round(rng.normal(0, 1, (80, 12))))}, str(m))
    box = ["bbox.lat_min=-90", "bbox.lat_max=90", "bbox.lon_min=-180", "bbox.lon_max=180", "bbox.r_min=0",
           "bbox.r_max=1e9", f"model.path={m}", "task.progress=false"]
    runnable = [t for t in _native.TIERS if _native.lacks(t) is None]
    for k in ("portable", "auto"):
        run_embdist(f"task.kernels={k}", *box, f"hydra.run.dir={tmp_path / k}", home=home)
    run = {r.data.params["task.kernels"]: r for r in runs_of(home)}
    assert run["portable"].data.tags["embdist.kernels"] == "portable" == run["portable"].data.params["embdist.kernels"]
    assert run["auto"].data.tags["embdist.kernels"] == runnable[0]
    missing = [t for t in _native.TIERS if _native.lacks(t) is not None]
    if missing:      # a tier this CPU lacks: one line, exit 2
        p = run_embdist(f"task.kernels={missing[0]}", *box, f"hydra.run.dir={tmp_path / 'x'}", home=home, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and missing[0] in p.stderr, p.stderr
