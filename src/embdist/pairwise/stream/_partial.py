"""The partial result of a streaming pass: its format, shards, merge, save and load.

A partial holds every reduction of the pairs one shard saw; partials of disjoint shards merge
into exactly the partial one process would have produced (every reduction is a function of the
set of pairs seen), so a sharded run gives the single run's result bit for bit.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embdist import rows
from embdist.atomic import atomic_path

from .. import _common as C
from .. import _cpu
from ._bindings import _State, _chunks, _lib, _ptr

# |stored - exact| <= TOLQ * exact for an expansion (GEMM) value of d^2 that the engine's flag rule
# does not recompute: its bound E < 2 REL_TOL d^2 (GEMM) and the centring's (1 + CENTER_TOL)^2
# (3.0e-6 and 6.0e-7 with the engine's constants: 3.62e-6), with a 35% margin: 4.9e-6.
TOLQ = 1.35 * ((1 + 2 * C.REL_TOL / (1 - 2 * C.REL_TOL)) * (1 + C.CENTER_TOL) ** 2 - 1)
MAX_RADII = 8
MAX_NEAR_STEPS = 64
FORMAT = 2   # 2: row fingerprints from embdist.rows' hash
PW, MB, NB = _cpu.PW, _cpu.MB_PANELS, _cpu.NB_PANELS


def _fingerprint(x: torch.Tensor) -> str:
    """Identity of the input of a pass (shards must all see the same matrix): its row hashes."""
    m = hashlib.sha256(rows.hash_rows(rows.canonical_bits(x)).tobytes())
    m.update(f"{tuple(x.shape)} {x.dtype}".encode())
    return m.hexdigest()[:32]


# ----------------------------------------------------------------------------- work items and shards
def _items(n: int) -> list[tuple[int, int, int, int]]:
    return _cpu._items(n)


def _block_work(n: int) -> np.ndarray:
    npan = -(-n // PW)
    blocks = range(0, npan, MB)
    return np.array([min(MB, npan - b) * (npan - b) for b in blocks], dtype=np.float64)


def shard_rows(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows [r0, r1) of shard ``index`` of ``count``: contiguous row blocks of about equal work
    (pairs of the upper triangle).  A shard may be empty when count exceeds the row blocks."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    w = _block_work(n)
    if len(w) == 0:
        return 0, 0
    cum = np.concatenate(([0.0], np.cumsum(w)))
    total = cum[-1]
    # block b goes to the shard in which its work starts
    owner = np.minimum((cum[:-1] * count / total).astype(np.int64), count - 1)
    blocks = np.flatnonzero(owner == index)
    if len(blocks) == 0:
        return 0, 0
    step = MB * PW
    return int(blocks[0] * step), int(min(n, (blocks[-1] + 1) * step))


# ----------------------------------------------------------------------------- partial results
@dataclass
class StreamPartial:
    meta: dict
    shards: list
    groups: np.ndarray
    hq: np.ndarray
    hid: np.ndarray
    hex: np.ndarray
    hcnt: np.ndarray
    minap: np.ndarray
    hist: np.ndarray
    radius_counts: np.ndarray
    item_done: np.ndarray
    item_sum: np.ndarray
    mx: np.ndarray            # (m, 2) int64 pairs
    mxq: np.ndarray           # (m,) float64
    nd: np.ndarray            # (m, 2) int64 representative pairs, unique
    pairs: int = 0
    flagged: int = 0
    max_q: float = 0.0

    _ARRAYS = ("groups", "hq", "hid", "hex", "hcnt", "minap", "hist", "radius_counts", "item_done",
               "item_sum", "mx", "mxq", "nd")

    @property
    def complete(self) -> bool:
        return sorted(self.shards) == list(range(self.meta["shard_count"]))

    def to_arrays(self, prefix: str = "") -> dict:
        out = {prefix + k: getattr(self, k) for k in self._ARRAYS}
        info = dict(meta=self.meta, shards=self.shards, pairs=int(self.pairs), flagged=int(self.flagged),
                    max_q=float(self.max_q))
        out[prefix + "info"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "StreamPartial":
        info = json.loads(bytes(arrays[prefix + "info"]).decode())
        kw = {k: np.asarray(arrays[prefix + k]) for k in cls._ARRAYS}
        return cls(meta=info["meta"], shards=list(info["shards"]), pairs=int(info["pairs"]),
                   flagged=int(info["flagged"]), max_q=float(info["max_q"]), **kw)

    def save(self, path) -> Path:
        return save_partials(path, {"": self})

    @classmethod
    def load(cls, path) -> "StreamPartial":
        parts, _, _ = load_partials(path)
        return parts[""]

    @classmethod
    def merge(cls, parts) -> "StreamPartial":
        """Combine partials of disjoint shards of the same input and settings."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to merge")
        meta = parts[0].meta
        seen: set = set()
        for p in parts:
            if p.meta != meta:
                diff = sorted(k for k in set(meta) | set(p.meta) if meta.get(k) != p.meta.get(k))
                raise ValueError(f"partials disagree on {', '.join(diff)}; they are not shards of one run")
            if seen & set(p.shards):
                raise ValueError(f"shard(s) {sorted(seen & set(p.shards))} appear twice")
            seen |= set(p.shards)
        if len(parts) == 1:
            return parts[0]
        lib = _lib()
        n, K = meta["n"], meta["K"]
        acc = _empty_lists(n, K)
        st = _state(acc, n, K)
        try:
            for p in parts:
                _cpu.run_parallel(_chunks(n, 8192), lambda r, p=p: lib.emb_stream_absorb(
                    ctypes.byref(st), _ptr(p.hq), _ptr(p.hid), _ptr(p.hex), _ptr(p.hcnt), _ptr(p.minap),
                    r[0], r[1]))
        finally:
            lib.emb_stream_free(ctypes.byref(st))
        done = np.zeros_like(parts[0].item_done)
        sums = np.zeros_like(parts[0].item_sum)
        for p in parts:
            if (done & p.item_done).any():
                raise ValueError("two partials cover the same work items")
            done |= p.item_done
            sums[p.item_done] = p.item_sum[p.item_done]
        max_q = max(p.max_q for p in parts)
        mx = np.concatenate([p.mx for p in parts])
        mxq = np.concatenate([p.mxq for p in parts])
        mx, mxq = _max_band(mx, mxq, max_q)
        nd = np.concatenate([p.nd for p in parts])
        nd = np.unique(nd, axis=0) if len(nd) else nd.reshape(0, 2)
        return cls(meta=meta, shards=sorted(seen), groups=parts[0].groups, hq=acc["hq"], hid=acc["hid"],
                   hex=acc["hex"], hcnt=acc["hcnt"], minap=acc["minap"],
                   hist=np.sum([p.hist for p in parts], axis=0, dtype=np.int64),
                   radius_counts=np.sum([p.radius_counts for p in parts], axis=0, dtype=np.int64),
                   item_done=done, item_sum=sums, mx=mx, mxq=mxq, nd=nd,
                   pairs=sum(p.pairs for p in parts), flagged=sum(p.flagged for p in parts), max_q=max_q)



