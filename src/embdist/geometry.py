"""PCA, the signed basis, sky coordinates and the bounding box (seed 1.4b, cells 5-8).

Maths as in the seed: centre W, covariance = Wcᵀ Wc / N, ``eigh``, eigenpairs sorted by
descending eigenvalue. The basis vectors are principal components picked by signed 1-based
numbers; coordinates project the *uncentred* W (as the seed does): x = W·meridian,
y = W·equinox, z = W·north, r = |(x, y, z)|, lat = asin(z / r), lon = atan2(y, x), in degrees.

Sign convention. ``eigh`` returns each eigenvector with an arbitrary sign (it differs between
LAPACK builds, MPS and CUDA), which would mirror the sky and move a bounding box to another
region. embdist fixes it: every eigenvector is flipped so that its loading of largest absolute
value is positive (the rule of scikit-learn's ``svd_flip``). A basis number's sign then flips
that fixed vector, as in the seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Row chunk for the covariance: bounds the float64 copy to chunk × d values.
_COV_CHUNK = 8192


@dataclass(frozen=True)
class PCA:
    mean: torch.Tensor  # (d,) float64
    eigenvalues: torch.Tensor  # (d,) float64, descending
    eigenvectors: torch.Tensor  # (d, d) float64, column k = PC k+1, sign fixed


@dataclass(frozen=True)
class Sky:
    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    r: torch.Tensor
    lat: torch.Tensor  # degrees
    lon: torch.Tensor  # degrees


def pca(w: torch.Tensor) -> PCA:
    """PCA of the rows of w (any float dtype), accumulated in float64 over row chunks."""
    n, d = w.shape
    mean = torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, _COV_CHUNK):
        mean += w[i : i + _COV_CHUNK].to(torch.float64).sum(0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, _COV_CHUNK):
        c = w[i : i + _COV_CHUNK].to(torch.float64) - mean
        cov += c.T @ c
    cov /= n
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    return PCA(mean, evals, fix_signs(evecs))


def fix_signs(evecs: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest absolute value is positive."""
    idx = evecs.abs().argmax(dim=0)
    signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1])])
    signs[signs == 0] = 1
    return evecs * signs


def pc_vector(p: PCA, number: int) -> torch.Tensor:
    """Signed 1-based PC number -> unit vector (float64); -k is PC k reversed."""
    d = p.eigenvectors.shape[1]
    if number == 0 or abs(number) > d:
        raise ValueError(f"principal component number {number} is out of range; use ±1..±{d}")
    v = p.eigenvectors[:, abs(number) - 1]
    return -v if number < 0 else v


def sky_coordinates(w: torch.Tensor, north: torch.Tensor, meridian: torch.Tensor, equinox: torch.Tensor) -> Sky:
    """Spherical coordinates of every row of w in the (meridian, equinox, north) frame, float64."""
    basis = torch.stack([meridian, equinox, north], dim=1)  # (d, 3)
    xyz = torch.empty(w.shape[0], 3, dtype=torch.float64)
    for i in range(0, w.shape[0], _COV_CHUNK):
        xyz[i : i + _COV_CHUNK] = w[i : i + _COV_CHUNK].to(torch.float64) @ basis
    x, y, z = xyz.unbind(1)
    r = torch.sqrt(x**2 + y**2 + z**2)
    # r = 0 would give 0/0: the seed's clamp does not catch NaN, so such a row gets lat 0.
    ratio = torch.where(r > 0, z / torch.where(r > 0, r, 1.0), 0.0)
    lat = torch.rad2deg(torch.asin(torch.clamp(ratio, -1, 1)))
    lon = torch.rad2deg(torch.atan2(y, x))
    return Sky(x, y, z, r, lat, lon)


BOX_KEYS = ("lat_min", "lat_max", "lon_min", "lon_max", "r_min", "r_max")


def in_box(sky: Sky, lat_min: float, lat_max: float, lon_min: float, lon_max: float, r_min: float, r_max: float) -> torch.Tensor:
    """Boolean mask of rows inside the inclusive box (seed cell 8); lon_min > lon_max is a box
    through +/-180 degrees (lon >= lon_min or lon <= lon_max), as GeoJSON bounding boxes."""
    lon_ok = ((sky.lon >= lon_min) & (sky.lon <= lon_max) if lon_min <= lon_max
              else (sky.lon >= lon_min) | (sky.lon <= lon_max))
    return (sky.lat >= lat_min) & (sky.lat <= lat_max) & lon_ok & (sky.r >= r_min) & (sky.r <= r_max)


def nearest_wider_box(sky: Sky, box: dict, at_least: int = 2) -> tuple[dict, int]:
    """Grow a box step by step (5° in angle, 10 % in radius each side) until it holds
    ``at_least`` rows: what to suggest when a box selects too few tokens."""
    b = dict(box)
    for _ in range(72):
        b = {
            "lat_min": max(-90.0, b["lat_min"] - 5), "lat_max": min(90.0, b["lat_max"] + 5),
            "lon_min": max(-180.0, b["lon_min"] - 5), "lon_max": min(180.0, b["lon_max"] + 5),
            "r_min": max(0.0, b["r_min"] * 0.9), "r_max": b["r_max"] * 1.1,
        }
        n = int(in_box(sky, **b).sum())
        if n >= at_least:
            return b, n
    return b, int(in_box(sky, **b).sum())
