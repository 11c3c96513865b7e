"""The sphere under the PCA sky: unit vectors, a Fibonacci lattice, cap and box areas, the
smooth background intensity of token directions (a log-linear spherical-harmonic model fitted
by Poisson maximum likelihood) and the Poisson significance.  Used by ``embdist.regions``,
whose docstring says why these choices.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import gammainc
from scipy.stats import norm

GOLDEN = math.pi * (3.0 - math.sqrt(5.0))
_QUAD = 20_000  # Fibonacci quadrature points for the background fit


# ------------------------------------------------------------------------------ sphere tools

def unit_vectors(lat, lon) -> np.ndarray:
    la, lo = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    c = np.cos(la)
    return np.stack([c * np.cos(lo), c * np.sin(lo), np.sin(la)], axis=-1)


def lat_lon(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.degrees(np.arcsin(np.clip(u[..., 2], -1, 1))), np.degrees(np.arctan2(u[..., 1], u[..., 0]))


def fibonacci_sphere(n: int) -> np.ndarray:
    """n quasi-uniform unit vectors (spherical Fibonacci lattice: equal area per point)."""
    i = np.arange(n, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    rho = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * GOLDEN
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def chord(theta_deg: float) -> float:
    """Straight-line distance between unit vectors theta degrees apart."""
    return 2.0 * math.sin(math.radians(theta_deg) / 2.0)


def cap_area(theta_deg: float) -> float:
    return 2.0 * math.pi * (1.0 - math.cos(math.radians(theta_deg)))


def box_area(box: dict) -> float:
    """Solid angle of a lat/lon box (steradians), wrapping boxes included."""
    dlon = box["lon_max"] - box["lon_min"]
    if dlon < 0:
        dlon += 360.0
    return math.radians(dlon) * (math.sin(math.radians(box["lat_max"])) - math.sin(math.radians(box["lat_min"])))


def in_box(lat, lon, r, box: dict) -> np.ndarray:
    """numpy twin of ``embdist.geometry.in_box`` (inclusive; lon_min > lon_max wraps)."""
    lat, lon, r = (np.asarray(v) for v in (lat, lon, r))
    if box["lon_min"] <= box["lon_max"]:
        lon_ok = (lon >= box["lon_min"]) & (lon <= box["lon_max"])
    else:
        lon_ok = (lon >= box["lon_min"]) | (lon <= box["lon_max"])
    return (lat >= box["lat_min"]) & (lat <= box["lat_max"]) & lon_ok & (r >= box["r_min"]) & (r <= box["r_max"])


# -------------------------------------------------------------------------- background model

def _monomials(u: np.ndarray, degree: int) -> np.ndarray:
    """Homogeneous monomials of degree L and L-1 in (x, y, z): on the sphere they span every
    spherical harmonic of degree <= L, (L+1)^2 functions."""
    pw = [np.ones((3, len(u)))]
    ut = np.ascontiguousarray(u.T)
    for _ in range(degree):
        pw.append(pw[-1] * ut)
    terms = [(a, b, d - a - b) for d in (degree, degree - 1) if d >= 0
             for a in range(d + 1) for b in range(d - a + 1)]
    out = np.empty((len(u), len(terms)))
    for k, (a, b, c) in enumerate(terms):
        np.multiply(pw[a][0], pw[b][1], out=out[:, k])
        out[:, k] *= pw[c][2]
    return out


class Background:
    """Smooth intensity f(u) (tokens per steradian) on the sphere, fitted by Poisson ML."""

    def __init__(self, degree: int = 6, quad: int = _QUAD, ridge: float = 1e-3):
        self.degree = degree
        self.ridge = ridge
        self.q = fibonacci_sphere(quad)
        m = _monomials(self.q, degree)
        # Orthonormal basis on the quadrature (mean of B_j B_k = delta_jk): Newton is well conditioned.
        r = np.linalg.cholesky(m.T @ m / len(self.q)).T
        self.rinv = np.linalg.inv(r)
        self.coef = np.zeros(m.shape[1])

    def basis(self, u: np.ndarray) -> np.ndarray:
        return _monomials(u, self.degree) @ self.rinv

    def fit(self, u: np.ndarray, masked_centres: list[tuple[np.ndarray, float]] = ()) -> "Background":
        """Maximise sum_i log f(u_i) - integral of f over the unmasked sphere."""
        keep_d = np.ones(len(u), bool)
        keep_q = np.ones(len(self.q), bool)
        for c, theta in masked_centres:
            cc = math.cos(math.radians(theta))
            keep_d &= u @ c < cc
            keep_q &= self.q @ c < cc
        bd = self.basis(u[keep_d]).sum(0)
        bq = self.basis(self.q[keep_q])
        w = 4.0 * math.pi / len(self.q)
        area = w * keep_q.sum()
        # Start from the uniform intensity: the constant 1 lies in the span, and the basis is
        # orthonormal under the quadrature mean, so its coefficients are the means of B_k.
        const = self.basis(self.q).mean(0)
        a = const * math.log(max(keep_d.sum(), 1) / area)
        # Ridge on the non-constant part (lam = ridge x tokens): on an ordinary sky the
        # coefficients are O(1) and move by ~ridge; on a sky crowded into a few degrees the
        # unpenalised optimum needs a log-intensity range of thousands (overflow, a meaningless
        # background) and the ridge keeps it finite.
        proj = np.eye(len(a)) - np.outer(const, const) / float(const @ const)
        lam = self.ridge * max(int(keep_d.sum()), 1)

        def loglik(a):
            t = bq @ a
            if t.max() > 700:
                return -math.inf
            pa = proj @ a
            return float(bd @ a - w * np.exp(t).sum() - 0.5 * lam * pa @ pa)

        ll = loglik(a)
        for _ in range(60):
            f = w * np.exp(np.clip(bq @ a, -700, 700))
            g = bd - bq.T @ f - lam * (proj @ a)
            h = (bq * f[:, None]).T @ bq + lam * proj + 1e-9 * np.eye(len(a))
            step = np.linalg.solve(h, g)
            t = 1.0
            while t > 1e-6:
                new = loglik(a + t * step)
                if new >= ll - 1e-12:
                    break
                t /= 2
            else:  # no step improves the likelihood: at the optimum to rounding
                break
            a, gain, ll = a + t * step, new - ll, new
            if abs(gain) < 1e-7 * max(1.0, abs(ll)) or float(g @ step) < 1e-6:
                break
        self.coef = a
        return self

    def intensity(self, u: np.ndarray) -> np.ndarray:
        out = np.empty(len(u))
        for s in range(0, len(u), 65536):
            out[s:s + 65536] = np.exp(np.clip(self.basis(u[s:s + 65536]) @ self.coef, -700, 700))
        return out

    def in_caps(self, centres: np.ndarray, theta_deg: float) -> np.ndarray:
        """Expected tokens in caps of radius theta around centres: area x mean intensity,
        the mean from 4 points on the ring at theta / sqrt(2) (exact for cubics)."""
        rho = math.radians(theta_deg) / math.sqrt(2.0)
        e1, e2 = _tangent_frame(centres)
        total = np.zeros(len(centres))
        for d in (e1, e2, -e1, -e2):
            total += self.intensity(math.cos(rho) * centres + math.sin(rho) * d)
        return cap_area(theta_deg) * total / 4

    def in_box(self, box: dict, n: int = 96) -> float:
        """Expected tokens in a lat/lon box (midpoint rule on an n x n grid, area element cos lat)."""
        lo0, lo1 = box["lon_min"], box["lon_max"]
        if lo1 < lo0:
            lo1 += 360.0
        lat_e = np.radians(np.linspace(box["lat_min"], box["lat_max"], n + 1))
        lon_e = np.linspace(lo0, lo1, n + 1)
        lat_c = 0.5 * (lat_e[1:] + lat_e[:-1])
        lon_c = 0.5 * (lon_e[1:] + lon_e[:-1])
        dA = np.outer(np.sin(lat_e[1:]) - np.sin(lat_e[:-1]), np.full(n, math.radians(lo1 - lo0) / n))
        la, lo = np.meshgrid(np.degrees(lat_c), lon_c, indexing="ij")
        f = self.intensity(unit_vectors(la.ravel(), lo.ravel())).reshape(n, n)
        return float((f * dA).sum())


def _tangent_frame(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.where(np.abs(c[:, 2:3]) < 0.9, np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0]]))
    e1 = np.cross(c, ref)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    return e1, np.cross(c, e1)


# ------------------------------------------------------------------------------ significance

def poisson_significance(n, b) -> np.ndarray:
    """One-sided Gaussian sigma of P(N >= n | Poisson mean b); 0 where n <= b."""
    n = np.asarray(n, np.float64)
    b = np.maximum(np.asarray(b, np.float64), 1e-300)
    n, b = np.broadcast_arrays(n, b)
    out = np.zeros(n.shape)
    up = n > b
    if not up.any():
        return out
    nn, bb = n[up], b[up]
    p = gammainc(nn, bb)  # regularized lower incomplete gamma P(n, b) = P(N >= n) for integer n >= 1
    z = norm.isf(p)
    lr = np.sqrt(2.0 * (nn * np.log(nn / bb) - nn + bb))
    tiny = ~(p > 1e-290) | ~np.isfinite(z)
    z[tiny] = lr[tiny]
    out[up] = np.maximum(z, 0.0)
    return out
