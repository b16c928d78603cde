"""MMPareto (ICML 2024) multimodal gradient integration for PyTorch Lightning.

The package is layered; each layer imports only the ones below it:

* :mod:`.rule`: the rule's math on plain tensors (per-tensor Gram matrices, min-norm weights, the write);
* :mod:`.engine`: the per-loss gradient split from one forward pass, and the engine that joins it to the
  rule for any PyTorch loop;
* :mod:`.distributed`: the collectives of data-parallel and sharded training;
* :mod:`.lightning`: the Lightning layer (:class:`MMParetoModule`, :class:`MMParetoCallback`, metrics);
* :mod:`.cli`: the ``mmpareto-lightning`` command (fit, compare, plot).
"""

from mmpareto_lightning.engine import GradientSplitter, GradientSplittingError, MMParetoEngine
from mmpareto_lightning.lightning import MMParetoCallback, MMParetoMetrics, MMParetoModule
from mmpareto_lightning.rule import (
    RuleConfig,
    RuleStats,
    integrate_gradient_lists,
    integrate_gradients,
    integrate_tensor_lists,
    min_norm_2,
    min_norm_simplex,
)

__version__ = "0.1.0"

__all__ = [
    "GradientSplitter",
    "GradientSplittingError",
    "MMParetoCallback",
    "MMParetoEngine",
    "MMParetoMetrics",
    "MMParetoModule",
    "RuleConfig",
    "RuleStats",
    "integrate_gradient_lists",
    "integrate_gradients",
    "integrate_tensor_lists",
    "min_norm_2",
    "min_norm_simplex",
]
