"""Knowing what happened to a photo before restoring it: the estimate that blind restoration acts on.

A blind restorer that guesses does harm (it shifts the tones of clean photos, leaves JPEG files as they
are): here a small classifier reads the image, a JPEG file's quantization tables say it is JPEG and at
what quality, and a policy (``plan``) turns the estimate into what to undo, or nothing at all.
"""

from metarestore.estimator.estimate import Estimate, Estimator, default_estimator, load_estimator
from metarestore.estimator.evidence import jpeg_quality, noise_sigma
from metarestore.estimator.labels import LABELS, REALISTIC_CHAINS
from metarestore.estimator.plan import Step, plan

__all__ = ["LABELS", "REALISTIC_CHAINS", "Estimate", "Estimator", "Step", "default_estimator", "jpeg_quality",
           "load_estimator", "noise_sigma", "plan"]
