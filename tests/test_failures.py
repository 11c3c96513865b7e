"""Bad input, interruptions and full disks, met as a user meets them: `python -m embdist ...`
in a subprocess. Each case checks the message, the exit status, the MLflow run and the files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_embdist, runs_of, wait_for_line

CUSTOM = ("model=custom", "task.progress=false")


def fails(home: Path, *args: str, message: str, run_status: str | None = "FAILED", code: int = 2):
    """Run, expect a clean failure: exit code, one-line message, no traceback, run marked, no outputs."""
    p = run_embdist(*args, home=home, check=False)
    assert p.returncode == code, p.stderr
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    db = home / "mlflow.db"
    runs = runs_of(home) if db.exists() else []
    jobs = [r for r in runs if r.data.tags.get("embdist.sweep") != "parent"]
    if run_status is None:
        assert jobs == []  # refused before any run was started
    else:
        (run,) = jobs
        assert run.info.status == run_status
        assert message in run.data.tags["error"]
        assert not list(Path(run.data.tags["embdist.run_dir"]).glob("*.safetensors*"))
    assert not list((home / "outputs").rglob("*.safetensors*")) if (home / "outputs").exists() else True
    return p


@pytest.fixture
def matrix(tmp_path):
    w = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    path = tmp_path / "m.safetensors"
    save_file({"model.embed_tokens.weight": w.to(torch.bfloat16)}, str(path))
    return path


# --- inputs that are not there, not safetensors, or not what they claim -------------------------

def test_missing_model_path(home, tmp_path):
    fails(home, *CUSTOM, f"model.path={tmp_path / 'nope'}", message="does not exist")


def test_unset_model_path_in_a_sweep_names_the_run_after_it(home):
    """model=custom with no model.path: the job's FAILED run says what is unset in its name
    (it was 'overdensity:None#0'), and the sweep's parent names that run."""
    fails(home, "-m", *CUSTOM, message="model.path has no value")
    (job,) = [r for r in runs_of(home) if r.data.tags.get("embdist.sweep") != "parent"]
    assert job.info.run_name == "overdensity:<model.path unset>#0"
    (parent,) = [r for r in runs_of(home) if r.data.tags.get("embdist.sweep") == "parent"]
    assert parent.info.status == "FAILED" and "overdensity:<model.path unset>#0" in parent.data.tags["error"]


def test_overwrite_leaves_none_of_the_old_runs_other_outputs(home, tmp_path, matrix):
    """task.overwrite=true into a finished run's folder: the new run's files replace the old ones,
    the old run's files the new one does not write are removed (the folder never mixes two runs),
    and a file embdist did not write stays."""
    folder = tmp_path / "run"
    args = (*CUSTOM, f"model.path={matrix}", "bbox=all", f"hydra.run.dir={folder}")
    run_embdist(*args, "metric=both", home=home)
    assert (folder / "chebyshev_histogram.png").is_file() and (folder / "euclidean_histogram.png").is_file()
    (folder / "notes.txt").write_text("mine")
    p = run_embdist(*args, "metric=euclidean", "task.overwrite=true", home=home, check=False)
    assert p.returncode == 0, p.stderr
    assert not (folder / "chebyshev_histogram.png").exists()
    assert (folder / "euclidean_histogram.png").is_file() and (folder / "notes.txt").read_text() == "mine"
    assert not [k for k in load_file(str(folder / "distances.safetensors")) if "chebyshev" in k]
    written = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()
                     and f.relative_to(folder).parts[0] not in (".hydra", "embdist.log", "notes.txt",
                                                                ".embdist-outputs.json"))
    assert json.loads((folder / ".embdist-outputs.json").read_text()) == {"kind": "run", "files": written}
    assert [r.info.status for r in runs_of(home)] == ["FINISHED", "FINISHED"]


