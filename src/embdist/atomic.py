"""The one atomic writer: write under a temporary name in the same folder, rename when complete.

Every file embdist writes (safetensors, CSV, PNG, HTML, shards, the toy run) goes through
``atomic_path``, so a run stopped mid-write (Ctrl-C, kill, full disk) never leaves a partial
file under the final name, and a full disk becomes one line (:func:`embdist.errors.disk_error`).
The temporary is ``.NAME.tmp-PID``: a later process can tell whose it is.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from embdist.errors import disk_error

TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """The temporary name of ``path`` for this process."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto ``path``, on any failure
    (KeyboardInterrupt included) removed.  A full disk is re-raised as a one-line InputError."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        err = disk_error(e, path, "writing")
        if err is e:
            raise
        raise err from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
