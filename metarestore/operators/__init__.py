"""Operator identification and operator + prior reconstruction for few-shot adaptation.

From K (degraded, clean) support pairs: fit the degradation's operator (``operators.base.Operator``, one
interface; the registered ones are listed in ``operators.catalog``), undo it, and let the restorer act as
the image prior; ``fit_adapter`` chooses per adapter between that, FiLM adaptation and zero-shot by
held-out validation.
"""

from metarestore.operators.adapter import Adapter, AdapterError, fit_adapter, read_adapter
from metarestore.operators.base import OPERATORS, Operator, register_operator
from metarestore.operators.haze import HazeFit, dehaze, fit_haze
from metarestore.operators.kernel import KernelFit, fit_kernel
from metarestore.operators.noise import NoiseFit, fit_noise
from metarestore.operators.paths import Operators, Path, default_paths
from metarestore.operators.tone import ToneFit, fit_tone

__all__ = ["OPERATORS", "Adapter", "AdapterError", "HazeFit", "KernelFit", "NoiseFit", "Operator", "Operators",
           "Path", "ToneFit", "dehaze", "default_paths", "fit_adapter", "fit_haze", "fit_kernel", "fit_noise",
           "fit_tone", "read_adapter", "register_operator"]
