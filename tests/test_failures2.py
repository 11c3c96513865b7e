"""Issue 13 through ``python -m embdist``: every bad input, fault and killer gives one line, the
right exit status, the right MLflow status and no leftover file.

Processes are few (the machine is small): most input cases run as the jobs of one sweep (one
process, one FAILED child run and one line per job; the loaders are the same as for a single
run), the single-run format is checked on a handful, and the killed runs run side by side.
With EMBDIST_CASES_TABLE=FILE the cases are written there as a Markdown table.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_embdist, runs_of, wait_for_line

CUSTOM = ("model=custom", "task.progress=false")
TABLE: list[tuple] = []
LEFT = (".safetensors", ".npz", ".tmp", "embdist-staging")


def _env(home: Path) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    e.update(EMBDIST_HOME=str(home), PYTHONUNBUFFERED="1")
    return e


def leftovers(folder: Path) -> list[str]:
    """Outputs, temporaries and staging folders under a run folder (the .hydra config and the log aside)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if any(m in p.name for m in LEFT) or p.suffix in (".csv", ".png"))


def record(case, command, p_or_line, code, status, left):
    TABLE.append((case, command, p_or_line, code, status, ", ".join(left) or "none"))


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    out = os.environ.get("EMBDIST_CASES_TABLE")
    if out:
        rows = ["| case | command | message (stderr) | exit | MLflow | leftovers |", "|---|---|---|---|---|---|"]
        rows += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in TABLE]
        Path(out).write_text("\n".join(rows) + "\n")


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("embdist")]
    assert "Traceback" not in stderr, stderr
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Every broken input the cases need, made once."""
    d = tmp_path_factory.mktemp("inputs")
    g = torch.Generator().manual_seed(0)
    good = torch.randn(40, 8, generator=g).to(torch.bfloat16)
    f = {}

    def st(name, **tensors):
        save_file(tensors, str(d / name))
        return d / name

    f["f64"] = st("f64.safetensors", **{"model.embed_tokens.weight": torch.randn(40, 8, dtype=torch.float64)})
    f["i8"] = st("i8.safetensors", **{"model.embed_tokens.weight": torch.ones(40, 8, dtype=torch.int8)})
    f["bool"] = st("bool.safetensors", **{"model.embed_tokens.weight": torch.ones(40, 8, dtype=torch.bool)})
    f["rows0"] = st("rows0.safetensors", **{"model.embed_tokens.weight": torch.ones(0, 8)})
    f["cols2"] = st("cols2.safetensors", **{"model.embed_tokens.weight": torch.randn(40, 2, generator=g)})
    nan = torch.full((40, 8), float("nan"))
    f["allnan"] = st("allnan.safetensors", **{"model.embed_tokens.weight": nan})
    f["row1"] = st("row1.safetensors", **{"model.embed_tokens.weight": torch.randn(1, 8, generator=g)})
    f["good"] = st("other-model.safetensors", **{"model.embed_tokens.weight": good})

    def ckpt(name, index=None, shard="ok"):
        c = d / name
        c.mkdir()
        s = c / "model-00001-of-00001.safetensors"
        if shard == "ok":
            save_file({"model.embed_tokens.weight": good}, str(s))
        elif shard == "folder":
            s.mkdir()
        elif shard == "loop":
            s.symlink_to(s.name)
        (c / "model.safetensors.index.json").write_text(
            index if index is not None else json.dumps({"weight_map": {"model.embed_tokens.weight": s.name}}))
        return c

    f["notjson"] = ckpt("notjson", index="{truncated")
    f["nomap"] = ckpt("nomap", index='{"metadata": {"total_size": 1}}')
    f["outside"] = ckpt("outside", index=json.dumps({"weight_map": {"model.embed_tokens.weight": "../f64.safetensors"}}))
    f["missing"] = ckpt("missing", shard="none")
    f["shardfolder"] = ckpt("shardfolder", shard="folder")
    f["loop"] = ckpt("loop", shard="loop")
    f["fifo"] = d / "pipe.safetensors"
    os.mkfifo(f["fifo"])
    f["tok"] = ckpt("badtokenizer")
    (f["tok"] / "tokenizer.json").write_text("{not a tokenizer")

    def hist(name, shape, inf=False):
        h = torch.randn(*shape, generator=g)
        if inf:
            h[1, 3, 0] = float("inf")
        return st(name, embedding_history=h.to(torch.bfloat16))

    f["h_steps0"] = hist("steps0.safetensors", (0, 8, 4))
    f["h_tok1"] = hist("tok1.safetensors", (3, 1, 4))
    f["h_dim0"] = hist("dim0.safetensors", (3, 8, 0))
    f["h_inf"] = hist("inf.safetensors", (3, 8, 4), inf=True)
    f["h_ok"] = hist("seed7-history.safetensors", (3, 8, 4))
    return f


class Launched:
    """A ``python -m embdist`` (or ``python -c``) process started with the module, in its own
    embdist home, so the slow starts overlap; a test collects it with :meth:`result`."""

    def __init__(self, root: Path, name: str, args=(), code: str | None = None, module: str = "embdist"):
        self.home = root / name
        self.home.mkdir()
        argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", module, *args]
        self.t0 = self.t1 = time.time()
        self.out, self.err = root / f"{name}.stdout", root / f"{name}.stderr"
        with open(self.out, "w") as o, open(self.err, "w") as e:  # files, not pipes: nothing blocks on a full pipe
            self.proc = subprocess.Popen(argv, cwd=self.home, env=_env(self.home), stdout=o, stderr=e, text=True)
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self):
        self.proc.wait()
        self.t1 = time.time()

    def result(self, timeout: float = 900):
        """(exit status, stdout, stderr, seconds the process ran)."""
        self.proc.wait(timeout=timeout)
        while self.t1 == self.t0:  # the waiter thread records the end
            time.sleep(0.01)
        return self.proc.returncode, self.out.read_text(), self.err.read_text(), self.t1 - self.t0


SINGLE = [  # (args, the line's start, MLflow status: None = refused before any run)
    (("bbox.r_max=nan",), "embdist: error: bbox.r_max=nan is not a number", None),
    (("task.memory_limit_gb=-1",), "embdist: error: task.memory_limit_gb=-1.0 is not a memory size in GiB > 0", None),
    (("model.tokenizer=/nowhere/tokenizer.json",), "embdist: error: model.tokenizer='/nowhere/tokenizer.json' does not exist", None),
    (("task=vocab", "model.path={row1}"), "embdist: error: tensor 'model.embed_tokens.weight' has shape (1, 8): 1 row(s)", "FAILED"),
    (("model.path={f64}", "task.device=cuda"), "embdist: error: task.device=cuda but this machine has no usable CUDA device", "FAILED"),
]
TRACKING = [
    ("file://{tmp}/mlruns", "is a file store, which MLflow 3 no longer writes"),
    ("sqlite:///{tmp}/afile/mlflow.db", "is a file, so no database can be created below it"),
    ("http://127.0.0.1:9", "the tracking server http://127.0.0.1:9 cannot be reached"),
]
HIST = ("task=snapshots", "task.progress=false", "history.vocab_size=null", "history.hidden_dim=null",
        "history.expected_steps=null")
SNAPSHOT_CASES = [("h_steps0", "0 step(s); embdist needs at least 1 step(s)"),
                  ("h_tok1", "1 token(s); embdist needs at least 2 token(s)"),
                  ("h_dim0", "0 dimension(s); embdist needs at least 1 dimension(s)"),
                  ("h_inf", "1 rows of embedding_history in")]


def _sweep_args(data, task_args, key, cases, sweep_dir, extra=()):
    paths = ",".join(str(data.get(k, k)) for k, _ in cases)
    return ("-m", *task_args, f"{key}={paths}", f"hydra.sweep.dir={sweep_dir}", *extra)


@pytest.fixture(scope="module")
def launched(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "afile").write_text("")
    L = {}
    for part in range(3):  # three sweeps side by side: the jobs of one sweep run one after another
        name = f"sweep_overdensity{part}"
        L[name] = Launched(root, name, _sweep_args(
            data, ("task=overdensity", *CUSTOM, "bbox=all"), "model.path", OVERDENSITY_CASES[part::3],
            root / name / "sweep", ("model.drop_nonfinite=true",)))
    L["sweep_snapshots"] = Launched(root, "sweep_snapshots", _sweep_args(
        data, HIST, "history.path", SNAPSHOT_CASES, root / "sweep_snapshots" / "sweep"))
    L["snap_drop"] = Launched(root, "snap_drop", (*HIST, f"history.path={data['h_inf']}", "model.drop_nonfinite=true",
                                                  "metric=euclidean", f"hydra.run.dir={root / 'snap_drop' / 'run'}"))
    for i, (args, _, _) in enumerate(SINGLE):
        args = [a.format(**data) for a in args]
        path = [] if any(a.startswith("model.path=") for a in args) else [f"model.path={data['good']}"]
        L[f"single{i}"] = Launched(root, f"single{i}", (*CUSTOM, *path, *args, f"hydra.run.dir={root / f'single{i}' / 'one'}"))
    for i, (uri, _) in enumerate(TRACKING):
        L[f"tracking{i}"] = Launched(root, f"tracking{i}", (*CUSTOM, f"model.path={data['good']}",
                                                            f"tracking.uri={uri.format(tmp=root)}",
                                                            f"hydra.run.dir={root / f'tracking{i}' / 'one'}"))
    L["boom"] = Launched(root, "boom", code=(
        "import sys, embdist.geometry as g\n"
        "def pca(*a, **k):\n    raise ZeroDivisionError('division by zero')\n"
        "g.pca = pca\nfrom embdist.__main__ import main\n"
        f"sys.argv = ['embdist', 'model=custom', 'task.progress=false', 'model.path={data['good']}', "
        f"'hydra.run.dir={root / 'boom' / 'run'}']\nmain()\n"))
    L["merge"] = Launched(root, "merge", (str(data["good"]), "--no-mlflow"), module="embdist.merge")
    L["label"] = Launched(root, "label", (*CUSTOM, f"model.path={data['good']}", "bbox=all",
                                          f"hydra.run.dir={root / 'label' / 'fixed'}"))
    killers = root / "killers"
    killers.mkdir()
    L["killers"] = [_start_paused(killers, w, killers / f"killed-{i}-{w}", data) for i, w in enumerate(KILLED_AT)]
    yield L
    for x in L.values():
        for proc in (x if isinstance(x, list) else [x.proc]):
            if proc.poll() is None:
                proc.kill()


# --- the loaders: one sweep per task, one job per broken input ------------------------------------

OVERDENSITY_CASES = [  # (key, message)
    ("f64", "is stored as F64; embdist reads BF16, F16 and F32 tensors only"),
    ("i8", "is stored as I8"),
    ("bool", "is stored as BOOL"),
    ("rows0", "0 row(s) (tokens); embdist needs at least 2 row(s)"),
    ("cols2", "the PCA sky needs 3 principal components but the matrix has 2 column(s)"),
    ("notjson", "model.safetensors.index.json' is not JSON"),
    ("nomap", 'has no "weight_map" object'),
    ("outside", "outside the checkpoint folder"),
    ("missing", "does not exist; the checkpoint is incomplete"),
    ("shardfolder", "is a folder, not a regular file"),
    ("loop", "is a symbolic link loop"),
    ("fifo", "is a named pipe (FIFO)"),
    ("/dev/null", "is a character device"),
    ("tok", "as a tokenizers tokenizer.json"),
    ("allnan", "40 of 40 rows of model.embed_tokens.weight"),
]


def _check_sweep(run, task, key, cases):
    rc, out, err, _ = run.result()
    assert rc == 2, err
    assert "Traceback" not in err + out
    sweep_dir = run.home / "sweep"
    children = {int(r.data.tags["embdist.run_dir"].rsplit("/", 1)[1]): r for r in runs_of(run.home)
                if r.data.tags.get("mlflow.parentRunId")}
    for i, (k, message) in enumerate(cases):
        lines = [ln for ln in err.splitlines() if ln.startswith(f"embdist: error: job {i} (")]
        assert len(lines) == 1 and message in lines[0], (k, message, err)
        r = children[i]
        assert r.info.status == "FAILED" and message in r.data.tags["error"], (k, r.data.tags.get("error"))
        left = leftovers(sweep_dir / str(i))
        assert left == [], (k, left)
        record(f"{task}: {k}", f"`{key}=<{k}>`", lines[0].split("): ", 1)[1], "2 (sweep)", r.info.status, left)
    return err


@pytest.mark.parametrize("part", range(3))
def test_overdensity_inputs(launched, part):
    _check_sweep(launched[f"sweep_overdensity{part}"], "overdensity", "model.path", OVERDENSITY_CASES[part::3])


def test_snapshots_inputs(launched, data):
    err = _check_sweep(launched["sweep_snapshots"], "snapshots", "history.path", SNAPSHOT_CASES)
    assert "hold NaN or Inf (in some step) (token ids 3); set model.drop_nonfinite=true" in err
    # the same option as every task: left out, recorded, and the run named after the file read
    drop = launched["snap_drop"]
    rc, _, err, _ = drop.result()
    assert rc == 0, err
    (run,) = runs_of(drop.home)
    assert run.info.status == "FINISHED" and run.data.metrics["n_rows_nonfinite_dropped"] == 1
    assert run.info.run_name == "snapshots:inf"
    out = load_file(run.data.tags["output.pairwise_distances"])
    assert out["token_ids"].tolist() == [0, 1, 2, 4, 5, 6, 7] and out["euclidean_distances"].shape == (3, 7, 7)
    record("snapshots: Inf, model.drop_nonfinite=true", "`task=snapshots history.path=<inf> model.drop_nonfinite=true`",
           "(token 3 left out, token_ids stored)", 0, "FINISHED", "-")


# --- single runs: the exact line, the exit status ----------------------------------------------

@pytest.mark.parametrize("i", range(len(SINGLE)))
def test_single_runs(launched, i):
    args, message, status = SINGLE[i]
    if "task.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = launched[f"single{i}"]
    rc, _, err, _ = run.result()
    line = one_line(err)
    assert rc == 2 and line.startswith(message), err
    runs = runs_of(run.home) if (run.home / "mlflow.db").exists() else []
    assert [r.info.status for r in runs] == ([] if status is None else [status])
    if status:
        assert message.split("error: ", 1)[1] in runs[0].data.tags["error"]
    assert leftovers(run.home / "one") == []
    record(" ".join(a for a in SINGLE[i][0] if "{" not in a) or SINGLE[i][0][0], "`" + " ".join(SINGLE[i][0]) + "`", line, rc,
           status or "no run", leftovers(run.home / "one"))


@pytest.mark.parametrize("i", range(len(TRACKING)))
def test_tracking_store_refused_at_once(launched, i):
    uri, message = TRACKING[i]
    run = launched[f"tracking{i}"]
    rc, _, err, took = run.result()
    line = one_line(err)
    assert rc == 2 and message in line, err
    # the unreachable server: one probe of at most 5 s, so it ends about when the file:// case
    # (refused without any contact) does, started at the same moment
    assert took - launched["tracking0"].result()[3] < 15, took
    assert not (run.home / "mlflow.db").exists() and leftovers(run.home / "one") == []
    record(f"tracking.uri={uri.split(':')[0]}", f"`tracking.uri={uri}`", line, 2, "no run (no store)", [])


def test_internal_error_is_one_line_and_a_failed_run(launched):
    run = launched["boom"]
    rc, _, err, _ = run.result()
    line = one_line(err)
    assert rc == 1, err
    assert line == ("embdist: internal error: ZeroDivisionError: division by zero "
                    "(HYDRA_FULL_ERROR=1 shows the traceback)"), err
    (r,) = runs_of(run.home)
    assert r.info.status == "FAILED" and r.data.tags["error"].startswith("internal error: ZeroDivisionError")
    assert "Traceback" in (run.home / "run" / "embdist.log").read_text()  # for the record, not the screen
    assert leftovers(run.home / "run") == []
    record("unexpected exception (geometry.pca raises)", "(patched)", line, 1, "FAILED", [])


def test_merge_on_a_file_that_is_not_a_shard(launched):
    rc, _, err, _ = launched["merge"].result()
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert "is not a vocab_shard.npz shard of a task=vocab run" in last
    record("merge of a non-shard", "`python -m embdist.merge other-model.safetensors`", last, 2, "-", [])


# --- labels, a finished folder, overwrite ------------------------------------------------------

def test_labels_from_the_input_and_finished_folder(launched, data):
    run = launched["label"]
    rc, _, err, _ = run.result()
    assert rc == 0, err
    folder = run.home / "fixed"
    (r,) = runs_of(run.home)
    assert r.info.run_name == "overdensity:other-model" and r.data.params["model.name"] == "other-model"
    assert r.data.tags["embdist.input.path"] == str(data["good"].resolve())
    assert int(r.data.tags["embdist.input.bytes"]) == data["good"].stat().st_size
    assert len(r.data.tags["embdist.input.sha256"]) == 64
    assert json.loads(load_file_meta(folder / "distances.safetensors"))["model"] == "other-model"
    assert r.data.tags["embdist.pid"].isdigit() and r.data.tags["embdist.host"]
    # no staging folder, no lock file after a clean exit: only the list of the run's outputs
    assert [f.name for f in folder.glob(".embdist*")] == [".embdist-outputs.json"]
    p = run_embdist(*CUSTOM, f"model.path={data['good']}", "bbox=all", f"hydra.run.dir={folder}", home=run.home,
                    check=False)
    line = one_line(p.stderr)
    assert p.returncode == 2 and "holds a finished run's distances.safetensors" in line and "task.overwrite=true" in line
    assert len(runs_of(run.home)) == 1  # refused before any run
    record("folder holds a finished run", "`hydra.run.dir=<finished run>`", line, 2, "no run",
           ["(the finished run's own files, untouched)"])


def load_file_meta(path: Path) -> str:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()["embdist"]


# --- killers: kill -9 during compute, save and report; Ctrl-C during report; a second run in a busy folder

PATCH = {  # where the patched process stops (prints PAUSED, then waits to be killed)
    "compute": "import embdist.pairwise as P\nP.pairwise = lambda *a, **k: pause()\n",
    "save": ("import embdist.store as S\nfrom embdist.atomic import temporary_name\n"
             "def save(tensors, path, metadata=None):\n"
             "    temporary_name(path).write_bytes(b'half a file')\n    pause()\nS.save_atomic = save\n"),
    "report": "import embdist.plots as P\nP.sky_map = lambda *a, **k: pause()\n",
}


def _start_paused(home: Path, where: str, folder: Path, data) -> subprocess.Popen:
    code = ("import sys, time\n"
            "def pause():\n    print('PAUSED', flush=True)\n    time.sleep(600)\n"
            + PATCH[where] +
            "from embdist.__main__ import main\n"
            f"sys.argv = ['embdist', 'model=custom', 'task.progress=false', 'bbox=all', "
            f"'model.path={data['good']}', 'hydra.run.dir={folder}']\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=home, env=_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    proc.embdist_home = home
    return proc


def _wait_paused(proc: subprocess.Popen, timeout: float = 600) -> str:
    return wait_for_line(proc, "PAUSED", timeout, start=True)


KILLED_AT = ["compute", "save", "report", "report"]  # the last one gets Ctrl-C, the others kill -9


def test_killed_runs_leave_nothing_and_are_marked_killed(launched, data):
    where = KILLED_AT
    procs = launched["killers"]
    home = procs[0].embdist_home
    folders = [home / f"killed-{i}-{w}" for i, w in enumerate(where)]
    for p in procs:
        _wait_paused(p)
    # a second run into a busy folder: refused in one line, before it writes anything there
    busy = run_embdist(*CUSTOM, f"model.path={data['good']}", f"hydra.run.dir={folders[0]}", home=home, check=False)
    line = one_line(busy.stderr)
    assert busy.returncode == 2 and f"is in use by another embdist run (pid {procs[0].pid} on" in line, busy.stderr
    record("a second run into a busy folder", "`hydra.run.dir=<running run>`", line, 2, "no run", [])
    assert "save" in str(folders[1]) and any(".tmp-" in x for x in leftovers(folders[1]))  # the half-written file
    for p in procs[:3]:
        p.send_signal(signal.SIGKILL)
    procs[3].send_signal(signal.SIGINT)  # Ctrl-C during the report
    out, _ = procs[3].communicate(timeout=120)
    assert procs[3].returncode == 130 and "embdist: interrupted" in out and "Traceback" not in out
    assert leftovers(folders[3]) == []
    for p in procs[:3]:
        p.wait(timeout=60)
    statuses = {r.data.tags["embdist.run_dir"]: r.info.status for r in runs_of(home)}
    assert [statuses[str(f)] for f in folders] == ["RUNNING", "RUNNING", "RUNNING", "KILLED"]
    # the next embdist process on this store: marks them KILLED, removes what they left
    run_embdist(*CUSTOM, f"model.path={data['good']}", "bbox=all", f"hydra.run.dir={home / 'next'}", home=home)
    runs = {r.data.tags["embdist.run_dir"]: r for r in runs_of(home)}
    for f, w in zip(folders, where):
        r = runs[str(f)]
        assert r.info.status == "KILLED", (w, r.info.status)
        assert leftovers(f) == [], (w, leftovers(f))
        how = "SIGINT (Ctrl-C)" if f == folders[3] else "kill -9"
        record(f"{how} during {w}, then another run", f"`{how}` at {w}",
               r.data.tags.get("error", ""), "-9" if how == "kill -9" else 130, r.info.status, leftovers(f))
    assert "ended without closing it (killed)" in runs[str(folders[0])].data.tags["error"]
    assert runs[str(home / "next")].info.status == "FINISHED"
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


def test_hydra_full_error_shows_the_traceback_of_a_users_error(tmp_path):
    """The one failure boundary (embdist.errors.failure_or_raise): one line by default, the
    traceback with HYDRA_FULL_ERROR=1, for the merge tool as for the app."""
    missing = tmp_path / "no-such-sweep"
    cmd = [sys.executable, "-m", "embdist.merge", str(missing), "--no-mlflow"]
    quiet = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    loud = subprocess.run(cmd, env={**_env(tmp_path), "HYDRA_FULL_ERROR": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr, quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("embdist.merge: error: ")
    assert str(missing) in quiet.stderr
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "InputError" in loud.stderr, loud.stderr
