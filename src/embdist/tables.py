"""Small tables (CSV) written beside the run's outputs, atomically."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

from embdist.atomic import atomic_path


def write_csv(path: Path, columns: Mapping[str, Sequence]) -> Path:
    """Columns of equal length -> CSV with a header row; temporary name, renamed when complete."""
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns of unequal length: { {k: len(v) for k, v in columns.items()} }")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(columns.keys())
            w.writerows(zip(*columns.values()))
    return Path(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
