"""Image sources: a folder (recursive) or scikit-image's bundled samples, decoded once per process.

Images are kept as uint8 (3, H, W) tensors; grey images become 3 channels so one network serves both.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metarestore.errors import UserError
from metarestore.pixels import to_uint8

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
EMBEDDED = "embedded"

# scikit-image samples shipped inside the wheel (no download). Validation images are never trained on.
EMBEDDED_TRAIN = ("chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "brick", "grass",
                  "gravel", "moon", "clock", "coins", "cell", "motorcycle_left", "motorcycle_right", "page")
EMBEDDED_VAL = ("astronaut", "coffee", "camera")


class DataError(UserError, ValueError):
    """A user-facing data problem (missing or empty folder, nothing usable)."""


@dataclass
class ImageSet:
    """Decoded images plus how many files were skipped and why."""

    source: str
    images: list[torch.Tensor]
    names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def at_least(self, size: int) -> ImageSet:
        """Only images with both sides >= size; the rest are skipped with a warning."""
        keep = [i for i, im in enumerate(self.images) if min(im.shape[-2:]) >= size]
        if not keep:
            raise DataError(f"{self.source}: no image is at least {size}x{size} pixels (the patch size); "
                            f"smallest side found: {min(min(im.shape[-2:]) for im in self.images)}")
        small = {self.names[i]: f"smaller than {size}x{size}" for i in range(len(self)) if i not in set(keep)}
        if small:
            warnings.warn(f"{self.source}: skipping {len(small)} image(s) smaller than the {size}px patch",
                          stacklevel=2)
        return ImageSet(self.source, [self.images[i] for i in keep], [self.names[i] for i in keep],
                        {**self.skipped, **small})


def to_chw_uint8(array: np.ndarray) -> torch.Tensor:
    """HxW, HxWx1, HxWx3 or HxWx4 array (uint8, bool or float in [0,1]) -> uint8 (3, H, W)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 4:
        array = array[..., :3]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).contiguous()


def read_image(path: str | Path) -> tuple[torch.Tensor, bool]:
    """Decode one file -> (uint8 (3, H, W), was_grey). Raises DataError for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            grey = im.mode in ("L", "LA", "I", "I;16", "1", "F")
            im = im.convert("RGB")
            return to_chw_uint8(np.asarray(im)), grey
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def to_pil(image: torch.Tensor, grey: bool = False) -> Image.Image:
    """A float [0,1] (3,H,W) or (1,3,H,W) tensor -> an 8-bit PIL image (grey when the input was grey)."""
    if image.ndim == 4:
        image = image[0]
    array = to_uint8(image).permute(1, 2, 0).numpy()
    im = Image.fromarray(array)
    return im.convert("L") if grey else im


def write_image(path: str | Path, image: torch.Tensor, grey: bool = False) -> None:
    """Write a float [0,1] (3,H,W) or (1,3,H,W) tensor; the format follows the file extension."""
    path = Path(path)
    im = to_pil(image, grey)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        im.save(path)
    except (ValueError, KeyError):
        raise DataError(f"cannot write {path}: unsupported image extension {path.suffix!r}") from None


def load_folder(folder: str | Path) -> ImageSet:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    images, names, skipped = [], [], {}
    for path in files:
        try:
            images.append(read_image(path)[0])
            names.append(str(path.relative_to(folder)))
        except DataError as exc:
            skipped[str(path.relative_to(folder))] = str(exc)
    if skipped:
        warnings.warn(f"{folder}: skipped {len(skipped)} unreadable file(s), e.g. {next(iter(skipped.values()))}",
                      stacklevel=2)
    if not images:
        raise DataError(f"none of the {len(files)} image files under {folder} could be read")
    return ImageSet(str(folder), images, names, skipped)


def embedded_image(name: str) -> torch.Tensor:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return to_chw_uint8(left if name.endswith("left") else right)
    return to_chw_uint8(getattr(skimage.data, name)())


def load_embedded(split: str = "train") -> ImageSet:
    """scikit-image's bundled samples: ``train``, ``val`` (held-out images) or ``all``."""
    names = {"train": EMBEDDED_TRAIN, "val": EMBEDDED_VAL, "all": EMBEDDED_TRAIN + EMBEDDED_VAL}[split]
    return ImageSet(f"{EMBEDDED}:{split}", [embedded_image(n) for n in names], list(names))


@functools.lru_cache(maxsize=8)
def _cached(spec: str, split: str) -> ImageSet:
    return load_embedded(split) if spec == EMBEDDED else load_folder(spec)


def absolute_source(spec: str) -> str:
    """An image source with its folder made absolute against this process's directory (``embedded`` as is)."""
    return spec if spec == EMBEDDED else str(Path(spec).expanduser().resolve())


def load_images(spec: str, split: str = "train") -> ImageSet:
    """``"embedded"`` or a folder path; decoded once per process and then served from memory."""
    return _cached(absolute_source(spec), split)
