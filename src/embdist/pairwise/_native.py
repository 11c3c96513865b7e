"""Build (once per kernel tier, with the system C compiler) and load the native CPU kernels.

Tiers (see kernels.c for the one kernel design behind them), best first:

* ``avx512``: x86-64 with AVX-512 F/DQ/BW/VL (built ``-march=native``);
* ``avx2``: x86-64 with AVX2 + FMA + F16C (built ``-mavx2 -mfma -mf16c``): AMD Zen, Intel
  Haswell and later;
* ``neon``: AArch64 (NEON is part of the base ISA; no -march/-mcpu, so gcc on Linux and
  clang on macOS arm64 take the same flags);
* ``portable``: any CPU (x86-64: ``-march=x86-64-v2``, no FMA);
* ``torch``: no native library, the engine's torch path.

The CPU is detected at load time (``cpu_features``: /proc/cpuinfo on Linux, ``sysctl`` on
macOS, elsewhere on x86-64 the level torch's own dispatch found by CPUID, on ARM64 the machine
name; nothing fails where /proc is absent) and the best tier it
runs is picked.  ``EMBDIST_KERNELS=auto|avx512|avx2|neon|portable|torch`` or
:func:`use_kernels` forces one; a tier the CPU lacks is a one-line ``InputError``.
If a tier fails to build, ``auto`` tries the next one down; a forced tier falls back to
torch with a warning (:func:`active_kernels` says which tier is in use).

``kernels.c`` (with ``kernels_stream.c`` and the ``simd_*.h`` headers) is compiled on first
use into a per-user cache directory (``$EMBDIST_CACHE_DIR``, else ``$XDG_CACHE_HOME/embdist``,
else ``~/.cache/embdist``) as ``pairwise-<tier>-<hash>.so``; the hash covers the sources, the
compiler, its flags and the CPU's feature flags, so a cache shared between different machines
never loads a library built for another CPU.  The library is written to a temporary name and
renamed into place, so concurrent first uses (parallel jobs) are safe.

``EMBDIST_PAIRWISE_MARCH`` (a build detail kept from earlier versions): with ``auto``, build
one library with ``-march=<value>`` and let the compiler's target decide the tier.
``EMBDIST_PAIRWISE_NATIVE=0`` is the same as ``EMBDIST_KERNELS=torch``.
"""
from __future__ import annotations

import ctypes
import functools
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

HERE = Path(__file__).parent
SRC = HERE / "kernels.c"
SOURCES = ("kernels.c", "kernels_stream.c", "kernels_dynamics.c", "simd_avx512.h", "simd_avx2.h", "simd_neon.h", "simd_portable.h")
ABI = 13                                  # bump when the C signatures change
TIERS = ("avx512", "avx2", "neon", "portable")          # best first
CHOICES = ("auto",) + TIERS + ("torch",)
TIER_CODES = {"portable": 0, "avx2": 1, "avx512": 2, "neon": 3}   # EMB_TIER in kernels.c
_NEEDS = {"avx512": ("avx512f", "avx512dq", "avx512bw", "avx512vl"), "avx2": ("avx2", "fma", "f16c")}

_lock = threading.RLock()
_lib = None
_err: str | None = None
_tried = False
_active = "torch"
_choice: str | None = None               # set by use_kernels; None: EMBDIST_KERNELS, else auto


