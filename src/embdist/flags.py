"""Per-token flags of the survey: tokenizer reachability and magikarp's under-trained indicator.

* :func:`reachable` - can any text produce the id?  The literal test of seed 1.8d:
  ``encode(decode([id]), add_special_tokens=False) == [id]`` (without the tokenizer's padding
  or truncation).  A row that no text yields
  (a byte-level piece that is half a character, a ``[unused*]`` placeholder, a WordPiece
  ``##`` continuation on its own, padding beyond the tokenizer) is a candidate for never having
  been trained.  Batched through the Rust tokenizer: the whole Qwen vocabulary in seconds.
* :func:`magikarp_indicator` - Land & Bartolo 2024 ("Fishing for Magikarp"), for the
  unembedding: remove the first principal component of the matrix from every row, then the
  cosine distance of each row to the mean of reference rows known to be untrained (rows beyond
  the tokenizer, ``[unused*]`` tokens, ids the user lists).  Small = looks untrained.
"""
from __future__ import annotations

import numpy as np
import torch

_CHUNK = 8192


def reachable(tokenizer, ids) -> np.ndarray:
    """Boolean per id: encode(decode(id)) gives back exactly [id] (no special tokens added).
    Ids beyond the tokenizer are False."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros(len(ids), dtype=bool)
    if tokenizer is None or len(ids) == 0:
        return out
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer = plain(tokenizer)
    known = np.flatnonzero(ids < size)
    for s in range(0, len(known), _CHUNK):
        pos = known[s:s + _CHUNK]
        batch = [[int(i)] for i in ids[pos]]
        texts = tokenizer.decode_batch(batch, skip_special_tokens=False)
        enc = tokenizer.encode_batch(texts, add_special_tokens=False)
        out[pos] = [e.ids == b for e, b in zip(enc, batch)]
    return out


def plain(tokenizer):
    """A copy without the padding and truncation a tokenizer.json may carry (MiniLM's pads every
    encoding to 128 ids): reachability asks what the text itself encodes to."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(tokenizer.to_str())
    t.no_padding()
    t.no_truncation()
    return t


def magikarp_indicator(w: torch.Tensor, reference: np.ndarray, first_pc: torch.Tensor) -> np.ndarray:
    """Cosine distance (float64) of every row of w, its first-PC component removed, to the mean
    of the reference rows (likewise reduced). ``first_pc`` is the unit first principal
    component (``geometry.pc_vector(pca, 1)``). NaN everywhere when there is no reference row."""
    n = w.shape[0]
    reference = np.asarray(reference, dtype=np.int64)
    if len(reference) == 0:
        return np.full(n, np.nan)
    v = first_pc.to(torch.float64)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return x - (x @ v)[:, None] * v[None, :]

    mean = reduce(w[torch.from_numpy(reference)]).mean(0)
    mean_norm = mean.norm()
    out = np.empty(n)
    for s in range(0, n, _CHUNK):
        x = reduce(w[s:s + _CHUNK])
        norms = x.norm(dim=1) * mean_norm
        cos = torch.where(norms > 0, (x @ mean) / torch.where(norms > 0, norms, 1.0), 0.0)
        out[s:s + _CHUNK] = (1.0 - cos).numpy()
    return out
