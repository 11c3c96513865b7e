"""Runs that survive their killers.

* Every run records the host and the process (id and start time) that runs it.
* The next embdist process on a store marks the RUNNING runs whose process is gone from this
  host KILLED, and removes the temporaries that dead processes left in their run folders.
* A lock on the run folder keeps a second run out of a busy folder; a folder that holds a
  finished run's outputs is refused unless ``task.overwrite=true``.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import socket
from pathlib import Path
from typing import Iterable

from embdist.errors import InputError
from embdist.outputs import MANIFEST

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, START_TAG = "embdist.host", "embdist.pid", "embdist.pid_start"
LOCK_NAME = ".embdist.lock"
# Temporaries: embdist's own ``.NAME.tmp-PID`` and the hidden ``.tmpXXXXXXXX`` older safetensors
# versions wrote next to the target (no pid: removed only from the folders of dead runs).
_OWN_TMP = re.compile(r"^\..+\.tmp-(\d+)$")
_LIB_TMP = re.compile(r"^\.tmp[A-Za-z0-9_]{6,}$")
_STAGING = re.compile(r"^\.embdist-staging-(\d+)$")  # embdist.outputs: a run's outputs before they commit
# A finished run leaves one of these in its folder (the tasks' main outputs).
FINAL_OUTPUTS = ("distances.safetensors", "pairwise_distances.safetensors", "neighbours.safetensors",
                 "vocab_shard.npz")


def host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when there is none."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return 0.0  # there, but not ours to inspect: alive


def alive(pid: int, started: float | None = None) -> bool:
    """Process ``pid`` runs on this host (and, given its start time, is the same process, not a
    later one that reused the id)."""
    if pid <= 0:
        return False
    now = process_start(pid)
    if now is None:
        return False
    return started is None or now == 0.0 or abs(now - started) < 2.0


def run_tags() -> dict[str, str]:
    """Host, pid and the process's start time: enough for a later process to tell it is gone."""
    return {HOST_TAG: host(), PID_TAG: str(os.getpid()), START_TAG: f"{process_start(os.getpid()) or 0:.2f}"}


def _started(tags: dict) -> float | None:
    try:
        value = float(tags.get(START_TAG, ""))
    except ValueError:
        return None
    return value or None


def reap(client, experiment_ids: Iterable[str] | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone; remove what those dead
    processes left in their run folders.  Returns the ids of the runs marked."""
    from mlflow.entities import RunStatus

    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    experiment_ids = list(experiment_ids)
    if not experiment_ids:
        return []
    me = host()
    runs = client.search_runs(experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{me}'",
                              max_results=1000)
    marked = []
    for r in runs:
        tags = r.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if pid == os.getpid() or alive(pid, _started(tags)):
            continue
        msg = f"the process running it (pid {pid} on {me}) ended without closing it (killed); marked by pid {os.getpid()}"
        try:
            client.set_tag(r.info.run_id, "error", msg)
            client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        except Exception as e:  # another process may be reaping the same run
            log.debug("could not mark run %s: %s", r.info.run_id, e)
            continue
        marked.append(r.info.run_id)
        log.warning("MLflow run %s (%s) was left RUNNING by pid %d, which is gone: marked KILLED",
                    r.info.run_id, r.info.run_name, pid)
        folder = tags.get("embdist.run_dir")
        if folder:
            remove_dead_temporaries(Path(folder), dead_pids={pid})
            _remove_free_lock(Path(folder))
    return marked


def remove_dead_temporaries(folder: Path, dead_pids: set[int] | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` whose process is gone: ``.NAME.tmp-PID`` files and
    ``.embdist-staging-PID`` folders name their process; the library's nameless ``.tmpXXXX``
    files are removed only when ``dead_pids`` says the folder's own run is dead."""
    import shutil

    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _OWN_TMP.match(e.name) or _STAGING.match(e.name)
        if m:
            pid = int(m.group(1))
            dead = pid != os.getpid() and not alive(pid)
        else:
            dead = bool(dead_pids) and bool(_LIB_TMP.match(e.name))
        if not dead:
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        except OSError:
            continue
        removed.append(Path(e.path))
        log.warning("removed %s, left by a process that is gone", e.path)
    return removed


class FolderLock:
    """An exclusive lock on a run folder, held for the life of this process (the OS drops it when
    the process dies, however it dies).  A second run into the same folder is refused at once."""

    _held: dict[str, "FolderLock"] = {}

    def __init__(self, folder: Path):
        from filelock import FileLock

        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.lock = FileLock(str(self.path), timeout=0)

    def acquire(self, key: str) -> None:
        from filelock import Timeout

        try:
            self.lock.acquire()
        except Timeout:
            holder = _holder(self.path)
            raise InputError(f"the run folder {str(self.folder)!r} is in use by another embdist run{holder}; "
                             f"wait for it to finish or set {key} to another folder") from None
        try:  # who holds it, for the message a second run prints (the lock itself is the flock)
            with open(self.path, "w") as f:
                f.write(f"{host()} {os.getpid()}\n")
        except OSError:
            pass

    @classmethod
    def hold(cls, folder: Path, key: str) -> "FolderLock":
        """Lock ``folder`` for the rest of this process (a no-op when this process holds it)."""
        k = str(Path(folder).resolve())
        if k not in cls._held:
            lock = cls(folder)
            lock.acquire(key)
            cls._held[k] = lock
            if len(cls._held) == 1:
                atexit.register(cls._release_all)
        return cls._held[k]

    @classmethod
    def _release_all(cls) -> None:
        """At a clean exit the lock file goes (a killed process leaves it, unlocked, for the next run)."""
        for lock in cls._held.values():
            try:
                lock.path.unlink(missing_ok=True)
                lock.lock.release()
            except OSError:
                pass
        cls._held.clear()


def _remove_free_lock(folder: Path) -> None:
    """The lock file a killed run left in its folder, unless another process holds it now."""
    from filelock import FileLock, Timeout

    path = folder / LOCK_NAME
    if not path.exists() or str(folder.resolve()) in FolderLock._held:
        return
    lock = FileLock(str(path), timeout=0)
    try:
        with lock:
            path.unlink(missing_ok=True)
    except (Timeout, OSError):
        pass


def _holder(path: Path) -> str:
    try:
        who = path.read_text().split()
        return f" (pid {who[1]} on {who[0]})" if len(who) == 2 else ""
    except OSError:
        return ""


def refuse_finished(folder: Path, key: str, overwrite: bool, depth: int = 0) -> None:
    """A folder holding a finished run's outputs is not written again unless task.overwrite=true
    (``depth=1``: also its subfolders, the jobs of a sweep folder)."""
    folder = Path(folder)
    places = [folder] + (sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
                         if depth and folder.is_dir() else [])
    for place in places:
        # the tasks' main outputs, or the record of any committed run (task=survey writes none of them)
        found = [name for name in (*FINAL_OUTPUTS, MANIFEST) if (place / name).exists()]
        if found and not overwrite:
            what = (place / found[0]).relative_to(folder)
            what = f"outputs ({what} lists them)" if found[0] == MANIFEST else what
            raise InputError(f"the run folder {str(folder)!r} holds a finished run's {what}; set {key} to "
                             "a new folder, or task.overwrite=true to write into it again")


def claim_folder(folder: Path, key: str, overwrite: bool, sweep: bool = False) -> None:
    """Before anything is written into a run folder: lock it (a second run is refused), refuse
    it when it holds a finished run (unless overwrite), remove what dead processes left there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    FolderLock.hold(folder, key)
    refuse_finished(folder, key, overwrite, depth=1 if sweep else 0)
    remove_dead_temporaries(folder)
