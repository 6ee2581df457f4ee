"""Gaussian noise clipped to [0, 1] or not: what a model scores on each (docs/benchmarks.md, "Unclipped noise").

    python benchmarks/bench_clipping.py --models builtin:base runs/base/final --images ../shared/data/test/CBSD68 --limit 8

The published AWGN tables (CBSD68, Kodak24) add noise without clipping; a photo saved as PNG has it clipped.
Full images, sigma 25/255, noise seed = image index (as the anchors of DEVELOPERS.md); a told model is told
``awgn`` for the unclipped noise when it knows that family (else ``gaussian_noise``) and ``gaussian_noise`` for
the clipped; outputs clipped and rounded to 8 bits, as ``evaluate --protocol`` does.
"""

from __future__ import annotations

import argparse

import torch

from metarestore.data import load_images
from metarestore.hub import load_model
from metarestore.inference import restore_image
from metarestore.meta.losses import psnr
from metarestore.pixels import quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["builtin:base"])
    parser.add_argument("--images", default="../shared/data/test/CBSD68")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=25.0, help="of 255")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = load_images(args.images).images[:args.limit]
    print(f"{len(images)} images of {args.images}, sigma {args.sigma:g}\n")
    print("| model | input | restored, unclipped noise | restored, clipped noise |\n|---|---|---|---|")
    for uri in args.models:
        learner, _, _ = load_model(uri)
        known = learner.hint_families
        told = {kind: next((f for f in wanted if f in known), None)
                for kind, wanted in (("unclipped", ("awgn", "gaussian_noise")), ("clipped", ("gaussian_noise",)))}
        scores = {"input": [], "unclipped": [], "clipped": []}
        for i, image in enumerate(images):
            clean = image.float()[None] / 255
            noisy = clean + args.sigma / 255 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(i))
            scores["input"].append(psnr(noisy, clean))
            for kind, x in (("unclipped", noisy), ("clipped", noisy.clamp(0, 1))):
                out = quantize(restore_image(learner, x, family=told[kind]))
                scores[kind].append(psnr(out, clean))
        mean = {k: sum(v) / len(v) for k, v in scores.items()}
        print(f"| {uri} | {mean['input']:.2f} | {mean['unclipped']:.2f} | {mean['clipped']:.2f} |")


if __name__ == "__main__":
    main()
