"""Figures people would rather look at than tables: restoration grids and curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from metarestore.meta.losses import psnr  # noqa: E402


def _show(ax, image: torch.Tensor) -> None:
    ax.imshow(image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def save_grid(rows: list[tuple[str, list[torch.Tensor | None]]], columns: list[str], path: str | Path,
              title: str | None = None) -> Path:
    """One row per label; the last column is the reference used for the PSNR shown under the others.
    ``None`` leaves a cell empty (a method that does not apply to that row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.3 * len(columns), 2.4 * len(rows)),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        reference = images[-1]
        for c, image in enumerate(images):
            ax = axes[r][c]
            if r == 0:  # the column's title even over an empty first cell
                ax.set_title(columns[c], fontsize=10)
            if image is None:
                ax.axis("off")
                continue
            _show(ax, image)
            if c < len(images) - 1:
                ax.set_xlabel(f"{psnr(image[None], reference[None]):.2f} dB", fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98) if title else None)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
