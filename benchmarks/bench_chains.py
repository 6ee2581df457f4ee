"""A chain's told row against a told pass per family (configs/base-chains.yaml): realistic chains made outside
the registry (Pillow's blur, resize and JPEG codec, numpy noise) on centre crops of LIVE1 and Kodak24, undone
by one pass told the whole chain, or by one told pass per family, the last applied first. What decides
``estimator.plan.JOINED``.

    python benchmarks/bench_chains.py [--model builtin:base] [--sets LIVE1,Kodak24] [--images 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from evaluation.blind_bench import _jpeg, _noise, _pil, center_crop, tensor
from metarestore.data.images import load_folder
from metarestore.hub import load_model
from metarestore.inference import restore_image
from metarestore.meta.losses import psnr


def _dark(a: np.ndarray) -> np.ndarray:
    """Under-exposed: 0.45 x^1.6 (the low-light family's look near severity 0.5, made with numpy)."""
    return np.clip(255 * 0.45 * (a / 255.0) ** 1.6, 0, 255).round().astype(np.uint8)


def _half_and_back(a: np.ndarray) -> np.ndarray:
    return _pil(a, lambda im: im.resize((im.width // 2, im.height // 2), Image.BICUBIC).resize(im.size, Image.BICUBIC))


def _blur(a: np.ndarray) -> np.ndarray:
    return _pil(a, lambda im: im.filter(ImageFilter.GaussianBlur(1.2)))


# name -> (make the JPEG file from a clean uint8 image, the chain's told name, applied first to last)
CHAINS: dict[str, tuple[Callable, str]] = {
    "noise 15, then JPEG 75": (lambda a, rng: _jpeg(_noise(a, 15, rng), 75), "gaussian_noise+jpeg"),
    "blur 1.2, noise 8, then JPEG 75": (lambda a, rng: _jpeg(_noise(_blur(a), 8, rng), 75),
                                        "gaussian_blur+gaussian_noise+jpeg"),
    "bicubic x0.5 and back, then JPEG 75": (lambda a, rng: _jpeg(_half_and_back(a), 75), "downsample+jpeg"),
    "darkened, noise 5, then JPEG 75": (lambda a, rng: _jpeg(_noise(_dark(a), 5, rng), 75),
                                        "low_light+gaussian_noise+jpeg"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--data", default="../shared/data/test")
    parser.add_argument("--sets", default="LIVE1,Kodak24")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    args = parser.parse_args()
    learner, _, _ = load_model(args.model)
    told = set(learner.hint_families)
    print("| set | chain | input | a pass per family | the chain's row |\n|---|---|---|---|---|")
    for set_name in args.sets.split(","):
        images = load_folder(Path(args.data) / set_name).images[:args.images]
        for name, (make, chain) in CHAINS.items():
            if chain not in told:
                print(f"| {set_name} | {name} | (the model has no {chain} row) | | |")
                continue
            scores = {"input": [], "passes": [], "row": []}
            for index, image in enumerate(images):
                clean = center_crop(image.permute(1, 2, 0).numpy(), args.crop)
                degraded, _ = make(clean, np.random.default_rng(index))
                x, reference = tensor(degraded), tensor(clean)
                passes = x
                for family in reversed(chain.split("+")):  # the last applied first
                    passes = restore_image(learner, passes, family=family)
                scores["input"].append(psnr(x, reference))
                scores["passes"].append(psnr(passes, reference))
                scores["row"].append(psnr(restore_image(learner, x, family=chain), reference))
            mean = {k: float(np.mean(v)) for k, v in scores.items()}
            print(f"| {set_name} | {name} | {mean['input']:.2f} | {mean['passes']:.2f} | {mean['row']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
