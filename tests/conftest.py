"""Shared fixtures: real subprocesses of `python -m embdist`, each in its own embdist home."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def bf16_round(a: np.ndarray) -> np.ndarray:
    """Values exactly representable in bf16 (so fp32 and float64 references see the same data)."""
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).float().numpy()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private embdist home: its own mlflow.db, outputs/ and data/."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("EMBDIST_HOME", str(h))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return h


def run_embdist(*args: str, home: Path, check: bool = True, env: dict | None = None, timeout: int = 600):
    e = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    e.update({"EMBDIST_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "embdist", *args], cwd=home, env=e, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"embdist {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


def client_for(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def runs_of(home: Path, experiment: str = "embdist"):
    c = client_for(home)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} not in {home / 'mlflow.db'}"
    return c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture
def planted_matrix(tmp_path) -> tuple[Path, np.ndarray, list[list[int]]]:
    """A real safetensors "checkpoint": 300 x 48 bf16 rows with planted duplicate groups and
    near-duplicates one bf16 step apart, stored under the tied-embedding name."""
    rng = np.random.default_rng(7)
    w = bf16_round(rng.normal(0, 0.05, (300, 48)))
    groups = [[3, 50, 51, 299], [10, 11], [100, 120, 140, 160, 180, 200]]
    for g in groups:
        w[g] = w[g[0]]
    t = torch.from_numpy(w[20].copy()).to(torch.bfloat16)
    bits = t.view(torch.int16).clone()
    bits[5] += 1  # one bf16 step in one coordinate
    w[21] = bits.view(torch.bfloat16).float().numpy()
    path = tmp_path / "planted.safetensors"
    save_file({"model.embed_tokens.weight": torch.from_numpy(w).to(torch.bfloat16),
               "model.norm.weight": torch.ones(48, dtype=torch.bfloat16)}, str(path))
    return path, w, groups


def numpy_sky(w: np.ndarray, north: int, meridian: int, equinox: int):
    """Independent float64 reference of the PCA sky: SVD of the centred matrix, the documented
    sign rule (largest |loading| positive), projection of the uncentred rows."""
    w = w.astype(np.float64)
    _, _, vt = np.linalg.svd(w - w.mean(0), full_matrices=False)
    v = vt.T
    v = v * np.sign(v[np.abs(v).argmax(0), np.arange(v.shape[1])])

    def pc(k):
        return np.sign(k) * v[:, abs(k) - 1]

    x, y, z = w @ pc(meridian), w @ pc(equinox), w @ pc(north)
    r = np.sqrt(x**2 + y**2 + z**2)
    return np.degrees(np.arcsin(np.clip(z / r, -1, 1))), np.degrees(np.arctan2(y, x)), r


def upper_stats(d: np.ndarray) -> dict:
    """float64 reference statistics over the strict upper triangle; median = lower median (torch's)."""
    v = np.sort(d[np.triu_indices(len(d), 1)].astype(np.float64))
    return {"n_pairs": len(v), "min": v[0], "median": v[(len(v) - 1) // 2], "mean": v.mean(), "max": v[-1],
            "zero_pairs": int((v == 0).sum())}


def assert_png(path: Path) -> None:
    """A real, decodable PNG that is not blank."""
    import matplotlib.image

    path = Path(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.02, f"{path} looks blank"
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20, f"{path} has too few colours"


@pytest.fixture(scope="session")
def toy_history(request) -> Path:
    """The bundled toy run (1,000 steps, seed 0: what task=snapshots trains by default), trained
    once and kept in pytest's cache folder, keyed by the trainer's source and text, so later
    sessions reuse it (about a minute to train)."""
    import hashlib

    from embdist import toymodel, toytrain

    key = hashlib.sha256(Path(toytrain.__file__).read_bytes() + Path(toymodel.__file__).read_bytes()
                         + toytrain.default_text_path().read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    folder = Path(request.config.cache.mkdir("embdist-toy-run"))
    path = folder / f"toy-1000-{key}.safetensors"
    if not path.is_file():
        toytrain.train_snapshots(path, steps=1000, seed=0, progress=False)
    return path


def wait_for_line(proc, text: str, timeout: float = 300, start: bool = False) -> str:
    """Read a child's merged output until a line holds ``text`` (``start``: begins with it);
    the output so far. A child that ends or a timeout: killed, AssertionError with the output."""
    import time
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if (line.startswith(text) if start else text in line):
            return seen
    proc.kill()
    raise AssertionError(f"never saw {text!r}:\n{seen}")
