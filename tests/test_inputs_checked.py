"""Loaders and validators, in process (fast): every way an input can be wrong has its own one-line
message naming the value and the fix.  The same cases through ``python -m embdist`` are in
tests/test_failures2.py."""
import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from embdist import config, liveness, outputs, paths, preflight, sources, tokens
from embdist.sources import InputError


def _save(path, **tensors):
    save_file(tensors, str(path))
    return path


@pytest.fixture
def ckpt(tmp_path):
    """A sharded checkpoint folder: embeddings in shard 1, a layer in shard 2."""
    d = tmp_path / "ckpt"
    d.mkdir()
    _save(d / "model-00001-of-00002.safetensors", **{"model.embed_tokens.weight": torch.randn(6, 4)})
    _save(d / "model-00002-of-00002.safetensors", **{"layer": torch.randn(2, 2)})
    (d / sources.INDEX_FILE).write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "layer": "model-00002-of-00002.safetensors"}}))
    return d


@pytest.mark.parametrize("dtype, stored", [(torch.float64, "F64"), (torch.int8, "I8"), (torch.bool, "BOOL"),
                                           (torch.int64, "I64")])
def test_dtypes_other_than_bf16_f16_f32_are_refused_before_reading(tmp_path, dtype, stored):
    p = _save(tmp_path / "m.safetensors", **{"model.embed_tokens.weight": torch.ones(5, 4, dtype=dtype)})
    with pytest.raises(InputError, match=f"is stored as {stored}; embdist reads BF16, F16 and F32 tensors only"):
        sources.load_matrix(p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_accepted_dtypes_keep_their_dtype(tmp_path, dtype):
    p = _save(tmp_path / "m.safetensors", **{"model.embed_tokens.weight": torch.ones(5, 4, dtype=dtype)})
    assert sources.load_matrix(p).tensor.dtype == dtype


@pytest.mark.parametrize("shape, message", [
    ((0, 4), r"has shape \(0, 4\): 0 row\(s\) \(tokens\); embdist needs at least 2"),
    ((1, 4), r"has shape \(1, 4\): 1 row\(s\) \(tokens\); embdist needs at least 2"),
    ((5, 0), r"0 column\(s\) \(dimensions\); embdist needs at least 1"),
])
def test_matrix_shapes(tmp_path, shape, message):
    p = _save(tmp_path / "m.safetensors", **{"model.embed_tokens.weight": torch.ones(*shape)})
    with pytest.raises(InputError, match=message):
        sources.load_matrix(p)


def test_sky_needs_three_columns_not_an_impossible_basis():
    with pytest.raises(InputError, match=r"the PCA sky needs 3 principal components but the matrix has 2 column\(s\)"):
        sources.check_sky(2, config.BasisConfig())
    with pytest.raises(InputError, match="basis.equinox=7 is beyond the matrix's 5 dimensions; use ±1..±5"):
        sources.check_sky(5, config.BasisConfig(2, 1, 7))


@pytest.mark.parametrize("shape, message", [
    ((0, 3, 2), r"0 step\(s\); embdist needs at least 1 step"),
    ((2, 1, 2), r"1 token\(s\); embdist needs at least 2 token"),
    ((2, 3, 0), r"0 dimension\(s\); embdist needs at least 1 dimension"),
])
def test_history_shapes(tmp_path, shape, message):
    p = _save(tmp_path / "h.safetensors", embedding_history=torch.ones(*shape))
    with pytest.raises(InputError, match=message):
        sources.load_history(p)


def test_nonfinite_history_rows_same_option_and_message():
    h = torch.zeros(3, 5, 2)
    h[1, 2, 0] = float("inf")
    with pytest.raises(InputError, match=r"1 rows of h hold NaN or Inf \(in some step\) \(token ids 2\); "
                                         "set model.drop_nonfinite=true"):
        sources.finite_rows(h, drop=False, what="h")
    kept_h, kept = sources.finite_rows(h, drop=True, what="h")
    assert kept.tolist() == [0, 1, 3, 4] and kept_h.shape == (3, 4, 2)


def test_every_row_dropped_is_refused():
    w = torch.full((4, 3), float("nan"))
    w[0] = 1
    with pytest.raises(InputError, match=r"3 of 4 rows of w hold NaN or Inf, leaving 1 to compare"):
        sources.finite_rows(w, drop=True, what="w")


# --- index files and shards ---------------------------------------------------------------------

def test_sharded_checkpoint_reads_only_the_needed_shard(ckpt):
    (ckpt / "model-00002-of-00002.safetensors").unlink()  # only the embeddings were downloaded: fine
    assert sources.load_matrix(ckpt).tensor.shape == (6, 4)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not JSON"),
    ('{"metadata": {}}', 'has no "weight_map" object'),
    ('{"weight_map": {}}', 'has an empty "weight_map"'),
    ("[1, 2]", 'has no "weight_map" object'),
    ('{"weight_map": {"model.embed_tokens.weight": 3}}', "to 3, not a file name"),
    ('{"weight_map": {"model.embed_tokens.weight": "../../x.safetensors"}}', "outside the checkpoint folder"),
    ('{"weight_map": {"model.embed_tokens.weight": "/etc/passwd"}}', "outside the checkpoint folder"),
])
def test_bad_index_files(ckpt, text, message):
    (ckpt / sources.INDEX_FILE).write_text(text)
    with pytest.raises(InputError, match=message):
        sources.load_matrix(ckpt)


