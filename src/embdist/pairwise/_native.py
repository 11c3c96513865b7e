"""Build (once, with the system C compiler) and load the native CPU kernels.

``kernels.c`` is compiled on first use into a per-user cache directory
(``$EMBDIST_CACHE_DIR``, else ``$XDG_CACHE_HOME/embdist``, else ``~/.cache/embdist``)
as ``pairwise-<hash>.so``; the hash covers the source, the compiler, its flags and the
CPU's feature flags, so a cache shared between different machines never loads a
library built for another CPU.  The library is written to a temporary name and
renamed into place, so concurrent first uses (parallel jobs) are safe.

If there is no compiler, the build fails, or ``EMBDIST_PAIRWISE_NATIVE=0``,
:func:`load` returns ``None`` and the engine uses its torch fallback (correct, slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SRC = Path(__file__).with_name("kernels.c")
STREAM_SRC = Path(__file__).with_name("kernels_stream.c")   # #included at the end of kernels.c
ABI = 8                                  # bump when the C signatures change
_lock = threading.Lock()
_lib = None
_err: str | None = None
_tried = False


def cache_dir() -> Path:
    env = os.environ.get("EMBDIST_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "embdist"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    for c in ([cc] if cc else []) + ["gcc", "cc", "clang"]:
        p = shutil.which(c)
        if p:
            return p
    return None


def _flags(march: str | None = None) -> list[str]:
    march = march or os.environ.get("EMBDIST_PAIRWISE_MARCH", "native")
    return ["-O3", f"-march={march}", "-fPIC", "-shared", "-std=c11", "-fno-fast-math",
            "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]


def _build(march: str | None = None, directory: Path | None = None) -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc/clang) on PATH")
    src = SRC.read_bytes() + (STREAM_SRC.read_bytes() if STREAM_SRC.exists() else b"")
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    flags = _flags(march)
    key = hashlib.sha256(b"\0".join([src, str(ABI).encode(), cc.encode(), ver.encode(),
                                     " ".join(flags).encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    dirs = [directory] if directory else [cache_dir(), Path(tempfile.gettempdir()) / f"embdist-{os.getuid()}"]
    for d in dirs:                      # the cache, else a private temp dir (read-only home)
        so = d / f"pairwise-{key}.so"
        if so.exists():
            return so
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".pairwise-", suffix=".so", dir=d)
            break
        except OSError:
            continue
    else:
        raise RuntimeError(f"no writable cache directory among {[str(d) for d in dirs]}")
    so = d / f"pairwise-{key}.so"
    os.close(fd)
    try:
        p = subprocess.run([cc, *flags, str(SRC), "-o", tmp, "-lm"], capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"{cc} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


_P = ctypes.c_void_p
_I = ctypes.c_int64
_D = ctypes.c_double
_SIGS = {
    "emb_abi": ([], ctypes.c_int),
    "emb_has_avx512": ([], ctypes.c_int),
    "emb_row_hash": ([_P, _I, _I, _I, _I, _P], None),
    "emb_pack_panels": ([_P, _I, _I, _I, _P, _D, _P, _I, _I, _P], None),
    "emb_cheb_block": ([_P, _I, _I, _P, _I, _I, _I, _I, _P, _I], None),
    "emb_l1_block": ([_P, _I, _I, _P, _I, _I, _I, _I, _P, _I], None),
    "emb_euclid_block": ([_P, _I, _I, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _P, _P, _I], _I),
    "emb_direct_sq": ([_P, _I, _I, _P, _P, _I, _P], None),
    "emb_snap_euclid": ([_P, _I, _I, _I, _I, _I, _I, _I, _I], None),
    "emb_snap_cheb": ([_P, _I, _I, _I, _I, _I, _I, _I, _I], None),
    "emb_hist_upper": ([_P, _I, _I, _I, _I, _I, _I, _I, _P, _P], None),
    "emb_col_sums": ([_P, _I, _I, _I, _I, _P], None),
    "emb_centred_absmax": ([_P, _I, _I, _P, _I, _I], _D),
}


def load():
    """The loaded library (ctypes.CDLL), or None when native kernels are unavailable."""
    global _lib, _err, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("EMBDIST_PAIRWISE_NATIVE", "1") == "0":
                raise RuntimeError("disabled by EMBDIST_PAIRWISE_NATIVE=0")
            if sys.platform == "win32":
                raise RuntimeError("native kernels are built for POSIX systems only")
            _lib = build_and_open()
        except Exception as e:  # any failure: fall back to torch, say why once
            _err = f"{type(e).__name__}: {e}"
            log.warning("embdist.pairwise: native kernels unavailable (%s); using the torch fallback", _err)
            _lib = None
        _tried = True
        return _lib


def build_and_open(march: str | None = None, directory: Path | None = None):
    """Compile (or reuse from the cache) and open the library; raises on any failure."""
    lib = ctypes.CDLL(str(_build(march, directory)))
    for name, (args, res) in _SIGS.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res
    if lib.emb_abi() != ABI:
        raise RuntimeError(f"ABI mismatch: {lib.emb_abi()} != {ABI}")
    return lib


def load_error() -> str | None:
    load()
    return _err
