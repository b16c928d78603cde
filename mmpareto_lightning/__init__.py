"""MMPareto (ICML 2024) multimodal gradient integration for PyTorch Lightning.

The rule (:mod:`.rule`), the gradient splitting (:mod:`.splitting`) and the plain-PyTorch engine
(:mod:`.engine`) know nothing of Lightning; :class:`MMParetoModule` and :class:`MMParetoCallback` are the
thin Lightning layer.
"""

from mmpareto_lightning.callback import MMParetoCallback
from mmpareto_lightning.engine import MMParetoEngine
from mmpareto_lightning.metrics import MMParetoMetrics
from mmpareto_lightning.min_norm import min_norm_2, min_norm_simplex
from mmpareto_lightning.module import MMParetoModule
from mmpareto_lightning.rule import (
    RuleConfig,
    RuleStats,
    integrate_gradient_lists,
    integrate_gradients,
    integrate_tensor_lists,
)
from mmpareto_lightning.splitting import GradientSplitter, GradientSplittingError

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
