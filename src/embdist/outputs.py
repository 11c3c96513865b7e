"""Outputs commit last.

A task writes every file of its run (safetensors, tables, plots, shards) into a hidden staging
folder inside the run folder, under the files' final names.  Only when the task has returned and
everything else that can fail has been done are they moved to the run folder, with Ctrl-C and
SIGTERM held back for the few renames.  A run that fails, is interrupted or is killed leaves no
file under a final name; a killed run's staging folder carries its pid, so the next embdist
process removes it (:func:`embdist.liveness.remove_dead_temporaries`).  The commit lists the
run's files in ``.embdist-outputs.json`` (which marks the folder as a finished run's); a later
commit of the same kind that overwrites the folder (``task.overwrite=true``, a re-merge) removes
the listed files it does not write again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from embdist import atomic
from embdist.errors import InputError, disk_error

log = logging.getLogger(__name__)

STAGING_PREFIX = ".embdist-staging-"
# The folder's record of what its last commit wrote: {"kind": "run" | "merge", "files": [relative
# paths]}.  A folder holding one is a finished run (liveness.refuse_finished), so a commit meets a
# manifest of its own kind only when it overwrites that run (task.overwrite=true, or a re-merge):
# it then removes the listed files it does not write again, so the folder never mixes two runs'
# outputs; files embdist did not write, and another kind's, are never touched.
MANIFEST = ".embdist-outputs.json"


def staging_name(pid: int | None = None) -> str:
    return f"{STAGING_PREFIX}{os.getpid() if pid is None else pid}"


class Staging:
    """The staging folder of one run (``RUN_DIR/.embdist-staging-PID``)."""

    def __init__(self, run_dir: Path, kind: str = "run"):
        self.final = Path(run_dir)
        self.kind = kind   # "run" (a task's outputs) or "merge" (merged shards): see MANIFEST
        self.dir = self.final / staging_name()
        self.committed: list[Path] = []

    def open(self) -> "Staging":
        if self.dir.exists():  # our own pid's leftover (a pid reused): not ours any more
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        return self

    def final_path(self, path: Path) -> Path:
        """Where a file written into the staging folder will live once committed."""
        path = Path(path)
        try:
            return self.final.resolve() / path.resolve().relative_to(self.dir.resolve())
        except ValueError:
            return path

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.rglob("*") if p.is_file() or p.is_symlink())

    def previous_outputs(self) -> list[str]:
        """The files (relative paths) of the folder's last commit of this kind, from its manifest;
        only names that stay inside the folder (a hand-edited manifest cannot reach out)."""
        try:
            m = json.loads((self.final / MANIFEST).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(m, dict) or m.get("kind") != self.kind or not isinstance(m.get("files"), list):
            return []
        root = self.final.resolve()
        out = []
        for n in m["files"]:
            if not isinstance(n, str) or not n or Path(n).anchor:   # the manifest holds relative names only
                continue
            real = (root / n).resolve()                         # no way out by .. or a symbolic link
            if real != root and real.is_relative_to(root):
                out.append(n)
        return out

    def _check_destinations(self, staged: list[Path]) -> None:
        """Refuse (one line, before anything is removed or moved) a destination that cannot take
        its file: a folder where a file goes, or a file where one of its folders goes."""
        for src in staged:
            rel = src.relative_to(self.dir)
            dst = self.final / rel
            folders = [self.final / q for q in rel.parents][:-1]      # between the run folder and dst
            blocked = dst if dst.is_dir() and not dst.is_symlink() else next(
                (p for p in folders if p.exists() and not p.is_dir()), None)
            if blocked is not None:
                raise InputError(f"cannot put the output {str(dst)!r} in place: {str(blocked)!r} is in the way "
                                 f"({'a folder' if blocked == dst else 'a file'}); remove it or write to a new folder")

    def commit(self) -> list[Path]:
        """Move every staged file to its final name, remove the files of the commit this one
        overwrites that it does not write again (see MANIFEST), and record the new manifest
        (signals held back meanwhile).  Destinations are checked first, so a refused commit
        leaves the earlier run's files as they were."""
        moved = self.committed = []
        with _signals_held():
            staged = self.files()
            self._check_destinations(staged)
            names = [src.relative_to(self.dir).as_posix() for src in staged]
            stale = sorted(set(self.previous_outputs()) - set(names))
            for name in stale:
                old = self.final / name
                if old.is_file() or old.is_symlink():   # a folder put there since is not ours
                    with _one_line(old, "removing"):
                        old.unlink(missing_ok=True)
            for src in staged:
                dst = self.final / src.relative_to(self.dir)
                with _one_line(dst, "moving an output to"):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                moved.append(dst)
            atomic.write_bytes(self.final / MANIFEST,
                               json.dumps({"kind": self.kind, "files": names}, indent=0).encode())
            moved.append(self.final / MANIFEST)
            shutil.rmtree(self.dir, ignore_errors=True)
        if stale:
            log.info("Removed %d output file(s) of the overwritten run: %s", len(stale), ", ".join(stale[:10]))
        if staged:
            log.info("Committed %d output file(s) to %s", len(staged), self.final)
        return moved

    def rollback(self) -> None:
        """Remove what :meth:`commit` moved (the run could not be closed as FINISHED after all)."""
        for p in self.committed:
            p.unlink(missing_ok=True)
        self.committed = []

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def _one_line(path: Path, doing: str) -> Iterator[None]:
    """An OS call of the commit: its failure is one line (a full disk as atomic's; the caller
    rolls back)."""
    try:
        yield
    except OSError as e:
        err = disk_error(e, path, doing)
        raise (err if err is not e else InputError(
            f"{e.strerror or type(e).__name__} while {doing} {str(path)!r}; remove what is there or "
            "write to a new folder")) from None


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C / SIGTERM wait until the block is done (they are delivered right after)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
