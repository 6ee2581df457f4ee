"""Meta-learning: the shared ``adapt()``, the algorithms, the training step and validation."""

from metarestore.meta.adapt import adapt, adaptable_params, apply_delta, delta, forward_with, lr_for
from metarestore.meta.learner import (
    ALGORITHMS,
    MetaLearner,
    build_learner,
    flat_grad,
    make_learner,
    set_flat_grad,
)
from metarestore.meta.losses import charbonnier, get_loss, l1, psnr, ssim

__all__ = ["ALGORITHMS", "MetaLearner", "adapt", "adaptable_params", "apply_delta", "build_learner", "charbonnier",
           "delta", "flat_grad", "forward_with", "get_loss", "l1", "lr_for", "make_learner", "psnr", "set_flat_grad",
           "ssim"]
