"""How much of the told JPEG correction to keep for mildly compressed files (``estimator.plan.jpeg_strength``):
Pillow JPEG files at a few qualities, restored told ``jpeg``, keeping a fraction w of the change; mean and
worst gain over the input.

    python benchmarks/bench_jpeg_strength.py [--model builtin:base] [--sets LIVE1,Kodak24] [--images 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from evaluation.blind_bench import _jpeg, center_crop, tensor
from metarestore.data.images import load_folder
from metarestore.hub import load_model
from metarestore.inference import restore_image
from metarestore.meta.losses import psnr

STRENGTHS = (1.0, 0.75, 0.5, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--data", default="../shared/data/test")
    parser.add_argument("--sets", default="LIVE1,Kodak24")
    parser.add_argument("--qualities", default="80,85,88,90,92,95")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    learner, _, _ = load_model(args.model)
    print("| set, quality | " + " | ".join(f"w = {w}" for w in STRENGTHS) + " |")
    print("|---" * (len(STRENGTHS) + 1) + "|")
    for set_name in args.sets.split(","):
        crops = [center_crop(im.permute(1, 2, 0).numpy(), 256)
                 for im in load_folder(Path(args.data) / set_name).images[:args.images]]
        for quality in (int(q) for q in args.qualities.split(",")):
            gains: dict[float, list[float]] = {w: [] for w in STRENGTHS}
            for clean in crops:
                x, y = tensor(_jpeg(clean, quality)[0]), tensor(clean)
                restored = restore_image(learner, x, family="jpeg")
                for w in STRENGTHS:
                    gains[w].append(psnr(x + w * (restored - x), y) - psnr(x, y))
            print(f"| {set_name}, {quality} | " + " | ".join(
                f"{np.mean(g):+.2f} / {min(g):+.2f}" for g in gains.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
