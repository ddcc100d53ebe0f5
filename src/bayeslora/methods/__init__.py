"""Fine-tuning and Bayesianization methods; importing this package registers all of them."""

from __future__ import annotations

from . import mle  # noqa: F401  (registration side effect)
from . import blob, ens, map, mcd, sgp  # noqa: F401,E401
from . import laplace, temperature, tfb  # noqa: F401,E401  (post-hoc)
from .base import AdapterConfig, BayesianMethod, MethodConfig, MethodError, SampledConfig, SamplePlan
from .registry import METHODS, build_method, get_method_class, register_method

__all__ = ["METHODS", "AdapterConfig", "BayesianMethod", "MethodConfig", "MethodError", "SampledConfig", "SamplePlan",
           "build_method", "get_method_class", "register_method"]