def test_folder_without_safetensors(home, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    fails(home, *CUSTOM, f"model.path={tmp_path / 'ckpt'}", message="holds no .safetensors file")


def test_truncated_safetensors(home, tmp_path, matrix):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(matrix.read_bytes()[:3000])
    fails(home, *CUSTOM, f"model.path={cut}", message="truncated")


def test_corrupt_header(home, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    fails(home, *CUSTOM, f"model.path={bad}", message="not safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_checkpoints_are_refused_never_unpickled(home, tmp_path, suffix):
    marker = tmp_path / "unpickled"
    # A pickle that would create a file if it were ever loaded.
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (tmp_path / f"pytorch_model{suffix}").write_bytes(payload)
    fails(home, *CUSTOM, f"model.path={tmp_path / f'pytorch_model{suffix}'}", message="pickle checkpoint")
    assert not marker.exists()


def test_tensor_name_not_in_file_lists_names(home, matrix):
    fails(home, *CUSTOM, f"model.path={matrix}", "model.tensor=lm_head.weight",
          message="it holds: model.embed_tokens.weight")


def test_matrix_not_2d(home, tmp_path):
    p = tmp_path / "cube.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4, 4)}, str(p))
    fails(home, *CUSTOM, f"model.path={p}", message="must be 2-D")


def _history(tmp_path, shape):
    p = tmp_path / "h.safetensors"
    save_file({"embedding_history": torch.randn(*shape).to(torch.bfloat16)}, str(p))
    return p


def test_history_not_3d(home, tmp_path):
    p = _history(tmp_path, (5, 16))
    fails(home, "task=snapshots", f"history.path={p}", "task.progress=false", message="must be 3-D")


def test_history_dimensions_contradict_config(home, tmp_path):
    p = _history(tmp_path, (5, 16, 8))
    fails(home, "task=snapshots", f"history.path={p}", "task.progress=false",
          message="history has (vocab, dim) = (16, 8) but the config expects (128, 64)")


# --- NaN / Inf rows ------------------------------------------------------------------------------

def test_nonfinite_rows_named_and_optionally_dropped(home, tmp_path):
    w = torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    w[7, 2], w[42, 0] = float("nan"), float("inf")
    p = tmp_path / "nan.safetensors"
    save_file({"model.embed_tokens.weight": w}, str(p))
    fails(home, *CUSTOM, f"model.path={p}", "bbox=all", message="2 rows of model.embed_tokens.weight")
    assert "token ids 7, 42" in runs_of(home)[0].data.tags["error"]
    run_embdist(*CUSTOM, f"model.path={p}", "bbox=all", "model.drop_nonfinite=true", home=home)
    run = runs_of(home)[-1]
    assert run.info.status == "FINISHED" and run.data.metrics["n_rows_nonfinite_dropped"] == 2
    ids = load_file(run.data.tags["output.distances"])["spike_token_ids"].tolist()
    assert ids == [i for i in range(100) if i not in (7, 42)]  # original token ids


# --- the box and the basis -----------------------------------------------------------------------

def test_empty_box_suggests_the_nearest_wider_box(home, matrix):
    p = fails(home, *CUSTOM, f"model.path={matrix}", "bbox=all", "bbox.r_min=100", "bbox.r_max=101",
              message="the bounding box selects 0 token(s) of 200; the nearest wider box (")
    assert "holds" in p.stderr


@pytest.mark.parametrize("override, message", [
    ("bbox.lat_min=10", "bbox.lat_min=10.0 is above bbox.lat_max=5.0"),
    ("bbox.lat_max=91", "bbox.lat_max=91.0 is outside [-90, 90]"),
    ("bbox.lon_min=-181", "bbox.lon_min=-181.0 is outside [-180, 180]"),
    ("bbox.r_min=-0.5", "bbox.r_min=-0.5 is negative"),
    ("basis.north=0", "basis.north=0: principal components are numbered from 1"),
    ("basis.meridian=-2", "repeats a principal component"),
])
def test_box_and_basis_values_fail_before_any_run(home, matrix, override, message):
    args = [*CUSTOM, f"model.path={matrix}", "bbox.lat_max=5", override]
    fails(home, *args, message=message, run_status=None)


def test_pc_beyond_the_dimension(home, matrix):
    fails(home, *CUSTOM, f"model.path={matrix}", "basis.equinox=17",
          message="basis.equinox=17 is beyond the matrix's 16 dimensions")


# --- unknown names and wrong types: Hydra's own message from the typed schema -------------------

@pytest.mark.parametrize("override, message", [
    ("metric=hamming", "Could not find 'metric/hamming'"),
    ("task=cluster", "Could not find 'task/cluster'"),
    ("bbox.colour=red", "Key 'colour' not in 'BBoxConfig'"),
    ("bbox.lat_min=north", "could not be converted to Float"),
])
def test_unknown_option_key_or_type(home, override, message):
    p = run_embdist(override, home=home, check=False)
    assert p.returncode == 1 and message in p.stderr
    assert "Traceback" not in p.stderr
    assert not (home / "mlflow.db").exists()  # nothing started


# --- room to write -------------------------------------------------------------------------------

def test_output_larger_than_memory_is_refused_with_numbers(home, matrix):
    fails(home, *CUSTOM, f"model.path={matrix}", "bbox=all", "task.memory_limit_gb=0.0000001",
          message="of memory but 0.00 GiB is allowed by task.memory_limit_gb")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    if not _tmpfs(d, "2m"):
        pytest.skip("needs permission to mount a tmpfs")
    yield d
    subprocess.run(["umount", "-l", str(d)])


def test_output_larger_than_free_disk_is_refused(home, small_disk, tmp_path):
    w = torch.randn(1200, 8, generator=torch.Generator().manual_seed(2))
    p = tmp_path / "m.safetensors"
    save_file({"model.embed_tokens.weight": w}, str(p))
    fails(home, *CUSTOM, f"model.path={p}", "bbox=all", f"hydra.run.dir={small_disk / 'run'}",
          message="on disk but")


def test_out_of_core_needs_float32_storage(home, matrix):
    fails(home, *CUSTOM, f"model.path={matrix}", "task.out_of_core=true", "task.dtype=float16",
          message="set task.dtype=float32 or task.out_of_core=false")


def test_out_of_core_file_that_cannot_be_allocated(small_disk):
    """The whole file is allocated before any distance is written: a full disk is one clear
    error at the start (not SIGBUS mid-run), and no file or temporary is left."""
    from embdist.sources import InputError
    from embdist.store import MappedSafetensors
    with pytest.raises(InputError, match="No space left on device while allocating"):
        MappedSafetensors(small_disk / "d.safetensors", {"d": (torch.float32, (1024, 1024))})
    assert list(small_disk.iterdir()) == []


def test_out_of_core_file_interrupted_while_allocating_or_without_fallocate(tmp_path, monkeypatch):
    """Ctrl-C while the file is being reserved leaves nothing; where fallocate is missing
    (macOS) the file is extended sparse, with a warning, and is still a valid safetensors file."""
    from safetensors.torch import load_file as load

    from embdist import store

    def interrupted(fd, nbytes):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(store, "_allocate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.MappedSafetensors(tmp_path / "d.safetensors", {"d": (torch.float32, (64, 64))})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delattr(os, "posix_fallocate")
    with store.MappedSafetensors(tmp_path / "d.safetensors", {"d": (torch.float32, (3, 3)),
                                                               "ids": (torch.int64, (3,))}) as f:
        f.tensors["d"].copy_(torch.eye(3))
        f.tensors["ids"].copy_(torch.tensor([5, 6, 7]))
        f.commit()
    got = load(str(tmp_path / "d.safetensors"))
    assert torch.equal(got["d"], torch.eye(3)) and torch.equal(got["ids"], torch.tensor([5, 6, 7]))
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_unwritable_run_folder(home, tmp_path, matrix):
    (tmp_path / "a_file").write_text("")
    fails(home, *CUSTOM, f"model.path={matrix}", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}",
          message="cannot write the run folder", run_status=None)


# --- interrupted and out-of-space runs leave nothing half-written --------------------------------

def _start(home: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(EMBDIST_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "embdist", *args], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    return wait_for_line(proc, text, timeout)


@pytest.mark.parametrize("out_of_core", [False, True])
def test_ctrl_c_mid_computation(home, tmp_path, out_of_core):
    # 24,000 x 2,048: the Chebyshev matrix takes several seconds, long enough to interrupt.
    # Out of core, the 2.3 GB file being filled is deleted too.
    w = torch.randn(24000, 2048, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    p = tmp_path / "big.safetensors"
    save_file({"model.embed_tokens.weight": w}, str(p))
    run_dir = tmp_path / "run"
    proc = _start(home, *CUSTOM, f"model.path={p}", "bbox=all", "metric=chebyshev", f"hydra.run.dir={run_dir}",
                  f"task.out_of_core={out_of_core}")
    _wait_for(proc, "Computing chebyshev distances")
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "embdist: interrupted" in out and "Traceback" not in out
    assert [f.name for f in run_dir.iterdir() if not f.name.startswith(".hydra")] == ["embdist.log"]
    (run,) = runs_of(home)
    assert run.info.status == "KILLED"


def test_disk_full_during_write(home, tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "64m"):
        pytest.skip("needs permission to mount a tmpfs")
    try:
        w = torch.randn(3000, 64, generator=torch.Generator().manual_seed(4))
        p = tmp_path / "m.safetensors"
        save_file({"model.embed_tokens.weight": w}, str(p))
        run_dir = disk / "run"
        proc = _start(home, *CUSTOM, f"model.path={p}", "bbox=all", f"hydra.run.dir={run_dir}")
        _wait_for(proc, "Computing euclidean distances")  # the free-space check has passed
        proc.send_signal(signal.SIGSTOP)
        with open(disk / "filler", "wb") as f:  # another process fills the disk meanwhile
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, out
        assert "No space left on device" in out and "Traceback" not in out
        left = [f.name for f in run_dir.iterdir()]
        assert not [f for f in left if "safetensors" in f or "tmp" in f], left  # no final file, no temporary
        (run,) = runs_of(home)
        assert run.info.status == "FAILED" and "No space left" in run.data.tags["error"]
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# --- parallel sweeps and reproducibility -------------------------------------------------------

def test_parallel_joblib_sweep_loses_no_run(home, matrix):
    lats = ",".join(str(v) for v in (-90, -60, -40, -20, -10, 0, 10, 20))
    run_embdist("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *CUSTOM, f"model.path={matrix}",
                "bbox=all", f"bbox.lat_min={lats}", home=home)
    runs = runs_of(home)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in children)
    assert all("n_tokens" in r.data.metrics and "euclidean/mean" in r.data.metrics for r in children)
    from mlflow.tracking import MlflowClient
    c = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert [e.name for e in c.search_experiments()].count("embdist") == 1


def test_sweep_records_failed_jobs_and_goes_on(home, matrix):
    # job 1: a value refused by the schema; job 2: a box that selects no token (fails mid-task)
    p = run_embdist("-m", *CUSTOM, f"model.path={matrix}", "bbox=all", "bbox.lat_min=-90,95,89.99", home=home,
                    check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert "embdist: error: job 1 (" in p.stderr and "outside [-90, 90]" in p.stderr
    assert "embdist: error: job 2 (" in p.stderr and "selects 0 token(s)" in p.stderr
    assert "2 of 3 jobs failed" in p.stderr
    runs = runs_of(home)
    (parent,) = [r for r in runs if r.data.tags.get("embdist.sweep") == "parent"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: r.info.run_name)
    assert parent.info.status == "FAILED" and "2 of 3 jobs failed" in parent.data.tags["error"]
    assert parent.data.metrics["jobs_failed"] == 2 and parent.data.metrics["jobs"] == 3
    assert [r.info.status for r in children] == ["FINISHED", "FAILED", "FAILED"]
    assert "outside [-90, 90]" in children[1].data.tags["error"]
    assert "selects 0 token(s)" in children[2].data.tags["error"]
    assert Path(children[0].data.tags["output.distances"]).is_file()
    assert not list(Path(children[2].data.tags["embdist.run_dir"]).glob("*.safetensors*"))


def test_sweep_whose_shard_merge_fails_is_failed(home, matrix):
    p = run_embdist("-m", "task=vocab", *CUSTOM, f"model.path={matrix}", "shard.count=2", "shard.index=0",
                    home=home, check=False)
    assert p.returncode == 2, p.stderr
    assert "missing [1]" in p.stderr and "python -m embdist.merge" in p.stderr and "Traceback" not in p.stderr
    runs = runs_of(home)
    (parent,) = [r for r in runs if r.data.tags.get("embdist.sweep") == "parent"]
    assert parent.info.status == "FAILED" and "merge failed" in parent.data.tags["error"]
    assert [r.info.status for r in runs if r is not parent] == ["FINISHED"]


def test_a_merge_that_cannot_finish_leaves_no_merged_outputs(home, matrix, tmp_path):
    """The sweep's shard merge stages its outputs: when one cannot be put in place (a folder in
    the way of groups.csv) the merge fails in one line and merged/ holds none of its files."""
    sweep = tmp_path / "sweep"
    (sweep / "merged" / "groups.csv").mkdir(parents=True)
    (sweep / "merged" / "groups.csv" / "mine.txt").write_text("x")
    p = run_embdist("-m", "task=vocab", *CUSTOM, f"model.path={matrix}", "shard.count=2", "shard.index=0,1",
                    f"hydra.sweep.dir={sweep}", home=home, check=False)
    assert p.returncode == 2, p.stderr
    assert "cannot put the output" in p.stderr and "groups.csv" in p.stderr and "Traceback" not in p.stderr
    left = sorted(str(f.relative_to(sweep / "merged")) for f in (sweep / "merged").rglob("*") if f.is_file())
    assert left == ["groups.csv/mine.txt"], left
    (parent,) = [r for r in runs_of(home) if r.data.tags.get("embdist.sweep") == "parent"]
    assert parent.info.status == "FAILED" and "cannot put the output" in parent.data.tags["error"]
    # a merge by hand into a folder another process is merging into (holds its lock) is refused
    from embdist import liveness
    busy = tmp_path / "busy"
    busy.mkdir()
    lock = liveness.FolderLock(busy)
    lock.acquire("--out")
    try:
        p = subprocess.run([sys.executable, "-m", "embdist.merge", str(sweep), "--out", str(busy), "--no-mlflow"],
                           capture_output=True, text=True, cwd=home, env={**os.environ, "EMBDIST_HOME": str(home)})
    finally:
        lock.lock.release()
    assert p.returncode == 2 and "is in use by another embdist run" in p.stderr and "--out" in p.stderr, p.stderr
    assert not [f for f in busy.iterdir() if f.name != ".embdist.lock"]


def test_same_input_gives_bit_identical_outputs(home, matrix):
    for _ in range(2):
        run_embdist(*CUSTOM, f"model.path={matrix}", "bbox=all", "metric=both", home=home)
    a, b = runs_of(home)
    assert a.data.tags["sha256.distances"] == b.data.tags["sha256.distances"]
    assert a.data.tags["output.distances"] != b.data.tags["output.distances"]