def cache_dir() -> Path:
    env = os.environ.get("EMBDIST_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "embdist"


# ----------------------------------------------------------------------------- CPU detection
def machine() -> str:
    """'x86_64', 'arm64' or the platform's own name (lower case)."""
    m = platform.machine().lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l", "aarch64_be"):
        return "arm64"
    return m


def _sysctl(name: str) -> str:
    try:
        p = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
        return p.stdout if p.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset:
    """The CPU's feature flags in Linux /proc/cpuinfo spelling (lower case: 'avx2', 'fma',
    'avx512f', 'asimd', ...); empty where nothing tells (then only 'portable' is chosen)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    flags.update(line.split(":", 1)[1].lower().split())
                    break
    except OSError:
        pass
    if not flags and sys.platform == "darwin":
        for name in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            flags.update(_sysctl(name).lower().replace(".", "_").split())
        if "avx1_0" in flags:
            flags.add("avx")
    if not flags and machine() == "x86_64":
        flags.update(_torch_x86_flags())
    if machine() == "arm64":
        flags.update(("asimd", "neon"))          # NEON (Advanced SIMD) is mandatory on AArch64
    return frozenset(flags)


# torch's CPU dispatch level -> the flags it implies (ATen's DispatchStub: AVX512 needs AVX-512
# F/DQ/BW/VL and FMA, AVX2 needs AVX2 and FMA; F16C came before AVX2 on every x86 CPU)
_TORCH_LEVEL_FLAGS = {
    "avx512": ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
}


def _torch_x86_flags() -> tuple[str, ...]:
    """Where the OS tells nothing (BSD, Windows, a sandbox without /proc): the x86 level torch's
    own dispatch found by CPUID (the pytorch/cpuinfo library; ATEN_CPU_CAPABILITY lowers it)."""
    try:
        import torch
        level = str(torch.backends.cpu.get_cpu_capability()).lower()
    except Exception:        # an old torch without the query: nothing more is known
        return ()
    return _TORCH_LEVEL_FLAGS.get(level, ())


def _cpu_flags() -> str:
    return " ".join(sorted(cpu_features())) or platform.processor() or platform.machine()


def lacks(tier: str) -> str | None:
    """Why this CPU cannot run ``tier`` (one line), or None if it can."""
    if tier in ("portable", "torch"):
        return None
    m = machine()
    if tier == "neon":
        return None if m == "arm64" else f"NEON kernels need an ARM64 CPU; this one is {m}"
    if m != "x86_64":
        return f"{tier} kernels need an x86-64 CPU; this one is {m}"
    miss = [f for f in _NEEDS[tier] if f not in cpu_features()]
    return f"this CPU lacks {', '.join(miss)} (needed by the {tier} kernels)" if miss else None


def available_tiers() -> list[str]:
    """The native tiers this CPU runs, best first (the build may still fail: see load)."""
    return [t for t in TIERS if lacks(t) is None]


def _input_error(msg: str) -> Exception:
    try:
        from ..errors import InputError
    except ImportError:
        from ..sources import InputError
    return InputError(msg)


def check_choice(name: str) -> str:
    """``name`` if it is a tier this CPU can run (or auto / torch); else a one-line InputError."""
    if name not in CHOICES:
        raise _input_error(f"kernels={name!r} is not a kernel tier; use one of {', '.join(CHOICES)}")
    why = lacks(name) if name != "auto" else None
    if why:
        ok = ", ".join(["auto"] + available_tiers() + ["torch"])
        raise _input_error(f"kernels={name}: {why}; use one of {ok}")
    return name


# ----------------------------------------------------------------------------- building
def _compiler() -> str | None:
    cc = os.environ.get("CC")
    for c in ([cc] if cc else []) + ["gcc", "cc", "clang"]:
        p = shutil.which(c)
        if p:
            return p
    return None


BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno",
              "-fno-trapping-math", "-Wall", "-Wno-unused-function"]


def tier_flags(tier: str | None, march: str | None = None) -> list[str]:
    """Compiler flags for ``tier`` (None: only ``-march=<march>``, the compiler's target decides)."""
    if tier is None:
        return BASE_FLAGS + [f"-march={march or os.environ.get('EMBDIST_PAIRWISE_MARCH', 'native')}"]
    isa: list[str] = []
    if tier == "avx512":
        isa = ["-march=native"]
    elif tier == "avx2":
        isa = ["-mavx2", "-mfma", "-mf16c"]
    elif tier == "portable" and machine() == "x86_64" and {"sse4_2", "ssse3", "popcnt"} <= cpu_features():
        isa = ["-march=x86-64-v2"]
    return BASE_FLAGS + isa + [f"-DEMB_TIER={TIER_CODES[tier]}"]


def _source_bytes() -> bytes:
    return b"\0".join((HERE / f).read_bytes() for f in SOURCES if (HERE / f).exists())


def _build(march: str | None = None, directory: Path | None = None, tier: str | None = None,
           cc: str | None = None) -> Path:
    cc = shutil.which(cc) if cc else _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc/clang) on PATH")
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    flags = tier_flags(tier, march)
    key = hashlib.sha256(b"\0".join([_source_bytes(), str(ABI).encode(), cc.encode(), ver.encode(),
                                     " ".join(flags).encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    name = f"pairwise-{tier or 'march'}-{key}.so"
    dirs = [directory] if directory else [cache_dir(), Path(tempfile.gettempdir()) / f"embdist-{os.getuid()}"]
    for d in dirs:                      # the cache, else a private temp dir (read-only home)
        so = d / name
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
    so = d / name
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
    "emb_tier": ([], ctypes.c_char_p),
    "emb_gram_shape": ([], ctypes.c_int),
    "emb_pack": ([_P, _I, _I, _I, _I, _P, _D, _P, _I, _I, _P], None),
    "emb_cheb_block": ([_P, _I, _I, _P, _I, _I, _I, _I, _P, _I], None),
    "emb_l1_block": ([_P, _I, _I, _P, _I, _I, _I, _I, _P, _I], None),
    "emb_euclid_block": ([_P, _I, _I, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _P, _P, _I], _I),
    "emb_snap_euclid": ([_P, _I, _I, _I, _I, _I, _I, _I, _I], None),
    "emb_snap_cheb": ([_P, _I, _I, _I, _I, _I, _I, _I, _I], None),
    "emb_hist_upper": ([_P, _I, _I, _I, _I, _I, _I, _I, _P, _P], None),
    "emb_col_sums": ([_P, _I, _I, _I, _I, _I, _P, _P, _P], None),
}


def build_and_open(march: str | None = None, directory: Path | None = None, tier: str | None = None,
                   cc: str | None = None):
    """Compile (or reuse from the cache) and open the library; raises on any failure.
    ``tier``: one of TIERS (its flags); None: ``-march=<march>`` and the compiler's target
    decides the tier.  ``cc``: a compiler to use instead of $CC / gcc / cc / clang."""
    lib = ctypes.CDLL(str(_build(march, directory, tier, cc)))
    for name, (args, res) in _SIGS.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res
    if lib.emb_abi() != ABI:
        raise RuntimeError(f"ABI mismatch: {lib.emb_abi()} != {ABI}")
    lib.embdist_tier = lib.emb_tier().decode()
    return lib


def _requested() -> str:
    if _choice is not None:
        return _choice
    if os.environ.get("EMBDIST_PAIRWISE_NATIVE", "1") == "0":
        return "torch"
    return check_choice(os.environ.get("EMBDIST_KERNELS", "auto").strip().lower() or "auto")


def load():
    """The loaded library (ctypes.CDLL) of the selected tier, or None when the torch path runs."""
    global _lib, _err, _tried, _active
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        want = _requested()                       # InputError for an unknown / unsupported tier
        _lib, _err, _active = None, None, "torch"
        if want == "torch":
            _err = "kernels=torch (EMBDIST_KERNELS / use_kernels / EMBDIST_PAIRWISE_NATIVE=0)"
        elif sys.platform == "win32":
            _err = "native kernels are built for POSIX systems only"
        else:
            march = os.environ.get("EMBDIST_PAIRWISE_MARCH") if want == "auto" else None
            order = [None] if march else (available_tiers() if want == "auto" else [want])
            errs = []
            for tier in order:
                try:
                    _lib = build_and_open(march=march, tier=tier)
                    _active = _lib.embdist_tier
                    break
                except Exception as e:  # noqa: BLE001 - any failure: next tier, else torch; say why
                    errs.append(f"{tier or 'march=' + march}: {type(e).__name__}: {e}")
            if _lib is None:
                _err = "; ".join(errs) or "no tier"
                log.warning("embdist.pairwise: native kernels unavailable (%s); using the torch fallback", _err)
            elif errs:
                log.warning("embdist.pairwise: using the %s kernels (%s)", _active, "; ".join(errs))
        _tried = True
        return _lib


def load_error() -> str | None:
    load()
    return _err


def use_kernels(name: str) -> str:
    """Select the kernel tier (auto, avx512, avx2, neon, portable, torch) for this process, before
    or after the first use; builds it now.  Returns the tier in use (``active_kernels()``):
    a tier that fails to build falls back (auto: the next tier down; forced: torch, warned).
    InputError (one line) for an unknown name or a tier this CPU lacks."""
    global _choice, _tried
    name = check_choice(str(name).strip().lower())
    with _lock:
        _choice = name
        _tried = False
        load()
        return _active


def active_kernels() -> str:
    """The tier in use: 'avx512', 'avx2', 'neon', 'portable' or 'torch' (loads on first call)."""
    load()
    return _active
