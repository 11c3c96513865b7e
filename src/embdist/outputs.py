"""Outputs commit last.

A task writes every file of its run (safetensors, tables, plots, shards) into a hidden staging
folder inside the run folder, under the files' final names.  Only when the task has returned and
everything else that can fail has been done are they moved to the run folder, with Ctrl-C and
SIGTERM held back for the few renames.  A run that fails, is interrupted or is killed leaves no
file under a final name; a killed run's staging folder carries its pid, so the next embdist
process removes it (:func:`embdist.liveness.remove_dead_temporaries`).  The commit lists the
run's files in ``.embdist-outputs.json``; a later run that overwrites the folder
(``task.overwrite=true``) removes the listed files it does not write again.
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
# The run folder's list of the files its last committed run wrote (relative paths, JSON): a run
# that overwrites the folder (task.overwrite=true) removes those it does not write again, so the
# folder never mixes two runs' outputs; files embdist did not write are never touched.
MANIFEST = ".embdist-outputs.json"


def staging_name(pid: int | None = None) -> str:
    return f"{STAGING_PREFIX}{os.getpid() if pid is None else pid}"


class Staging:
    """The staging folder of one run (``RUN_DIR/.embdist-staging-PID``)."""

    def __init__(self, run_dir: Path):
        self.final = Path(run_dir)
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
        """The files (relative paths) the folder's last committed run listed in its manifest."""
        try:
            names = json.loads((self.final / MANIFEST).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(names, list):
            return []
        # only plain relative paths inside the folder (a hand-edited manifest cannot reach out)
        return [n for n in names if isinstance(n, str) and n and not Path(n).is_absolute()
                and ".." not in Path(n).parts]

    def commit(self) -> list[Path]:
        """Move every staged file to its final name, remove the outputs of the run this one
        overwrites that it does not write again, and list the new ones in the manifest (signals
        held back meanwhile)."""
        moved = self.committed = []
        with _signals_held():
            staged = self.files()
            names = [src.relative_to(self.dir).as_posix() for src in staged]
            stale = sorted(set(self.previous_outputs()) - set(names))
            for name in stale:
                (self.final / name).unlink(missing_ok=True)
            for src in staged:
                dst = self.final / src.relative_to(self.dir)
                try:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                except OSError as e:      # e.g. a folder in the way: the caller rolls back
                    err = disk_error(e, dst, "moving an output to")
                    raise (err if err is not e else InputError(
                        f"cannot put the output {str(dst)!r} in place ({e.strerror}); remove what is "
                        "there or write to a new folder")) from None
                moved.append(dst)
            atomic.write_bytes(self.final / MANIFEST, json.dumps(names, indent=0).encode())
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