def test_symlinked_shard_pointing_outside_is_refused(ckpt, tmp_path):
    outside = _save(tmp_path / "elsewhere.safetensors", **{"model.embed_tokens.weight": torch.randn(6, 4)})
    shard = ckpt / "model-00001-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(InputError, match="outside the checkpoint folder"):
        sources.load_matrix(ckpt)


def _shard(ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    shard.unlink()
    return shard


def test_missing_shard(ckpt):
    _shard(ckpt)
    with pytest.raises(InputError, match=r"shard '.*model-00001-of-00002.safetensors' does not exist; the checkpoint "
                                         "is incomplete"):
        sources.load_matrix(ckpt)


def test_shard_that_is_a_folder(ckpt):
    _shard(ckpt).mkdir()
    with pytest.raises(InputError, match="is a folder, not a regular file"):
        sources.load_matrix(ckpt)


def test_shard_that_is_a_symlink_loop(ckpt):
    s = _shard(ckpt)
    s.symlink_to(s.name)
    with pytest.raises(InputError, match="is a symbolic link loop"):
        sources.load_matrix(ckpt)


def test_shard_that_is_a_dangling_symlink(ckpt):
    _shard(ckpt).symlink_to("gone.safetensors")
    with pytest.raises(InputError, match="is a symbolic link to 'gone.safetensors', which does not exist"):
        sources.load_matrix(ckpt)


def test_fifo_is_refused_without_blocking(ckpt, tmp_path):
    os.mkfifo(_shard(ckpt))
    os.mkfifo(tmp_path / "pipe.safetensors")
    t0 = time.time()
    with pytest.raises(InputError, match=r"is a named pipe \(FIFO\), not a regular file"):
        sources.load_matrix(ckpt)
    with pytest.raises(InputError, match=r"model path .* is a named pipe \(FIFO\)"):
        sources.load_matrix(tmp_path / "pipe.safetensors")
    assert time.time() - t0 < 5


def test_device_file_is_called_a_device():
    with pytest.raises(InputError, match="model path '/dev/null' is a character device"):
        sources.load_matrix("/dev/null")


def test_index_lies_about_a_shard(ckpt):
    (ckpt / sources.INDEX_FILE).write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(InputError, match="does not hold tensor 'model.embed_tokens.weight' \\(its index says it does\\)"):
        sources.load_matrix(ckpt)


# --- config values -----------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: config.BBoxConfig(r_max=float("nan")), "bbox.r_max=nan is not a number"),
    (lambda: config.BBoxConfig(lat_min=float("nan")), "bbox.lat_min=nan is not a number"),
    (lambda: config.BBoxConfig(r_min=float("inf")), "bbox.r_min=inf is not finite"),
    (lambda: config.TaskConfig(memory_limit_gb=-1), "task.memory_limit_gb=-1 is not a memory size in GiB > 0"),
    (lambda: config.TaskConfig(memory_limit_gb=0), "task.memory_limit_gb=0 is not"),
    (lambda: config.TaskConfig(memory_limit_gb=float("inf")), "task.memory_limit_gb=inf is not"),
    (lambda: config.TaskConfig(device="cuda:x"), "task.device='cuda:x' is unknown"),
    (lambda: config.ModelConfig(tokenizer="/nowhere/tokenizer.json"), "model.tokenizer='/nowhere/tokenizer.json' does not exist"),
    (lambda: config.ModelConfig(name=" "), "model.name is empty"),
    (lambda: config.HistoryConfig(vocab_size=1), "history.vocab_size=1 is below 2"),
    (lambda: config.HistoryConfig(expected_steps=0), "history.expected_steps=0 is below 1"),
    (lambda: config.HistoryConfig(toy_steps=0), "history.toy_steps=0 is below 1"),
    (lambda: config.TrackingConfig(experiment=""), "tracking.experiment is empty"),
])
def test_config_values(build, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build()


def test_names_come_from_the_input_read():
    assert paths.input_name("/m/Qwen3-4B-Instruct-2507") == "Qwen3-4B-Instruct-2507"
    assert paths.input_name("/m/Qwen3-4B/model.safetensors") == "Qwen3-4B"
    assert paths.input_name("/m/Qwen3-4B/model-00001-of-00002.safetensors") == "Qwen3-4B"
    assert paths.input_name("/x/my-embeddings.safetensors") == "my-embeddings"
    assert paths.input_name("/c/models--Qwen--Qwen3-4B/snapshots/abc123") == "Qwen3-4B"
    assert paths.input_name("/runs/seed7/embedding_evolution.safetensors") == "seed7"


# --- the tokenizer ------------------------------------------------------------------------------

def test_tokenizer_read_up_front(tmp_path, caplog):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(InputError, match="tokenizer.json' as a tokenizers tokenizer.json .*; fix or replace it"):
        tokens.tokenizer_for(None, tmp_path / "m.safetensors", 10)
    (tmp_path / "tokenizer.json").unlink()
    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(InputError, match=r"is a named pipe \(FIFO\)"):
        tokens.tokenizer_for(None, tmp_path / "m.safetensors", 10)
    (tmp_path / "tokenizer.json").unlink()
    assert tokens.tokenizer_for(None, tmp_path / "m.safetensors", 10) is None  # none there: ids as labels
    (tmp_path / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(20)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no tokenizer.json or vocab.txt"):
        tokens.tokenizer_for(tmp_path / "empty", tmp_path / "m.safetensors", 10)
    with caplog.at_level("WARNING"):
        assert tokens.tokenizer_for(None, tmp_path / "m.safetensors", 10) is not None
    assert "the tokenizer knows 20 ids but the matrix has 10 rows" in caplog.text


# --- tracking store, device ----------------------------------------------------------------------

@pytest.mark.parametrize("uri, message", [
    ("file:///tmp/mlruns", "is a file store, which MLflow 3 no longer writes"),
    ("mlruns", "is a file store"),
    ("sqlite://", "is not an SQLite file URI"),
    ("sqlite:///:memory:", "in-memory database"),
])
def test_tracking_uris_refused_without_contact(uri, message):
    with pytest.raises(InputError, match=message):
        preflight.check_tracking_uri(uri)


def test_sqlite_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(InputError, match="is a file, so no database can be created below it"):
        preflight.check_tracking_uri(f"sqlite:///{tmp_path}/afile/sub/mlflow.db")
    with pytest.raises(InputError, match="is a folder, not a database file"):
        preflight.check_tracking_uri(f"sqlite:///{tmp_path}")
    preflight.check_tracking_uri(f"sqlite:///{tmp_path}/new/mlflow.db")  # a folder to be created: fine


def test_unreachable_server_fails_fast_with_its_uri():
    t0 = time.time()
    with pytest.raises(InputError, match=r"the tracking server http://127.0.0.1:9 cannot be reached"):
        preflight.check_tracking_uri("http://127.0.0.1:9")
    assert time.time() - t0 < 15


def test_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="task.device=cuda but this machine has no usable CUDA device"):
        preflight.check_device("cuda")
    preflight.check_device("cpu")


# --- liveness: dead processes, their temporaries, the folder lock --------------------------------

def test_dead_temporaries_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".distances.safetensors.tmp-{dead}").write_bytes(b"x")
    (tmp_path / f".embdist-staging-{dead}").mkdir()
    (tmp_path / f".embdist-staging-{dead}" / "tokens.csv").write_text("")
    (tmp_path / f".tokens.csv.tmp-{os.getpid()}").write_bytes(b"x")  # ours: alive
    (tmp_path / ".tmpab12cd34").write_bytes(b"x")  # the library's nameless temporary
    liveness.remove_dead_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmpab12cd34", f".tokens.csv.tmp-{os.getpid()}"]
    liveness.remove_dead_temporaries(tmp_path, dead_pids={int(dead)})  # the folder's run is dead
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tokens.csv.tmp-{os.getpid()}"]


