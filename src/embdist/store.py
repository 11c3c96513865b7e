"""Writing results: safetensors files laid out once, written atomically, after checking they fit."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from embdist.atomic import atomic_path, temporary_name
from embdist.errors import InputError, disk_error

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ALIGN = 64  # data start: 64-byte aligned, so memory maps of it take aligned vector stores


def available_ram() -> int:
    """Memory that can be allocated without swapping, in bytes (psutil: Linux, macOS, Windows)."""
    import psutil

    return int(psutil.virtual_memory().available)


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


def layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None):
    """The safetensors layout of tensors with these (dtype, shape): (header bytes, {name: (dtype,
    shape, offset, nbytes)}, data bytes).  Deterministic (sorted JSON: safetensors' own writer
    orders its header differently in every process), wider elements first so every tensor is
    aligned to its element size, data start padded to 64 bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset, places = 0, {}
    for name, (dtype, shape) in sorted(specs.items(), key=lambda kv: (-torch.empty((), dtype=kv[1][0]).element_size(), kv[0])):
        count = 1
        for k in shape:
            count *= int(k)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(k) for k in shape],
                        "data_offsets": [offset, offset + nbytes]}
        places[name] = (dtype, tuple(int(k) for k in shape), offset, nbytes)
        offset += nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-(8 + len(head)) % _ALIGN)
    return struct.pack("<Q", len(head)) + head, places, offset


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file under its own temporary name, renamed when complete (never through the
    library's hidden temporary: a killed run leaves only names embdist can recognise)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    head, places, _ = layout({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, metadata)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            for name in sorted(places, key=lambda k: places[k][2]):
                t = tensors[name]
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """The run's safetensors outputs: metadata as one sorted-JSON key ``embdist``."""
    return write_safetensors(tensors, path, {"embdist": json.dumps(metadata, sort_keys=True)} if metadata else None)


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
        import numpy as np

        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        head, places, size = layout(specs, {"embdist": json.dumps(metadata, sort_keys=True)} if metadata else None)
        start, total = len(head), len(head) + size
        try:
            fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise disk_error(e, self.path, "creating") from None
        try:  # any failure (Ctrl-C included) before the caller holds this object removes the file
            try:
                _allocate(fd, total)
                if os.pwrite(fd, head, 0) != len(head):
                    raise OSError(errno.EIO, "short write of the safetensors header")
            finally:
                os.close(fd)
            self._map = np.memmap(self.tmp, dtype=np.uint8, mode="r+", shape=(total,)) if size else None
            self.tensors: dict[str, torch.Tensor] = {}
            for name in specs:
                dtype, shape, off, nbytes = places[name]
                if nbytes == 0:
                    self.tensors[name] = torch.empty(shape, dtype=dtype)
                else:
                    raw = torch.from_numpy(self._map[start + off:start + off + nbytes])
                    self.tensors[name] = raw.view(dtype).view(shape)
        except BaseException as e:
            self.tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise disk_error(e, self.path, "allocating") from None
            raise
        self.committed = False

    def commit(self) -> Path:
        try:
            if self._map is not None:
                self._map.flush()
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise disk_error(e, self.path, "writing") from None
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
