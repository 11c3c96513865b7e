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


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32"}


class MappedSafetensors:
    """A safetensors file whose tensors are filled in place through a memory map (for outputs
    larger than RAM: the page cache holds what is being written, the kernel writes it back).

        with MappedSafetensors(path, {"d": (torch.float32, (n, n))}, metadata) as f:
            engine.pairwise(x, out=f.tensors["d"])
            f.commit()

    The header is written first and the whole file is allocated up front (posix_fallocate),
    so a full disk fails here, in one line, instead of as SIGBUS while the engine writes.  The
    file has a temporary name until ``commit`` (flush, then rename); leaving the ``with`` block
    without committing deletes it.  The layout is the safetensors format (8-byte header length,
    JSON header padded with spaces so the data starts 64-byte aligned, tensors back to back,
    wider dtypes first), readable by ``safetensors.safe_open``;
    the metadata is the same single sorted-JSON key as ``save_atomic``.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        import struct

        import numpy as np

        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {"embdist": json.dumps(metadata, sort_keys=True)}
        offset, layout = 0, {}
        # wider elements first, so every tensor starts aligned to its element size
        order = sorted(specs.items(), key=lambda kv: -torch.empty((), dtype=kv[1][0]).element_size())
        for name, (dtype, shape) in order:
            count = 1
            for k in shape:
                count *= int(k)
            nbytes = count * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(k) for k in shape],
                            "data_offsets": [offset, offset + nbytes]}
            layout[name] = (dtype, tuple(int(k) for k in shape), offset, nbytes)
            offset += nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-(8 + len(head)) % 64)          # data starts 64-byte aligned (vector stores)
        start, total = 8 + len(head), 8 + len(head) + offset
        try:
            fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise _disk_error(e, self.path, "creating") from None
        try:  # any failure (Ctrl-C included) before the caller holds this object removes the file
            try:
                _allocate(fd, total)
                head = struct.pack("<Q", len(head)) + head
                if os.pwrite(fd, head, 0) != len(head):
                    raise OSError(errno.EIO, "short write of the safetensors header")
            finally:
                os.close(fd)
            self._map = np.memmap(self.tmp, dtype=np.uint8, mode="r+", shape=(total,)) if offset else None
            self.tensors: dict[str, torch.Tensor] = {}
            for name in specs:
                dtype, shape, off, nbytes = layout[name]
                if nbytes == 0:
                    self.tensors[name] = torch.empty(shape, dtype=dtype)
                else:
                    raw = torch.from_numpy(self._map[start + off:start + off + nbytes])
                    self.tensors[name] = raw.view(dtype).view(shape)
        except BaseException as e:
            self.tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise _disk_error(e, self.path, "allocating") from None
            raise
        self.committed = False

    def commit(self) -> Path:
        try:
            if self._map is not None:
                self._map.flush()
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise _disk_error(e, self.path, "writing") from None
        self.committed = True
        return self.path

    def __enter__(self) -> "MappedSafetensors":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.tmp.unlink(missing_ok=True)


def _allocate(fd: int, nbytes: int) -> None:
    """Reserve the file's blocks now, so a full disk is an error here rather than SIGBUS while
    the memory map is written.  Without posix_fallocate (macOS) or where the file system cannot
    (EOPNOTSUPP), the file is only extended, sparse, with a warning."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    import logging
    logging.getLogger(__name__).warning(
        "cannot reserve disk space here (no fallocate): if the disk fills up while the matrices "
        "are written, the process is killed by SIGBUS and leaves a temporary file")
    os.ftruncate(fd, nbytes)


def _disk_error(e: OSError, path: Path, doing: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return InputError(f"{e.strerror} while {doing} {str(path)!r}; free space there or set hydra.run.dir "
                          "to a larger disk (nothing was left under the final name)")
    return e


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
