"""The MMPareto rule on plain tensors: no autograd graph, no Lightning.

* :mod:`.integrate`: :class:`RuleConfig`, :class:`RuleStats` and the ``integrate_*`` functions (the
  decisions, from per-tensor Gram matrices);
* :mod:`.min_norm`: the min-norm solvers (two vectors as the authors ship it; the simplex for more);
* :mod:`.passes`: the two passes over the gradients (the Gram matrices read, the weighted sum written).
"""

from mmpareto_lightning.rule.integrate import (
    RESCALE_MODES,
    STRATEGIES,
    RuleConfig,
    RuleStats,
    integrate_gradient_lists,
    integrate_gradients,
    integrate_tensor_lists,
)
from mmpareto_lightning.rule.min_norm import min_norm_2, min_norm_simplex

__all__ = [
    "RESCALE_MODES",
    "STRATEGIES",
    "RuleConfig",
    "RuleStats",
    "integrate_gradient_lists",
    "integrate_gradients",
    "integrate_tensor_lists",
    "min_norm_2",
    "min_norm_simplex",
]
