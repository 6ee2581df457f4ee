"""Inpainting family: pixels lost under random brush strokes and boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from metarestore.degradations.base import Degradation, Params, ParamSpec, cpu_generator

STROKE_VERTICES = 4  # each stroke is a random walk of 3 straight segments


def segment_distance(px: torch.Tensor, py: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from pixel centres (H,W grids) to segments a->b, given as (B,2) endpoints: (B,H,W)."""
    ax, ay = a[:, 0, None, None], a[:, 1, None, None]
    dx, dy = (b[:, 0] - a[:, 0])[:, None, None], (b[:, 1] - a[:, 1])[:, None, None]
    t = ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-9)
    t = t.clamp(0.0, 1.0)
    return torch.hypot(px - ax - t * dx, py - ay - t * dy)


def inpainting_masks(batch: int, height: int, width: int, params: Params) -> torch.Tensor:
    """Boolean (B,1,H,W) masks, True where a pixel is missing; drawn on the CPU from ``params["seed"]``."""
    g = cpu_generator(params["seed"])
    short = min(height, width)
    strokes, boxes = int(round(float(params["strokes"]))), int(round(float(params["boxes"])))
    half_width = max(0.5, 0.5 * float(params["width"]) * short)
    # All draws up front, with fixed shapes, so the masks depend only on the parameters.
    starts = torch.rand((batch, strokes, 2), generator=g, dtype=torch.float64)
    angles = 2.0 * math.pi * torch.rand((batch, strokes, STROKE_VERTICES - 1), generator=g, dtype=torch.float64)
    steps = (0.1 + 0.2 * torch.rand((batch, strokes, STROKE_VERTICES - 1), generator=g,
                                    dtype=torch.float64)) * short
    box_draws = torch.rand((batch, boxes, 4), generator=g, dtype=torch.float64)

    size = torch.tensor([width - 1.0, height - 1.0], dtype=torch.float64)
    moves = torch.stack((angles.cos() * steps, angles.sin() * steps), dim=-1)
    vertices = torch.cat((starts[:, :, None] * size, moves), dim=2).cumsum(dim=2)
    vertices = torch.minimum(vertices.clamp_min(0.0), size)  # (B, strokes, vertices, 2)

    py, px = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    mask = torch.zeros((batch, height, width), dtype=torch.bool)
    for s in range(strokes):
        for v in range(STROKE_VERTICES - 1):
            mask |= segment_distance(px, py, vertices[:, s, v], vertices[:, s, v + 1]) <= half_width
    side = float(params["box_size"]) * short
    for k in range(boxes):
        centre = box_draws[:, k, :2] * size
        half = 0.5 * side * (0.7 + 0.6 * box_draws[:, k, 2:])  # each side 0.7..1.3 x box_size
        inside_x = (px - centre[:, 0, None, None]).abs() <= half[:, 0, None, None]
        inside_y = (py - centre[:, 1, None, None]).abs() <= half[:, 1, None, None]
        mask |= inside_x & inside_y
    return mask[:, None]


@dataclass
class Inpainting(Degradation):
    """Missing pixels under random thick brush strokes and rectangles (set to 0 in every channel)."""

    name: str = "inpainting"
    description: str = ("missing regions: `strokes` random-walk brush strokes (3 segments each) and `boxes` "
                        "rectangles per image, drawn from `seed`; missing pixels are 0")
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "strokes": ParamSpec(1, 10, "number of brush strokes per image", integer=True),
        "boxes": ParamSpec(0, 4, "number of rectangles per image", integer=True),
        "width": ParamSpec(0.02, 0.08, "stroke width, fraction of min(H, W)"),
        "box_size": ParamSpec(0.05, 0.25, "rectangle side, fraction of min(H, W) (each side x 0.7..1.3)")})

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        b, _, h, w = x.shape
        mask = inpainting_masks(b, h, w, params).to(x.device)
        return x.masked_fill(mask, 0.0)
