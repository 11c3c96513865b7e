"""Checks made once, before any work: the tracking store and the compute device.

Each failure is a one-line :class:`InputError` naming the value and the fix.  Imports nothing
heavy at import time (torch and MLflow only inside the functions that need them).
"""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from embdist.errors import InputError

PROBE_TIMEOUT_S = 5.0  # one connection attempt to a tracking server; refused connections fail at once
# After the probe, MLflow's own calls retry a little, not for minutes (a user's setting wins).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
FIX = "set tracking.uri to a reachable store (sqlite:///PATH/mlflow.db, or http://HOST:PORT of a running mlflow server)"


def check_tracking_uri(uri: str) -> None:
    """Refuse, without contacting anything yet, a URI that cannot be a store embdist can write:
    a file store (MLflow 3 keeps it read-only), an in-memory SQLite database, an SQLite path
    below a regular file or a folder that cannot be written; probe an HTTP server once."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):  # a path, file://, C:\
        raise InputError(f"tracking.uri={uri!r} is a file store, which MLflow 3 no longer writes (maintenance "
                         "mode); use a database: tracking.uri=sqlite:///PATH/mlflow.db (or null for embdist's own)")
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        probe_server(uri)
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)


def _check_sqlite(uri: str) -> None:
    rest = uri[len("sqlite:"):]
    if not rest.startswith("///"):
        raise InputError(f"tracking.uri={uri!r} is not an SQLite file URI; write sqlite:///relative/path.db or "
                         "sqlite:////absolute/path.db")
    db = rest[3:].split("?", 1)[0]
    if db in ("", ":memory:"):
        raise InputError(f"tracking.uri={uri!r} is an in-memory database that keeps nothing after the run; "
                         "give a file: sqlite:///PATH/mlflow.db")
    path = Path(db)
    if path.exists() and not path.is_file():
        raise InputError(f"tracking.uri={uri!r}: {str(path)!r} is {'a folder' if path.is_dir() else 'not a regular file'}, "
                         "not a database file; point tracking.uri at a file (e.g. sqlite:///PATH/mlflow.db)")
    # The first existing folder above the database must be a writable folder (MLflow creates the rest).
    above = path.parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise InputError(f"tracking.uri={uri!r}: {str(above)!r} is a file, so no database can be created below it; "
                         "point tracking.uri at a path inside a folder")
    target = path if path.exists() else above
    if not os.access(target, os.W_OK):
        raise InputError(f"tracking.uri={uri!r}: {str(target)!r} cannot be written (permission denied); {FIX}")


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One HTTP request to the server's health endpoint: any answer (even 404 or 401) means it is
    there; no answer within ``timeout`` seconds is one line naming the URI."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        text = getattr(reason, "strerror", None) or str(reason) or type(e).__name__
        if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in text:
            text = f"no answer within {timeout:g} s"
        raise InputError(f"the tracking server {uri} cannot be reached ({text}); start it "
                         f"(mlflow server --backend-store-uri sqlite:///mlflow.db --port PORT) or {FIX}") from None


def contact_error(uri: str, e: BaseException) -> InputError:
    """The store could not be used when it was first contacted: one line with the URI."""
    text = " ".join(str(e).split())[:300] or type(e).__name__
    return InputError(f"cannot use the tracking store {uri} ({type(e).__name__}: {text}); {FIX}")


def check_device(device: str) -> None:
    """task.device names a device this machine has (auto and cpu always do)."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
            raise InputError(f"task.device={device} but this machine has no usable CUDA device ({built}); "
                             "set task.device=cpu or task.device=auto")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise InputError(f"task.device={device} but this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1}); choose one of them or task.device=auto")
    elif device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError("task.device=mps but this machine has no usable Apple GPU (MPS); "
                             "set task.device=cpu or task.device=auto")
