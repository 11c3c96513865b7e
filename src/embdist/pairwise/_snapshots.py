"""Distances within every snapshot of a (T, V, D) history (seed 08.4b), per metric the contract
of ``pairwise``; on the native CPU path Euclidean and Chebyshev in one fused pass."""
from __future__ import annotations

import mmap as _mmap
import os

import torch

from . import _common as C
from . import _generic
from ._common import native_lib as _native_lib, progress_bar as _bar


_SNAP_NATIVE = ("euclidean", "sqeuclidean", "chebyshev")
_THP_MIN_BYTES = 8 << 20


def _snap_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A fresh snapshot output: ``torch.empty``, or with EMBDIST_SNAPSHOT_THP=1 (Linux) anonymous
    memory advised for transparent huge pages.  Huge pages make the first touch of memory the
    process recycles ~5x cheaper (0.03 s instead of ~0.16-0.35 s per 656 MB), but on this
    project's VMs (memory lent lazily by the host, free blocks handed back to it) a fresh huge
    page costs far more than fresh 4 KiB pages (1.1-2.4 s per 656 MB measured), so they are
    opt-in.  The mapping belongs to the tensor and is unmapped when it is freed."""
    n = 1
    for k in shape:
        n *= int(k)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if (nbytes >= _THP_MIN_BYTES and hasattr(_mmap, "MADV_HUGEPAGE")
            and os.environ.get("EMBDIST_SNAPSHOT_THP", "0") == "1"):
        try:
            m = _mmap.mmap(-1, nbytes, flags=_mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS)
            m.madvise(_mmap.MADV_HUGEPAGE)
            return torch.frombuffer(m, dtype=dtype).view(shape)
        except (OSError, ValueError, AttributeError, RuntimeError):
            pass
    return torch.empty(shape, dtype=dtype)


def _prepare_snap_outs(out, metrics, shape, out_dtype, history) -> dict[str, torch.Tensor]:
    """The caller's output tensors (checked: one per metric, shape, dtype, CPU, contiguous, not
    overlapping one another or the history), or fresh ones."""
    if out is None:
        return {m: _snap_empty(shape, out_dtype) for m in metrics}
    if not isinstance(out, dict) or set(out) != set(metrics):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise ValueError(f"out must be a dict with one tensor per metric {metrics}, got {got}")
    seen = {}
    if history.device.type == "cpu" and history.numel():
        st = history.untyped_storage()
        seen["the history"] = (st.data_ptr(), st.data_ptr() + st.nbytes())
    for m in metrics:
        o = out[m]
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"out[{m!r}] must be a torch.Tensor, got {type(o).__name__}")
        if (tuple(o.shape) != tuple(shape) or o.dtype != out_dtype or o.device.type != "cpu"
                or not o.is_contiguous()):
            raise ValueError(f"out[{m!r}] must be a contiguous {out_dtype} CPU tensor of shape {tuple(shape)} "
                             f"(pass out_dtype= to match it), got {o.dtype} {tuple(o.shape)} on {o.device}"
                             + ("" if o.is_contiguous() else ", not contiguous"))
        lo, hi = o.data_ptr(), o.data_ptr() + o.numel() * o.element_size()
        for other, (a, b) in seen.items():
            if o.numel() and lo < b and a < hi:
                raise ValueError(f"out[{m!r}] overlaps {other}; give each output its own memory")
        seen[f"out[{m!r}]"] = (lo, hi)
    return {m: out[m] for m in metrics}


def pairwise_snapshots_multi(history: torch.Tensor, metrics, *, out_dtype: torch.dtype = torch.float32,
                             device: str = "auto", out: dict[str, torch.Tensor] | None = None,
                             progress: bool = False) -> dict[str, torch.Tensor]:
    """{metric: (T, V, V) distances} for each snapshot of history (T, V, D), per metric the same
    contract as ``pairwise``.  On the native CPU path Euclidean (or squared) and Chebyshev are
    computed in one pass over each snapshot, so asking for both costs little more than one.
    ``out``: {metric: contiguous (T, V, V) CPU tensor of out_dtype} to fill instead of fresh
    tensors (reused buffers skip the first touch of new pages; memory-mapped files work)."""
    if isinstance(metrics, str) or not hasattr(metrics, "__iter__"):
        raise TypeError(f"metrics must be a list of metric names, got {metrics!r}")
    metrics = list(dict.fromkeys(metrics))
    if not metrics:
        raise ValueError("metrics must name at least one metric")
    for m in metrics:
        C.check_metric(m)
    C.check_input(history, 3, "history")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
    dev = C.resolve_device(device)
    C.check_device_available(dev)
    t, v, dd = history.shape
    outs = _prepare_snap_outs(out, metrics, (t, v, v), out_dtype, history)
    fresh = out is None          # fresh pages: plain stores; reused buffers: streaming stores
    if t == 0 or v == 0:
        return outs
    if dd == 0:                  # every row is the empty vector: all identical
        for o in outs.values():
            o.zero_()
        return outs
    lib = _native_lib(dev)
    native = [m for m in metrics if m in _SNAP_NATIVE] if lib is not None else []
    e_like = [m for m in native if m != "chebyshev"]
    passes = [(m, "chebyshev" in native and k == 0) for k, m in enumerate(e_like)]   # (euclid-like, cheb)
    if not e_like and "chebyshev" in native:
        passes = [(None, True)]
    generic = [m for m in metrics if m not in native]
    with _bar(progress, t * (len(passes) + len(generic)), f"snapshots {'+'.join(metrics)}") as bar:
        if passes:
            from . import _cpu
            hc = history.detach().to("cpu").contiguous()     # read in its own dtype by the kernels
            for em, ch in passes:
                kw = dict(squared=em == "sqeuclidean", bar=bar, fresh=fresh)
                if out_dtype in _cpu.SNAP_OUT_DTYPES:          # written in out_dtype by the kernels
                    _cpu.snapshots(lib, hc, 0, t, out_e=outs[em] if em else None,
                                   out_c=outs["chebyshev"] if ch else None, **kw)
                    continue
                step = max(1, min(t, (64 << 20) // max(1, 4 * v * v)))
                names = [m for m in (em, "chebyshev" if ch else None) if m]
                tmp = {m: torch.empty((min(step, t), v, v), dtype=torch.float32) for m in names}
                for s in range(0, t, step):
                    e = min(t, s + step)
                    _cpu.snapshots(lib, hc, s, e, out_e=tmp[em][: e - s] if em else None,
                                   out_c=tmp["chebyshev"][: e - s] if ch else None, **{**kw, "fresh": s == 0})
                    for m, buf in tmp.items():
                        part = buf[: e - s]
                        outs[m][s:e] = C.to_dtype_keep_nonzero(part, part != 0, out_dtype)
        if generic:
            h32 = C.to_f32_cpu(history)
            for m in generic:
                _generic.snapshots(h32, outs[m], dev, m, bar)
    return outs


def pairwise_snapshots(history: torch.Tensor, metric: str, *, out_dtype: torch.dtype = torch.float32,
                       device: str = "auto", out: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    C.check_metric(metric)
    return pairwise_snapshots_multi(history, [metric], out_dtype=out_dtype, device=device,
                                    out=None if out is None else {metric: out}, progress=progress)[metric]
