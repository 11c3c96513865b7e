"""The one user-error type and the mapping of a full disk onto it.

Imports nothing heavy: ``--help`` and config errors must not pull in torch or MLflow.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

# A full disk, a quota or a file-size limit: the user's to fix, not ours.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class InputError(ValueError):
    """Bad user input: the message names the value and the fix; printed without a traceback."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def disk_error(e: OSError, path: Path | str, doing: str) -> Exception:
    """InputError for a full disk (one line, with the fix), else ``e`` itself."""
    if is_disk_full(e):
        return InputError(f"{e.strerror} while {doing} {str(path)!r}; free space there or set hydra.run.dir "
                          "to a larger disk (nothing was left under the final name)")
    return e


def failure_line(e: BaseException) -> tuple[str, int]:
    """The one line a failure prints (after ``embdist: ``) and the exit status: a user's error
    (bad input, a full disk) with its value and fix, status 2; anything else as an internal
    error, status 1 (HYDRA_FULL_ERROR=1 re-raises it with its traceback)."""
    text = " ".join(str(e).split()) if str(e).strip() else ""
    if isinstance(e, InputError) or is_disk_full(e):
        return f"error: {text or type(e).__name__}", 2
    what = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return f"internal error: {what} (HYDRA_FULL_ERROR=1 shows the traceback)", 1


def failure_or_raise(e: BaseException) -> tuple[str, int]:
    """``failure_line(e)`` for the app's and the merge tool's one failure boundary; with
    HYDRA_FULL_ERROR=1 it re-raises ``e`` instead, so the traceback is shown."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    return failure_line(e)
