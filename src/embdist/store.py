"""Writing results: atomically, after checking they fit."""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from safetensors.torch import save_file

from embdist.sources import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(ram_bytes: int, disk_bytes: int, folder: Path, hint: str, limit_gb: float | None = None) -> None:
    """Refuse, with the numbers and a way out, before allocating what cannot fit.

    ``limit_gb`` (task.memory_limit_gb) caps the memory a run may plan to use below what is free.
    """
    gib = 1024**3
    ram = available_ram()
    what = "is available"
    if limit_gb is not None and limit_gb * gib < ram:
        ram, what = int(limit_gb * gib), "is allowed by task.memory_limit_gb"
    if ram_bytes > ram:
        raise InputError(
            f"the distance matrices need {ram_bytes / gib:.2f} GiB of memory but {ram / gib:.2f} GiB {what}; {hint}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if disk_bytes > free:
        raise InputError(
            f"the output needs {disk_bytes / gib:.2f} GiB on disk but {str(folder)!r} has {free / gib:.2f} GiB free; {hint}"
        )


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors to a temporary name in the same folder, renamed when complete.

    A run stopped mid-write (Ctrl-C, kill, full disk) leaves no file under the final name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # One metadata key holding sorted JSON: safetensors writes a multi-key map in a random
    # order per process, which would make identical results differ byte for byte.
    meta = {"embdist": json.dumps(metadata, sort_keys=True)} if metadata else None
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise InputError(f"{e.strerror} while writing {str(path)!r}; free space there or set hydra.run.dir "
                             "to a larger disk (nothing was left under the final name)") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class RunFolderCheck(Callback):
    """Hydra callback: fail in one line, before Hydra creates it, when the run folder cannot be written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.sweep.dir), "hydra.sweep.dir")

    @staticmethod
    def _check(folder: Path, key: str) -> None:
        probe = folder / f".embdist-write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            print(f"embdist: error: cannot write the run folder {str(folder)!r} ({e.strerror}); "
                  f"set {key} to a writable folder", file=sys.stderr)
            sys.exit(2)
