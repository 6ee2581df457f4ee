"""What the estimator names: every degradation family an 8-bit image can show, and the chains photos go
through (several degradations at once, in the order a camera and a codec apply them)."""

from __future__ import annotations

from metarestore.degradations import image_families, names

# every registered family a saved image can show (``awgn`` is a float measurement, not an image)
LABELS: tuple[str, ...] = tuple(image_families(names()))

# what photos are: noise then JPEG; blur then noise then JPEG; downsampling then JPEG; low light then noise
# then JPEG (the list, "Train for what photos are")
REALISTIC_CHAINS: tuple[tuple[str, ...], ...] = (
    ("gaussian_noise", "jpeg"),
    ("gaussian_blur", "gaussian_noise", "jpeg"),
    ("downsample", "jpeg"),
    ("low_light", "gaussian_noise", "jpeg"),
)

# the order in which several found degradations are undone: the reverse of the order a capture applies
# them (tone and optics first, then sensor noise, then the codec), so the last one applied goes first
UNDO_ORDER: tuple[str, ...] = ("jpeg", "salt_pepper", "gaussian_noise", "poisson_noise", "inpainting",
                               "downsample", "gaussian_blur", "motion_blur", "haze", "low_light", "contrast",
                               "color_cast")

# families that explain the same look (two kinds of noise; softness by blur or lost resolution; a tone curve):
# the estimator's probability is split between them on an image that shows one, so a group counts as present
# by its members together, as its likeliest member, and only that one is ever undone
ALTERNATIVES: tuple[frozenset[str], ...] = (
    frozenset({"gaussian_noise", "poisson_noise"}),
    frozenset({"gaussian_blur", "motion_blur", "downsample"}),
    frozenset({"low_light", "contrast", "haze", "color_cast"}),
)
