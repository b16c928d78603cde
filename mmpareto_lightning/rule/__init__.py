"""The MMPareto rule on plain tensors: no autograd graph, no Lightning.

* :mod:`.config`: :class:`RuleConfig`, :class:`RuleStats`, the floor of the enlargement;
* :mod:`.integrate`: the ``integrate_*`` functions (one encoder, several at once, flat gradients);
* :mod:`.decide`: the decisions, from per-tensor Gram matrices to per-tensor coefficients;
* :mod:`.min_norm`: the min-norm solvers (two vectors as the authors ship it; the simplex for more);
* :mod:`.passes`: the two passes over the gradients (the Gram matrices read, the weighted sum written).
"""

from mmpareto_lightning.rule.config import FLOOR_RATIO, RESCALE_MODES, STRATEGIES, RuleConfig, RuleStats
from mmpareto_lightning.rule.integrate import (
    GramReduce,
    integrate_encoders,
    integrate_gradient_lists,
    integrate_gradients,
    integrate_tensor_lists,
)
from mmpareto_lightning.rule.min_norm import min_norm_2, min_norm_simplex

__all__ = [
    "FLOOR_RATIO",
    "RESCALE_MODES",
    "STRATEGIES",
    "GramReduce",
    "RuleConfig",
    "RuleStats",
    "integrate_encoders",
    "integrate_gradient_lists",
    "integrate_gradients",
    "integrate_tensor_lists",
    "min_norm_2",
    "min_norm_simplex",
]
