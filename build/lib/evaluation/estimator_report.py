"""How well the degradation estimator knows what happened: its confusion matrix at severities 0.25 / 0.5 /
0.75 with clean photos included, how often it names a realistic chain exactly, and whether its
probabilities are calibrated (a family said present with p = 0.8 should be there 8 times in 10).

Rows are what happened; a single family's image is counted under the likeliest family the estimator finds
(``Estimate.present``: a group of alternatives by its members together), or ``clean`` when it finds none. The images are the registry's degradations
saved as 8-bit pixels (no file: a JPEG is judged from its pixels alone, the hard case).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from metarestore import degradations
from metarestore.degradations.base import cpu_generator, stable_seed
from metarestore.estimator import REALISTIC_CHAINS, Estimator
from metarestore.pixels import center_crop, quantize

SEVERITIES = (0.25, 0.5, 0.75)
CLEAN = "clean"


@dataclass
class Report:
    labels: list[str]
    matrices: dict[float, np.ndarray] = field(default_factory=dict)  # severity -> (rows, cols) counts
    chains: dict[str, tuple[int, int]] = field(default_factory=dict)  # chain -> (exact, total)
    calibration: list[tuple[float, float, int]] = field(default_factory=list)  # (mean p, frequency, count)

    @property
    def rows(self) -> list[str]:
        return [CLEAN, *self.labels]

    def accuracy(self, severity: float) -> float:
        m = self.matrices[severity]
        return float(np.trace(m) / m.sum())

    def clean_kept(self, severity: float) -> float:
        m = self.matrices[severity]
        return float(m[0, 0] / m[0].sum())

    def expected_calibration_error(self) -> float:
        total = sum(n for _, _, n in self.calibration)
        return sum(n * abs(p - f) for p, f, n in self.calibration) / max(1, total)

    def markdown(self, severity: float) -> str:
        m = self.matrices[severity]
        short = [r[:10] for r in self.rows]
        lines = ["| true \\ found | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
        for i, row in enumerate(self.rows):
            n = max(1, m[i].sum())
            lines.append(f"| {row} | " + " | ".join(
                (f"**{100 * m[i, j] / n:.0f}**" if i == j else (f"{100 * m[i, j] / n:.0f}" if m[i, j] else "."))
                for j in range(len(self.rows))) + " |")
        return "\n".join(lines)


def _verdict(estimate, labels: list[str]) -> int:
    """The row's column: the likeliest family the estimate finds (``Estimate.present``), or clean."""
    present = estimate.present
    if not present:
        return 0
    return 1 + labels.index(max(present, key=lambda f: estimate.probabilities[f]))


def run(estimator: Estimator, images: list[torch.Tensor], crop: int = 256, bins: int = 10) -> Report:
    """Every image (uint8 (3, H, W)), centre-cropped to ``crop``, clean and through every label at every
    severity (each with its own seed), and through every realistic chain at severity 0.5."""
    labels = list(estimator.labels)
    report = Report(labels)
    probs: list[float] = []
    truth: list[float] = []

    def judge(x: torch.Tensor, present: set[str]):
        est = estimator(x)
        probs.extend(est.probabilities[f] for f in labels)
        truth.extend(float(f in present) for f in labels)
        return est

    clean_verdicts: list[int] = []  # the clean photos once, counted in every severity's row
    for severity in SEVERITIES:
        m = np.zeros((len(labels) + 1, len(labels) + 1), dtype=int)
        for index, image in enumerate(images):
            x = center_crop(image, crop, crop)[None].float() / 255
            if severity == SEVERITIES[0]:
                clean_verdicts.append(_verdict(judge(x, set()), labels))
            m[0, clean_verdicts[index]] += 1
            for row, family in enumerate(labels, start=1):
                f = degradations.get(family)
                y = quantize(f(x, f.sample(severity, cpu_generator(stable_seed(family, severity, index)))))
                m[row, _verdict(judge(y, {family}), labels)] += 1
        report.matrices[severity] = m
    for chain in REALISTIC_CHAINS:
        name = "+".join(chain)
        exact = 0
        for index, image in enumerate(images):
            x = center_crop(image, crop, crop)[None].float() / 255
            f = degradations.get(name)
            y = quantize(f(x, f.sample(0.5, cpu_generator(stable_seed(name, index)))))
            est = judge(y, set(chain))
            exact += set(est.present) == set(chain)
        report.chains[name] = (exact, len(images))
    p, t = np.array(probs), np.array(truth)
    edges = np.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (p >= lo) & ((p < hi) | (hi == 1.0))
        if inside.any():
            report.calibration.append((float(p[inside].mean()), float(t[inside].mean()), int(inside.sum())))
    return report


def plot(report: Report, path) -> None:
    """The three confusion matrices side by side (row-normalised), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report.matrices), figsize=(6 * len(report.matrices), 5.6))
    for ax, (severity, m) in zip(np.atleast_1d(axes), report.matrices.items(), strict=True):
        norm = m / np.maximum(1, m.sum(1, keepdims=True))
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(report.rows)), report.rows, rotation=70, fontsize=8)
        ax.set_yticks(range(len(report.rows)), report.rows, fontsize=8)
        ax.set_xlabel("found")
        ax.set_ylabel("true")
        ax.set_title(f"severity {severity}: accuracy {100 * report.accuracy(severity):.0f}%")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