def save_partials(path, partials: dict, extra: dict | None = None, info: dict | None = None) -> Path:
    """Several partials (keyed, e.g. by metric) and extra arrays in one .npz, written atomically."""
    path = Path(path)
    arrays = {}
    for key, p in partials.items():
        arrays.update(p.to_arrays(f"p.{key}."))
    for k, v in (extra or {}).items():
        arrays[f"x.{k}"] = np.asarray(v)
    head = {"format": FORMAT, "partials": list(partials), "info": info or {}}
    arrays["head"] = np.frombuffer(json.dumps(head).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def load_partials(path) -> tuple[dict, dict, dict]:
    """(partials by key, extra arrays, info) from :func:`save_partials`."""
    with np.load(path, allow_pickle=False) as z:
        head = json.loads(bytes(z["head"]).decode())
        if head.get("format") != FORMAT:
            raise ValueError(f"{path}: partial format {head.get('format')} is not {FORMAT}")
        parts = {k: StreamPartial.from_arrays(z, f"p.{k}.") for k in head["partials"]}
        extra = {k[2:]: z[k] for k in z.files if k.startswith("x.")}
    return parts, extra, head["info"]


def _empty_lists(n: int, K: int) -> dict:
    return {"hq": np.full((n, K), np.inf), "hid": np.full((n, K), -1, dtype=np.int64),
            "hex": np.zeros((n, K), dtype=np.uint8), "hcnt": np.zeros(n, dtype=np.int64),
            "hthr": np.full(n, np.inf), "minap": np.full(n, np.inf),
            "locks": np.zeros(-(-n // PW) + 1, dtype=np.int32)}


def _state(acc: dict, n: int, K: int) -> _State:
    st = _State()
    st.n, st.K = n, K
    for k in ("hq", "hid", "hex", "hcnt", "hthr", "minap", "locks"):
        setattr(st, k, _ptr(acc[k]))
    return st


def _max_band(mx: np.ndarray, mxq: np.ndarray, max_q: float, tolq: float = TOLQ):
    keep = mxq >= max_q * (1.0 - 4.0 * tolq)
    return mx[keep].reshape(-1, 2), mxq[keep]


