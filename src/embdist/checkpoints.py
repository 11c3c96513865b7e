"""A training run published as a series of checkpoints, read one at a time.

``history.checkpoints`` is one of:

* a glob (``/runs/pythia-70m/step*``), or a list of globs / paths, of Hugging Face checkpoint
  folders (``model.safetensors``, or shards with ``model.safetensors.index.json``) or
  ``.safetensors`` files; the step of each is parsed from its path: the last path component
  that names one, as ``step1000``, ``step_1000``, ``checkpoint-1000``, ``revision=step1000``,
  ``global_step1000``, ``iter_1000`` (case-insensitive);
* a list of ``[step, path]`` pairs.

Each checkpoint is read with ``sources.load_matrix`` (only the one tensor: ``model.tensor``, or
``lm_head.weight`` and the tied-embedding fallbacks), in step order, one at a time.
"""
from __future__ import annotations

import glob
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from embdist import sources
from embdist.errors import InputError

log = logging.getLogger(__name__)

_STEP = re.compile(r"(?:^|[^a-z0-9])(?:global_?)?(?:step|checkpoint|ckpt|iter|iteration)[-_=]?(\d+)(?![0-9])",
                   re.IGNORECASE)


def parse_step(path: str | Path) -> int:
    """The training step a checkpoint's path names (its last path component that names one)."""
    for part in reversed(Path(path).parts):
        found = _STEP.findall(Path(part).stem if part.endswith(".safetensors") else part)
        if found:
            return int(found[-1])
    raise InputError(f"cannot tell the training step of checkpoint {str(path)!r} from its name (e.g. step1000, "
                     "checkpoint-1000); give history.checkpoints as [step, path] pairs")


def _expand(item: str) -> list[Path]:
    if any(ch in item for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(item))
        if not found:
            raise InputError(f"history.checkpoints pattern {item!r} matches nothing")
        return found
    p = Path(item)
    if not p.exists():
        raise InputError(f"checkpoint {item!r} does not exist; set history.checkpoints to folders or .safetensors files")
    return [p]


def resolve(spec) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of a ``history.checkpoints`` value, in step order."""
    if spec is None:
        raise InputError("history.checkpoints is empty")
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[tuple[int, Path]] = []
    for item in items:
        if isinstance(item, (list, tuple)) or (hasattr(item, "__len__") and not isinstance(item, (str, Path))):
            pair = list(item)
            if len(pair) != 2:
                raise InputError(f"history.checkpoints entry {pair!r} is not a [step, path] pair")
            try:
                step = int(pair[0])
            except (TypeError, ValueError):
                raise InputError(f"history.checkpoints entry {pair!r}: the step {pair[0]!r} is not an integer") from None
            out.extend((step, p) for p in _expand(str(pair[1])))
        else:
            out.extend((parse_step(p), p) for p in _expand(str(item)))
    if not out:
        raise InputError("history.checkpoints names no checkpoint")
    out.sort(key=lambda sp: sp[0])
    steps = [s for s, _ in out]
    dup = sorted({s for s in steps if steps.count(s) > 1})
    if dup:
        clash = [str(p) for s, p in out if s == dup[0]]
        raise InputError(f"step {dup[0]} is named by more than one checkpoint ({', '.join(clash)}); keep one")
    return out


def read_series(entries: list[tuple[int, Path]], tensor: str | None = None) -> Iterator[tuple[int, sources.LoadedMatrix]]:
    """Each checkpoint's matrix in step order, one at a time; a shape differing from the first
    checkpoint's is an InputError naming the file."""
    first = None
    for step, path in entries:
        m = sources.load_matrix(path, tensor)
        shape = tuple(m.tensor.shape)
        if first is None:
            first = (shape, path, m.name)
        elif shape != first[0]:
            raise InputError(f"checkpoint {str(path)!r} (step {step}) holds {m.name} of shape {shape}, but the "
                             f"first checkpoint {str(first[1])!r} has {first[0]}; a series needs one shape")
        elif m.name != first[2]:
            log.warning("checkpoint %s (step %d) gives %s, the first gave %s", path, step, m.name, first[2])
        yield step, m
