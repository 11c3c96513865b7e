"""ctypes bindings of the streaming kernels (kernels_stream.c) and small shared helpers."""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

from embdist.errors import InputError

from .. import _common as C
from .. import _cpu, _native

STREAM_METRICS = ("euclidean", "chebyshev")
DT_CODES = C.DTYPE_CODES


class _State(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("K", ctypes.c_int64),
                ("hq", ctypes.c_void_p), ("hid", ctypes.c_void_p), ("hex", ctypes.c_void_p),
                ("hcnt", ctypes.c_void_p), ("hthr", ctypes.c_void_p), ("minap", ctypes.c_void_p),
                ("nd", ctypes.c_void_p), ("nd_len", ctypes.c_int64), ("nd_cap", ctypes.c_int64),
                ("mxp", ctypes.c_void_p), ("mxq", ctypes.c_void_p), ("mx_len", ctypes.c_int64),
                ("mx_cap", ctypes.c_int64), ("lock", ctypes.c_int), ("locks", ctypes.c_void_p)]


_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_SP = ctypes.POINTER(_State)
_SIGS = {
    "emb_stream_extent": [_P, _I, _I, _I, _P, _I, _I, _P],
    "emb_stream_nd_bound": [_P, _I, _I, _I, _I, _I, _I, _I, _P],
    "emb_stream_within_steps": [_P, _I, _I, _P, _P, _I, _I, _P],
    "emb_stream_exact": [_P, _I, _I, _I, _P, _P, _I, _P],
    "emb_stream_row_exact": [_P, _I, _I, _I, _I, _P, _I, _P],
    "emb_stream_absorb": [_SP, _P, _P, _P, _P, _P, _I, _I],
    "emb_stream_free": [_SP],
    "emb_stream_euclid_item": [_SP, _P, _I, _I, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P,
                               _P, _P, _P, _P],
    "emb_stream_cheb_item": [_SP, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P],
}
_lib_lock = threading.Lock()


def _lib():
    """The native library with the stream signatures set; InputError (the user's to fix: a C
    compiler, or a kernel tier other than torch) if it cannot be built."""
    lib = _native.load()
    if lib is None:
        raise InputError("whole-matrix streaming (task=vocab, and the dynamics' components of a large "
                         f"vocabulary) needs the native CPU kernels: {_native.load_error()}; install a C "
                         "compiler (cc) or choose task.kernels=auto")
    with _lib_lock:
        if not getattr(lib, "_embdist_stream", False):
            for name, args in _SIGS.items():
                f = getattr(lib, name)
                f.argtypes = args
                f.restype = None
            lib._embdist_stream = True
    return lib


def _ptr(a) -> int | None:
    if a is None:
        return None
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def _check_x(x) -> torch.Tensor:
    C.check_input(x, 2, "x")
    if x.device.type != "cpu":
        x = x.detach().to("cpu")
    return x.detach().contiguous()


_chunks = _cpu.prep_chunks

