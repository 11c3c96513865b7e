"""Writing results: atomically, after checking they fit."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
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


def check_fits(ram_bytes: int, disk_bytes: int, folder: Path, hint: str) -> None:
    """Refuse, with the numbers and a way out, before allocating what cannot fit."""
    gib = 1024**3
    ram = available_ram()
    if ram_bytes > ram:
        raise InputError(
            f"the distance matrices need {ram_bytes / gib:.2f} GiB of memory but {ram / gib:.2f} GiB is available; {hint}"
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
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
