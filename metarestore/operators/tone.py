"""Colour/tone identification: a per-channel monotone curve followed by a 3x3 colour matrix and an
offset, fitted from the support pairs *in the restoring direction* (degraded -> clean).

A tone curve and a colour matrix are invertible when the curve is monotone and the matrix regular, so
fitting the inverse map directly gives the restoration without a numerically fragile inversion; the
residual of that fit says how well the pairs obey such a model at all. The fit alternates: the matrix and
offset by least squares given the curves, then each curve by isotonic regression (pool adjacent
violators, numpy) of what the matrix needs to see, stored as a lookup table on a fixed grid. The fit is
the ``tone`` operator (path ``tone``); having no forward model, it only restores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metarestore.operators.base import Operator, register_operator, stored

KNOTS = 65


def isotonic(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Non-decreasing least-squares fit of ``y`` ordered by ``x`` (pool adjacent violators); returns the
    fitted value of every sample."""
    order = np.argsort(x, kind="stable")
    ys = y[order].astype(np.float64)
    ws = np.ones_like(ys) if weight is None else weight[order].astype(np.float64)
    means, weights, counts = [], [], []
    for value, wt in zip(ys, ws, strict=True):
        means.append(value)
        weights.append(wt)
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, n2 = means.pop(), weights.pop(), counts.pop()
            total = weights[-1] + w2
            means[-1] = (means[-1] * weights[-1] + m2 * w2) / total
            weights[-1] = total
            counts[-1] += n2
    fitted = np.repeat(np.asarray(means), counts)
    out = np.empty_like(fitted)
    out[order] = fitted
    return out


def _curve_table(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """A monotone lookup table on ``KNOTS`` grid points in [0, 1] for the map values -> targets: the
    samples are binned on the grid (bin means keep PAV small), fitted isotonically, interpolated."""
    grid = np.linspace(0.0, 1.0, KNOTS)
    bins = np.clip(np.rint(values * (KNOTS - 1)).astype(int), 0, KNOTS - 1)
    counts = np.bincount(bins, minlength=KNOTS).astype(np.float64)
    sums = np.bincount(bins, weights=targets, minlength=KNOTS)
    used = counts > 0
    fitted = isotonic(grid[used], sums[used] / counts[used], counts[used])
    if used.sum() == 1:
        return np.full(KNOTS, fitted[0]) + (grid - grid[used][0])
    return np.interp(grid, grid[used], fitted)


def apply_curves(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Per-channel piecewise-linear lookup of (B, C, H, W) values in [0, 1] through (C, KNOTS) tables."""
    pos = x.clamp(0, 1).to(torch.float64) * (tables.shape[-1] - 1)
    lo = pos.floor().long().clamp(max=tables.shape[-1] - 2)
    frac = pos - lo
    out = torch.empty_like(pos)
    for c in range(x.shape[1]):
        t = tables[c].to(x.device, torch.float64)
        out[:, c] = t[lo[:, c]] * (1 - frac[:, c]) + t[lo[:, c] + 1] * frac[:, c]
    return out.to(x.dtype)


@register_operator("tone")
@dataclass
class ToneFit(Operator):
    curves: torch.Tensor  # (C, KNOTS) monotone lookup tables, degraded value -> linearised value
    matrix: torch.Tensor  # (C, C)
    offset: torch.Tensor  # (C,)
    residual: float  # relative RMS misfit of the restoring map on the support pairs

    pre_steps = ("tone",)

    @classmethod
    def fit(cls, clean: torch.Tensor, degraded: torch.Tensor) -> ToneFit:
        return fit_tone(clean, degraded)

    def restore(self, degraded: torch.Tensor, path=None, learner=None) -> torch.Tensor:
        """The clean image the tone model predicts from a degraded one (B, C, H, W)."""
        u = apply_curves(degraded, self.curves).to(torch.float64)
        out = torch.einsum("ij,bjhw->bihw", self.matrix.to(u.device, torch.float64), u)
        out = out + self.offset.to(u.device, torch.float64)[None, :, None, None]
        return out.to(degraded.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"tone.{n}": stored(getattr(self, n)) for n in ("curves", "matrix", "offset")}

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], header: dict, residual: float, learner) -> ToneFit | None:
        if "tone.curves" not in tensors:
            return None
        curves, matrix, offset = (tensors.get(f"tone.{n}") for n in ("curves", "matrix", "offset"))
        if matrix is None or offset is None or curves.shape[-1] != KNOTS or \
                matrix.shape != (curves.shape[0], curves.shape[0]) or offset.shape != (curves.shape[0],):
            raise ValueError("bad tone model tensors")
        return cls(curves.double(), matrix.double(), offset.double(), residual)


def _affine_fit(u: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``y ~= M @ u + b`` for (C, N) ``u`` and ``y``: the minimum-norm solution of the
    (C+1)-unknown normal equations (pinv(D^T D) D^T y = pinv(D) y, as a least-squares solver gives), with
    the N-long products in torch, which runs with the caller's torch threads (a LAPACK solve of the tall
    system runs on numpy's BLAS threads, which spin against a busy machine: 4x the CPU time)."""
    design = torch.cat([torch.from_numpy(u), torch.ones(1, u.shape[1], dtype=torch.float64)])  # (C+1, N)
    gram = design @ design.T
    coef = torch.linalg.pinv(gram, hermitian=True) @ (design @ torch.from_numpy(y).T)  # (C+1, C)
    channels = u.shape[0]
    return coef[:channels].T.numpy(), coef[channels].numpy()


def fit_tone(clean: torch.Tensor, degraded: torch.Tensor, rounds: int = 4, curves: bool = True) -> ToneFit:
    """Fit ``clean ~= M @ curve(degraded) + b``; ``curves=False`` keeps the curves at the identity
    (a pure affine colour model)."""
    channels = clean.shape[1]
    y = clean.permute(1, 0, 2, 3).reshape(channels, -1).double().cpu().numpy()  # targets (C, N)
    x = degraded.permute(1, 0, 2, 3).reshape(channels, -1).double().cpu().numpy()
    grid = np.linspace(0.0, 1.0, KNOTS)
    tables = np.tile(grid, (channels, 1))
    for _ in range(rounds if curves else 1):
        u = np.stack([np.interp(x[c], grid, tables[c]) for c in range(channels)])
        matrix, offset = _affine_fit(u, y)
        if not curves:
            break
        # what the curves should output so that the matrix lands on the clean values
        wanted = (torch.linalg.pinv(torch.from_numpy(matrix)) @ torch.from_numpy(y - offset[:, None])).numpy()
        tables = np.stack([_curve_table(np.clip(x[c], 0, 1), wanted[c]) for c in range(channels)])
    u = np.stack([np.interp(x[c], grid, tables[c]) for c in range(channels)])
    matrix, offset = _affine_fit(u, y)
    pred = (torch.from_numpy(matrix) @ torch.from_numpy(u)).numpy() + offset[:, None]
    spread = max(float(np.sqrt(((y - y.mean(axis=1, keepdims=True)) ** 2).mean())), 1e-12)
    residual = float(np.sqrt(((pred - y) ** 2).mean())) / spread
    return ToneFit(torch.from_numpy(tables), torch.from_numpy(matrix), torch.from_numpy(offset), residual)