def test_folder_lock_refuses_a_second_holder(tmp_path):
    first = liveness.FolderLock(tmp_path)
    first.acquire("hydra.run.dir")
    with pytest.raises(InputError, match=rf"is in use by another embdist run \(pid {os.getpid()} on"):
        liveness.FolderLock(tmp_path).acquire("hydra.run.dir")
    first.lock.release()
    liveness.FolderLock(tmp_path).acquire("hydra.run.dir")


def test_finished_folder_needs_overwrite(tmp_path):
    liveness.refuse_finished(tmp_path, "hydra.run.dir", overwrite=False)
    (tmp_path / "distances.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="holds a finished run's distances.safetensors; .* task.overwrite=true"):
        liveness.refuse_finished(tmp_path, "hydra.run.dir", overwrite=False)
    liveness.refuse_finished(tmp_path, "hydra.run.dir", overwrite=True)
    # a committed run whose outputs include none of the tasks' main files (task=survey) is finished too
    survey = tmp_path / "survey"
    s = outputs.Staging(survey).open()
    (s.dir / "regions.csv").write_text("1")
    s.commit()
    with pytest.raises(InputError, match=r"holds a finished run's outputs \(.embdist-outputs.json lists them\)"):
        liveness.refuse_finished(survey, "hydra.run.dir", overwrite=False)


def test_staging_commits_last_and_discards_on_failure(tmp_path):
    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    s = outputs.Staging(tmp_path).open()
    (s.dir / "a.csv").write_text("1")
    (s.dir / "plots").mkdir()
    (s.dir / "plots" / "b.png").write_text("2")
    assert s.final_path(s.dir / "a.csv") == tmp_path.resolve() / "a.csv"
    assert not (tmp_path / "a.csv").exists()
    s.commit()
    assert files(tmp_path) == [outputs.MANIFEST, "a.csv", "plots/b.png"]
    assert json.loads((tmp_path / outputs.MANIFEST).read_text()) == {"kind": "run", "files": ["a.csv", "plots/b.png"]}
    s2 = outputs.Staging(tmp_path / "other").open()
    (s2.dir / "c.csv").write_text("3")
    s2.discard()
    assert list((tmp_path / "other").iterdir()) == []


def test_an_overwriting_commit_replaces_the_earlier_runs_outputs_and_nothing_else(tmp_path):
    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def commit(folder, contents, kind="run"):
        s = outputs.Staging(folder, kind).open()
        for name, text in contents.items():
            (s.dir / name).parent.mkdir(parents=True, exist_ok=True)
            (s.dir / name).write_text(text)
        return s, s.commit

    run = tmp_path / "run"
    commit(run, {"a.csv": "1", "plots/b.png": "2"})[1]()
    (run / "notes.txt").write_text("mine")
    # the overwriting run writes only a.csv: plots/b.png goes, notes.txt (not embdist's) stays
    commit(run, {"a.csv": "4"})[1]()
    assert files(run) == [outputs.MANIFEST, "a.csv", "notes.txt"] and (run / "a.csv").read_text() == "4"
    # a merge into a run's folder leaves the run's own files alone (another kind of commit)
    commit(run, {"merged.csv": "5"}, kind="merge")[1]()
    assert files(run) == [outputs.MANIFEST, "a.csv", "merged.csv", "notes.txt"]
    # a folder in the way of an output: refused in one line before anything is removed or moved
    commit(run, {"x.csv": "6"}, kind="merge")  # (staged only)
    (run / "y.csv").mkdir()
    s, go = commit(run, {"y.csv": "7"}, kind="merge")
    with pytest.raises(InputError, match=r"cannot put the output .*y.csv' in place: .* is in the way \(a folder\)"):
        go()
    s.rollback()
    s.discard()
    assert files(run) == [outputs.MANIFEST, "a.csv", "merged.csv", "notes.txt"]
    # a hand-edited manifest cannot reach outside the folder, by .. or by an absolute path
    (tmp_path / "outside.txt").write_text("x")
    (run / outputs.MANIFEST).write_text(json.dumps(
        {"kind": "run", "files": ["../outside.txt", str(run / "notes.txt"), "a.csv"]}))
    commit(run, {}, kind="run")[1]()
    assert (tmp_path / "outside.txt").exists() and (run / "notes.txt").exists() and not (run / "a.csv").exists()


def test_streaming_without_native_kernels_is_the_users_error_with_the_fix():
    """kernels=torch (or no C compiler): task=vocab and the large-vocabulary dynamics cannot
    stream; one line naming the cause and the fix, not an internal error."""
    from embdist.pairwise import _native
    from embdist.pairwise.stream import _bindings

    before = _native.active_kernels()
    try:
        _native.use_kernels("torch")
        with pytest.raises(InputError, match=r"needs the native CPU kernels: kernels=torch .*; install a C "
                                             r"compiler \(cc\) or choose task.kernels=auto$"):
            _bindings._lib()
    finally:
        _native.use_kernels("auto")
    assert _native.active_kernels() == before
